"""The command line every job shares: ``--preset``/``--config``, named flags, ``key=value`` overrides.

A job declares which named flags it has (``--manifest URI`` is sugar for ``manifest=URI``) and gets
back a validated config, or exits with status 2 and a message naming the field before any work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

from umaf.config import ConfigError, ConfigT, describe_fields, dump_yaml, load_config


@dataclass
class Flag:
    """A named command-line flag that sets one config key."""

    name: str  # "--manifest"
    key: str  # "manifest" or "model.name"
    help: str = ""
    action: str | None = None  # "store_true" for booleans
    choices: Sequence[str] | None = None


@dataclass
class JobArgs(Generic[ConfigT]):
    config: ConfigT
    namespace: argparse.Namespace
    overrides: list[str] = field(default_factory=list)


def parse_job_args(
    job: str,
    model: type[ConfigT],
    argv: Sequence[str] | None = None,
    *,
    description: str = "",
    flags: Sequence[Flag] = (),
) -> JobArgs[ConfigT]:
    keys_help = "\n".join(describe_fields(model))
    parser = argparse.ArgumentParser(
        prog=f"jobs/{job}.py",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (override any with key=value; nested keys are dotted):\n" + keys_help,
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", help="preset name under configs/%s/ (default: tiny)" % job)
    group.add_argument("--config", help="a YAML config file (same keys as a preset)")
    for flag in flags:
        kwargs: dict[str, Any] = {"help": flag.help or f"sets {flag.key}", "dest": flag.key.replace(".", "__")}
        if flag.action:
            kwargs["action"] = flag.action
            kwargs["default"] = None
        if flag.choices:
            kwargs["choices"] = flag.choices
        parser.add_argument(flag.name, **kwargs)
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit (no work is done)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    ns = parser.parse_args(argv)
    extra = {flag.key: getattr(ns, flag.key.replace(".", "__")) for flag in flags}
    try:
        config = load_config(
            model, job, preset=ns.preset, config_file=ns.config, overrides=ns.overrides, extra=extra
        )
    except ConfigError as exc:
        print(f"jobs/{job}.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if ns.print_config:
        print(dump_yaml(config), end="")
        raise SystemExit(0)
    return JobArgs(config=config, namespace=ns, overrides=list(ns.overrides))
