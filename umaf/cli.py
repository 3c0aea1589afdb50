"""The command line every job shares: ``--preset``/``--config``, named flags, ``key=value`` overrides.

A job declares which named flags it has (``--manifest URI`` is sugar for ``manifest=URI``) and gets
back a validated config, or exits with status 2 and a message naming the field before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from umaf.config import WORKDIR_ENV, ConfigError, ConfigT, describe_fields, dump_yaml, load_config
from umaf.errors import UserError

DEBUG_ENV = "UMAF_DEBUG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
        epilog="config keys (override any with key=value; nested keys are dotted):\n" + keys_help
        + f"\n\nRelative local paths are relative to the working directory (or ${WORKDIR_ENV} when set).",
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
    if not any(flag.name == "--debug" for flag in flags):
        parser.add_argument(
            "--debug", action="store_true", help=f"show the traceback of input errors too (same as {DEBUG_ENV}=1)"
        )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    # Intermixed: flags may come after overrides (`... ray.address=X --resume`), as users type them.
    ns = parser.parse_intermixed_args(argv)
    if getattr(ns, "debug", None) is True and not any(flag.name == "--debug" for flag in flags):
        os.environ[DEBUG_ENV] = "1"
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


def setup_logging() -> None:
    """The job's log lines on stderr, one format for every job (a no-op when logging is set up)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def reported_errors(job: str) -> Iterator[None]:
    """Bad input ends the job with one line naming what and what to do, and exit status 2.

    :class:`~umaf.errors.UserError` (missing or unreachable URIs, refused credentials, a task the
    manifest lacks...), :class:`~umaf.config.ConfigError` and a plain ``FileNotFoundError`` are
    reported so; anything else is a bug: its traceback is printed and the job exits with status 1.
    ``--debug``/``UMAF_DEBUG=1`` lets every error through with its traceback.
    """
    try:
        yield
    except (UserError, ConfigError, FileNotFoundError) as exc:
        if debugging():
            raise
        cause = getattr(exc, "cause", None)  # raised inside a Ray task: Ray wraps it, the cause says it
        message = str(cause if isinstance(cause, BaseException) else exc).strip()
        print(f"jobs/{job}.py: error: {message}\n(--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception:
        # A bug: print its traceback here rather than leave it to sys.excepthook. A driver connected to
        # a Ray cluster has Ray's hook, which first reports the error to the GCS and, when the core
        # worker is already shutting down, exits the process before the traceback is printed.
        traceback.print_exc()
        sys.stderr.flush()
        raise SystemExit(1) from None


T = TypeVar("T")


def run_ray_job(job: str, ray_cfg: Any, check: Callable[[], Any], work: Callable[[], T]) -> T:
    """A Ray job's body: ``check()`` its inputs before Ray starts (a wrong URI is said in a second),
    join or start Ray, ``work()``, and shut Ray down if this call started it; bad input in either
    ends the job as :func:`reported_errors` says."""
    from umaf.raycluster import ray_connection

    with reported_errors(job):
        check()
    with ray_connection(ray_cfg), reported_errors(job):
        return work()


def run_script(main: Callable[[], Any]) -> None:
    """A job's ``__main__``: run ``main()`` and exit with the status it chose.

    A failed job exits by ``SystemExit`` (:func:`reported_errors`). Left to the interpreter, that
    status is not reliable on a Ray driver: a Ray thread that touches the core worker during or after
    Ray's shutdown ends the process with status 1 ("The core worker has already been shutdown ...
    The process will exit"). So the status is handed to the OS directly, once the output is flushed,
    and a failed job joined to a cluster does not disconnect first
    (:func:`umaf.raycluster.ray_connection`): the cluster sees its driver leave.
    """
    from umaf.raycluster import exit_hard_on_failure

    exit_hard_on_failure()
    try:
        main()
        return
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if code == 0:
            raise
        if not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a bug outside reported_errors: its traceback, then status 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
