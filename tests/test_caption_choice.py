"""Training, predict and experiments read one caption set, chosen explicitly when there are several."""

from __future__ import annotations

import logging

import pytest

from test_caption_store import row, write
from umaf.errors import UserError


def test_train_pins_its_caption_set_and_predict_warns_when_captions_differ(tmp_path, caplog):
    from umaf.predict.config import PredictConfig
    from umaf.predict.pipeline import caption_fingerprint
    from umaf.train.config import TrainConfig
    from umaf.train.run import pin_caption_fingerprint

    uri = str(tmp_path / "captions")
    write(uri, "part-1.parquet", [row("a", fp="fpA")])
    # Training: one set there → chosen and written into the run's config (config.yaml, model card).
    cfg = TrainConfig(manifest=str(tmp_path / "m"), captions=uri)
    assert pin_caption_fingerprint(cfg).caption_fingerprint == "fpA"
    assert pin_caption_fingerprint(cfg.model_copy(update={"model": "sppscl"})).caption_fingerprint is None
    write(uri, "part-2.parquet", [row("a", fp="fpB")])
    with pytest.raises(UserError, match="2 caption sets: choose one with caption_fingerprint="):
        pin_caption_fingerprint(cfg)

    card = {"train_config": {"caption_fingerprint": "fpA"}}
    predict = PredictConfig(run=str(tmp_path / "run"), captions=uri)
    with caplog.at_level(logging.WARNING, logger="umaf.predict"):
        assert caption_fingerprint(predict, card, uri) == "fpA"  # the training's set, present: no question
        assert not caplog.records
        chosen = caption_fingerprint(predict.model_copy(update={"caption_fingerprint": "fpB"}), card, uri)
    assert chosen == "fpB"
    assert any("set fpB differs from the set the run was trained on (fpA)" in r.getMessage() for r in caplog.records)

    # Captions holding only another set: used, with the warning; several others: the caller must choose.
    other = str(tmp_path / "other")
    write(other, "part-1.parquet", [row("a", fp="fpC")])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="umaf.predict"):
        assert caption_fingerprint(predict, card, other) == "fpC"
    assert "differs from the set the run was trained on (fpA)" in caplog.text
    write(other, "part-2.parquet", [row("a", fp="fpD")])
    with pytest.raises(UserError, match="2 caption sets"):
        caption_fingerprint(predict, card, other)
