"""Readers of the published dataset formats, the manifest every later stage reads, and the demo set.

- :mod:`umaf.data.manifest`  the manifest contract (columns, label metadata), write/read
- :mod:`umaf.data.readers`   one pure reader per format: mvsa-raw, clmlf, hfm-raw, msed, mmsd2
- :mod:`umaf.data.images`    missing/unreadable image check (one listing per folder)
- :mod:`umaf.data.report`    what a prepare run cleaned, skipped and could not find
- :mod:`umaf.data.prepare`   reader → checks → manifest + ``<out>.report.json`` (``jobs/prepare.py``)
- :mod:`umaf.data.demo`      the synthetic PIL-drawn sentiment set with reference captions

Nothing here imports Ray.
"""
