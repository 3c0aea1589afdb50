"""The one exception type a job reports without a traceback.

A :class:`UserError` is a problem with what the user gave (a URI that does not exist or cannot be
reached, refused credentials, a file in the wrong format, a setting that does not fit the data). Its
message names the thing and says what to do; ``jobs/*.py`` print it and exit with status 2. Anything
else is a bug and keeps its traceback. ``--debug`` (or ``UMAF_DEBUG=1``) shows the traceback of a
UserError too.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, phrased for the person who gave it (a ValueError, so callers that caught those still do)."""
