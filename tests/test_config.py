"""Config machinery (umaf/config.py, umaf/cli.py): presets, overrides, errors that name the field, --help."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from umaf.cli import Flag, parse_job_args
from umaf.config import (
    ConfigError,
    StorageConfig,
    StrictModel,
    config_dir,
    load_config,
    parse_override,
    preset_path,
)
from umaf.data.config import PrepareConfig


class Optim(StrictModel):
    lr: float = Field(1e-3, gt=0, description="learning rate")
    schedule: Literal["linear", "cosine"] = "linear"


class Toy(StrictModel):
    name: str = "toy"
    epochs: int = Field(2, ge=1)
    tags: list[str] = Field(default_factory=list)
    debug: bool = False
    note: str | None = None
    optim: Optim = Field(default_factory=Optim)
    storage: StorageConfig = Field(default_factory=StorageConfig)


@pytest.fixture
def toy_presets(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "tiny.yaml").write_text("epochs: 3\noptim:\n  lr: 0.01\n")
    (tmp_path / "toy" / "big.yaml").write_text("epochs: 50\n")
    monkeypatch.setenv("UMAF_CONFIG_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "text, path, value",
    [
        ("lr=1e-4", ["lr"], 1e-4),  # YAML alone would read "1e-4" as a string
        ("optim.lr=0.5", ["optim", "lr"], 0.5),
        ("epochs=8", ["epochs"], 8),
        ("tags=[a, b]", ["tags"], ["a", "b"]),
        ("debug=true", ["debug"], True),
        ("note=", ["note"], None),
        ("out=s3://bucket/prefix", ["out"], "s3://bucket/prefix"),
        ("source=../shared/data.v2/x.json", ["source"], "../shared/data.v2/x.json"),
    ],
)
def test_parse_override_values(text, path, value):
    assert parse_override(text) == (path, value)


def test_parse_override_needs_key_and_equals():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("epochs")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("=3")


def test_preset_then_flags_then_overrides(toy_presets):
    config = load_config(Toy, "toy")  # default preset: tiny
    assert (config.epochs, config.optim.lr) == (3, 0.01)
    config = load_config(Toy, "toy", preset="big", extra={"name": "from-flag"},
                         overrides=["optim.schedule=cosine", "name=from-override", "tags=[x]"])
    assert (config.epochs, config.name, config.optim.schedule, config.tags) == (50, "from-override", "cosine", ["x"])


def test_text_fields_keep_what_was_typed(toy_presets):
    config = load_config(Toy, "toy", overrides=["name=2024", "note=on", "storage.region=1e5"])
    assert (config.name, config.note, config.storage.region) == ("2024", "on", "1e5")
    with pytest.raises(ConfigError, match="epochs: got 'many'"):
        load_config(Toy, "toy", overrides=["epochs=many"])
    # YAML 1.1 reads "on" as True, which pydantic would quietly turn into epochs=1.
    with pytest.raises(ConfigError, match="epochs: got 'on'"):
        load_config(Toy, "toy", overrides=["epochs=on"])
    assert load_config(Toy, "toy", overrides=["debug=on"]).debug is True


def test_unknown_keys_name_the_key_and_what_is_allowed(toy_presets):
    with pytest.raises(ConfigError) as err:
        load_config(Toy, "toy", overrides=["epoch=3"])
    assert "unknown key 'epoch'" in str(err.value) and "epochs" in str(err.value) and "optim" in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown key 'optim.momentum'. Allowed keys here: lr, schedule"):
        load_config(Toy, "toy", overrides=["optim.momentum=0.9"])
    with pytest.raises(ConfigError, match=r"unknown key 'epochs.x': 'epochs' has no sub-keys"):
        load_config(Toy, "toy", overrides=["epochs.x=1"])


def test_bad_values_name_field_value_and_rule(toy_presets):
    with pytest.raises(ConfigError) as err:
        load_config(Toy, "toy", overrides=["optim.schedule=step", "epochs=0"])
    message = str(err.value)
    assert "optim.schedule: got 'step'" in message and "'linear' or 'cosine'" in message
    assert "epochs: got 0" in message and "greater than or equal to 1" in message


def test_bad_preset_files(toy_presets, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'huge' for job 'toy'.*Available presets: big, tiny"):
        load_config(Toy, "toy", preset="huge")
    (toy_presets / "toy" / "extra.yaml").write_text("epochs: 3\nwarmup: 9\n")
    with pytest.raises(ConfigError, match=r"invalid preset 'extra' \(toy\):\n  unknown key 'warmup' \(allowed: name,"):
        load_config(Toy, "toy", preset="extra")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Toy, "toy", config_file=tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(Toy, "toy", config_file=tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Toy, "toy", config_file=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="either --preset or --config"):
        load_config(Toy, "toy", preset="big", config_file=tmp_path / "list.yaml")


def test_config_file(toy_presets, tmp_path):
    (tmp_path / "mine.yaml").write_text("epochs: 7\noptim: {schedule: cosine}\n")
    config = load_config(Toy, "toy", config_file=tmp_path / "mine.yaml", overrides=["epochs=9"])
    assert (config.epochs, config.optim.schedule, config.optim.lr) == (9, "cosine", 1e-3)


def test_cli_exits_2_naming_the_field(toy_presets, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args("toy", Toy, ["optim.lr=-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jobs/toy.py: error: ") and "optim.lr: got -1" in err and "greater than 0" in err


def test_cli_flags_and_help_list_every_key(toy_presets, capsys):
    args = parse_job_args("toy", Toy, ["--preset", "big", "--name", "n", "optim.lr=2e-5"],
                          flags=[Flag("--name", "name"), Flag("--debug", "debug", action="store_true")])
    assert (args.config.name, args.config.epochs, args.config.optim.lr, args.config.debug) == ("n", 50, 2e-5, False)
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args("toy", Toy, ["--help"], flags=[Flag("--name", "name")])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("name", "epochs", "tags", "debug", "note", "optim.lr", "optim.schedule", "storage.endpoint_url",
                "storage.region"):
        assert f"\n  {key} (" in out, key
    assert "optim.lr (float, default 0.001) — learning rate" in out
    assert "optim.schedule (linear|cosine, default 'linear')" in out


def test_prepare_job_help_and_config_errors(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jobs.prepare import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for key in PrepareConfig.model_fields:
        assert f"\n  {key}" in out, key
    assert "--on-error {fail,skip}" in out and "demo.n_train (int, default 240)" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--format", "msed", "--source", "/x", "missing_image=drop"])
    assert exit_info.value.code == 2
    assert "unknown key 'missing_image'. Allowed keys here: format, source, images" in capsys.readouterr().err


def test_every_prepare_preset_validates():
    presets = sorted(p.stem for p in (config_dir() / "prepare").glob("*.yaml"))
    assert "tiny" in presets
    for name in presets:
        config = load_config(PrepareConfig, "prepare", preset=name)
        assert preset_path("prepare", name).is_file()
        assert config.format == "demo" or config.source


def test_prepare_config_rules():
    with pytest.raises(ConfigError, match="source is required for format 'msed': give --source DIR"):
        load_config(PrepareConfig, "prepare", overrides=["format=msed"])
    with pytest.raises(ConfigError, match=r"split_ratios: got \[0.5, 0.5, 0.5\].*sum to 1"):
        load_config(PrepareConfig, "prepare", overrides=["split_ratios=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match=r"format: got 'csv'.*'mvsa-raw', 'clmlf', 'hfm-raw', 'msed', 'mmsd2' or 'demo'"):
        load_config(PrepareConfig, "prepare", overrides=["format=csv"])
    config = load_config(PrepareConfig, "prepare", overrides=["format=clmlf", "source=/data", "on_error=skip"])
    assert (config.on_error, config.missing_images, config.check_images) == ("skip", "keep", "open")
