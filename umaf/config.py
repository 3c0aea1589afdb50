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

import logging
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

CONFIG_DIR_ENV = "UMAF_CONFIG_DIR"
DEFAULT_PRESET = "tiny"
# The folder relative local paths are relative to; default: the process's working directory.
WORKDIR_ENV = "UMAF_WORKDIR"

log = logging.getLogger("umaf.config")


def config_dir() -> Path:
    """Where presets live: ``$UMAF_CONFIG_DIR`` or the repository's ``configs/``."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who typed it."""


# --------------------------------------------------------------------------------------------
# Paths: a path means what the user meant


def _under_ray_job_submit() -> bool:
    """True in the driver of ``ray job submit``: Ray sets this variable only there."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


_warned: set[str] = set()


def absolute_path(value: str | None) -> str | None:
    """A local path made absolute against the user's folder; URIs (``s3://``...) are left alone.

    Done once, on the driver, when the config is validated: Ray workers run in other folders (a
    Train worker's working directory is a Ray session folder), so a relative path handed to them
    would land somewhere else on every process. Relative paths are relative to ``$UMAF_WORKDIR``
    when set, else to the working directory. Under ``ray job submit --working-dir .`` that working
    directory is Ray's temporary copy of the uploaded folder on the head node, so there a relative
    output path is resolved but also called out (see the README: set ``UMAF_WORKDIR`` or give
    absolute paths / ``s3://`` to keep outputs).
    """
    if value is None or "://" in value:
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return os.path.normpath(path)
    base = os.environ.get(WORKDIR_ENV) or os.getcwd()
    resolved = os.path.normpath(os.path.join(base, path))
    if _under_ray_job_submit() and not os.environ.get(WORKDIR_ENV) and value not in _warned:
        _warned.add(value)
        log.warning("relative path %r means %s, inside this job's copy of the working dir; set %s "
                    "(or give an absolute path or s3://) to put it elsewhere", value, resolved, WORKDIR_ENV)
    return resolved


def model_reference(value: str | None) -> str | None:
    """A model given by hub id (``roberta-base``), built-in name (``tiny``), local folder or checkpoint file
    (``*.pth``, a torchvision state_dict): only local paths (a folder that exists, a checkpoint file, or a
    value written as a path) are made absolute, like :func:`absolute_path`."""
    if value is None or "://" in value:
        return value
    looks_like_path = value.startswith((".", "/", "~")) or value.endswith((".pth", ".pt")) or os.path.isdir(
        os.path.join(os.environ.get(WORKDIR_ENV) or os.getcwd(), value))
    return absolute_path(value) if looks_like_path else value


# A local path or URI field of a config: made absolute at validation (defaults included).
PathOrUri = Annotated[str, AfterValidator(absolute_path)]
# A hub id, a built-in model name or a local model folder.
ModelRef = Annotated[str, AfterValidator(model_reference)]


def comma_separated(value: Any) -> Any:
    """A list field given as one string on the command line (``--stages caption,train``) → its items."""
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    # validate_default: path defaults (./outputs/...) are made absolute like given paths.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True,
                              protected_namespaces=())


class RayConfig(StrictModel):
    """How a job connects to Ray."""

    address: str | None = Field(
        None,
        description="Ray cluster address; None starts a local cluster (or joins RAY_ADDRESS when a "
        "job is submitted with `ray job submit`)",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (None: all)")
    include_dashboard: bool = Field(True, description="start the dashboard with a local cluster")
    forward_env: list[str] = Field(
        default_factory=list,
        description="more of the driver's environment variables to pass to every Ray process of the job (e.g. "
        "[HF_HUB_OFFLINE] where nodes must not reach the hub); by default only where the object store is. "
        "Credentials are refused: nodes use their own AWS chain",
    )

    @field_validator("forward_env")
    @classmethod
    def _no_secrets(cls, names: list[str]) -> list[str]:
        from umaf.raycluster import looks_secret

        leaked = [name for name in names if looks_secret(name)]
        if leaked:
            raise ValueError(f"{', '.join(leaked)} would put a credential in a Ray runtime env, which the dashboard "
                             "shows to anyone; give nodes their own credentials (instance role, IRSA) instead")
        return names


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


def with_base_preset(job: str, data: dict[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """``extends: NAME`` in a preset or config file: start from preset NAME of the same job and apply
    this file's keys over it (nested sections merged key by key), so a family of presets (UMAF's
    Table 3 rows) states only what differs from the one they extend."""
    name = data.pop("extends", None)
    if name is None:
        return data
    if name in seen:
        raise ConfigError(f"presets extend each other in a loop: {' -> '.join((*seen, name))}")
    base = with_base_preset(job, read_yaml(preset_path(job, name)), (*seen, name))
    return _merged(base, data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
        found = [a for a in get_args(annotation) if a is not type(None)]
    else:
        found = [annotation]
    # PathOrUri | None is Optional[Annotated[str, ...]]: the type is what is annotated.
    return [get_args(a)[0] if get_origin(a) is Annotated else a for a in found]


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
        data = with_base_preset(job, read_yaml(config_file))
        source = f"config {config_file}"
    else:
        name = preset or DEFAULT_PRESET
        data = with_base_preset(job, read_yaml(preset_path(job, name)))
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
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
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
