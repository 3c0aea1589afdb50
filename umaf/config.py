"""Job configuration: pydantic models, YAML presets and ``key=value`` overrides.

Every job in ``jobs/`` is configured the same way (torchtune-style recipes):

1. a preset ``configs/<job>/<name>.yaml`` (``--preset NAME``, default ``tiny``) or a file
   (``--config FILE.yaml``),
2. then ``key=value`` overrides, dotted for nested keys (``model.top_k=8``), values parsed as YAML
   scalars/lists (``lr=1e-4``, ``search.k=[4,8]``).

Validation happens before any work starts. An unknown key or a bad value raises
:class:`ConfigError`, whose message names the field, the value given and what is allowed.

The job-specific models (``PrepareConfig``, ``CaptionConfig``, ``TrainConfig``, ``TuneConfig``) live
next to the code that uses them and are all subclasses of :class:`StrictModel`; this module only
holds the machinery and the pieces every job shares.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONFIG_DIR_ENV = "UMAF_CONFIG_DIR"
DEFAULT_PRESET = "tiny"


def config_dir() -> Path:
    """Where presets live: ``$UMAF_CONFIG_DIR`` or the repository's ``configs/``."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who typed it."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RayConfig(StrictModel):
    """How a job connects to Ray."""

    address: str | None = Field(
        None,
        description="Ray cluster address; None starts a local cluster (or joins RAY_ADDRESS when a "
        "job is submitted with `ray job submit`)",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None: all)")
    include_dashboard: bool = Field(True, description="start the dashboard with a local cluster")


class StorageConfig(StrictModel):
    """Object storage options shared by every job. Credentials never go here: the AWS chain is used."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, moto); default $AWS_ENDPOINT_URL_S3 or "
        "$AWS_ENDPOINT_URL, else AWS",
    )
    region: str | None = Field(None, description="S3 region; default $AWS_REGION / $AWS_DEFAULT_REGION")


ConfigT = TypeVar("ConfigT", bound=BaseModel)


# --------------------------------------------------------------------------------------------
# Loading


def preset_path(job: str, preset: str) -> Path:
    path = config_dir() / job / f"{preset}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (config_dir() / job).glob("*.yaml"))
        raise ConfigError(
            f"unknown preset {preset!r} for job {job!r}: no file {path}. "
            f"Available presets: {', '.join(available) or '(none)'}"
        )
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], parsed value). Values are YAML, so ``1e-4`` is a float."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value (nested keys are dotted: model.top_k=8)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (it wants 1.0e-4); people type 1e-4.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and not value.isalpha() else value
        except ValueError:
            pass
    return key.split("."), value


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model`` or ``Model | None``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _leaf_types(model: type[BaseModel], path: list[str]) -> list[Any] | None:
    """The types a (nested) field accepts, ``None`` left out; None when ``path`` is not a field."""
    current: type[BaseModel] | None = model
    for key in path[:-1]:
        if current is None or key not in current.model_fields:
            return None
        current = _submodel(current.model_fields[key].annotation)
    if current is None or path[-1] not in current.model_fields:
        return None
    annotation = current.model_fields[path[-1]].annotation
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _typed_text(model: type[BaseModel], path: list[str], value: Any, raw: str) -> Any:
    """Undo YAML's guesses where the field disagrees: ``dataset=2024`` and ``tag=on`` are text for a
    ``str`` field, and ``epochs=on`` must not become ``True`` → 1 for an ``int`` field."""
    if not isinstance(value, (bool, int, float)):
        return value
    types_ = _leaf_types(model, path)
    if types_ == [str] or (isinstance(value, bool) and types_ is not None and bool not in types_):
        return raw.strip()
    return value


def apply_override(data: dict[str, Any], model: type[BaseModel], path: list[str], value: Any) -> None:
    """Set ``data[path] = value`` after checking each key against ``model``'s fields."""
    node, current = data, model
    for depth, key in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if current is dict:  # a free-form mapping field (e.g. a search space): any sub-key, values validated later
            for part in path[depth:-1]:
                child = node.get(part)
                node = node.setdefault(part, {}) if isinstance(child, dict) or child is None else node
            node[path[-1]] = value
            return
        if current is None:
            raise ConfigError(f"unknown key {dotted!r}: {'.'.join(path[:depth])!r} has no sub-keys")
        if key not in current.model_fields:
            raise ConfigError(
                f"unknown key {dotted!r}. Allowed keys here: {', '.join(_field_names(current))}"
            )
        if depth == len(path) - 1:
            node[key] = value
            return
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
        annotation = current.model_fields[key].annotation
        current = dict if get_origin(annotation) is dict or annotation is dict else _submodel(annotation)


def _describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    if not err["loc"]:
        # A model-level check: its input is the whole config, so say only what the check said.
        return err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    msg = err["msg"]
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        msg = f"{msg}"
    return f"{loc}: got {given!r}: {msg}"


def validate(model: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid {source}:"]
        for err in exc.errors():
            line = "  " + _describe_error(err)
            if err["type"] == "extra_forbidden" and len(err["loc"]) >= 1:
                parent = model
                for part in err["loc"][:-1]:
                    sub = _submodel(parent.model_fields[part].annotation) if part in parent.model_fields else None
                    if sub is None:
                        break
                    parent = sub
                line += f" (allowed: {', '.join(_field_names(parent))})"
            lines.append(line)
        raise ConfigError("\n".join(lines)) from None


def load_config(
    model: type[ConfigT],
    job: str,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> ConfigT:
    """Build a validated config: preset (or file) → ``extra`` (named CLI flags) → overrides."""
    if preset and config_file:
        raise ConfigError("give either --preset or --config, not both")
    if config_file:
        data = read_yaml(config_file)
        source = f"config {config_file}"
    else:
        name = preset or DEFAULT_PRESET
        data = read_yaml(preset_path(job, name))
        source = f"preset {name!r} ({job})"
    for key, value in (extra or {}).items():
        if value is not None:
            apply_override(data, model, key.split("."), value)
    for text in overrides:
        path, value = parse_override(text)
        value = _typed_text(model, path, value, text.partition("=")[2])
        apply_override(data, model, path, value)
    return validate(model, data, source=source + (" with overrides" if overrides or extra else ""))


# --------------------------------------------------------------------------------------------
# Help text


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per (nested) key: ``name (type, default X): description``."""
    lines = []
    for name, field in model.model_fields.items():
        key = prefix + name
        sub = _submodel(field.annotation)
        if sub is not None:
            lines.extend(describe_fields(sub, key + "."))
            continue
        default = field.get_default(call_default_factory=True)
        desc = f" — {field.description}" if field.description else ""
        lines.append(f"  {key} ({_type_name(field.annotation)}, default {default!r}){desc}")
    return lines


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
