"""A Ray Tune sweep whose trials are whole ``jobs/train.py`` runs (Ray Train V2 inside Tune).

Ray 2.60's Train V2 cannot be passed to ``Tuner`` directly: each trial is a function that builds
the same ``TorchTrainer`` as ``jobs/train.py`` (:func:`umaf.train.run.run_training`) with
``TuneReportCallback``, which forwards every epoch's ``ray.train.report`` metrics to Tune so ASHA can
stop bad trials on the dev metric. Layout of the sweep folder ``<out>/<name>/``::

    tuner.pkl, experiment_state-*.json ...   Tune's own state (``--resume`` restores from it)
    runs/<trial_id>/                          each trial's train run folder (checkpoints, TensorBoard,
                                              metrics.json, predictions) — resumable by itself
    feature_cache/                            SPP-SCL frozen features, built once before any trial
    results.parquet, results.csv, results.md  one row per trial
    best_config.yaml                          the best trial's full TrainConfig (jobs/train.py --config)
    dev_metric_vs_params.png                  dev metric against each swept hyperparameter
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from typing import Any

import pyarrow as pa

from umaf import storage
from umaf.config import dump_yaml
from umaf.train.checkpoint import has_best, load_best
from umaf.train.config import TrainConfig
from umaf.tune.config import PRESET_KEY, TuneConfig
from umaf.tune.space import grid_size, nested_update, resolve_space, short_name

log = logging.getLogger("umaf.tune")

WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
TRIAL_DRIVER_CPUS = 0.05
# Tune names trial folders "<trainable>_<trial_id>_<index>_<params>_<date>", trial ids "1a2b3_00004".
TRIAL_ID_IN_PATH = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")


# --------------------------------------------------------------------------------------------
# The trial


def trial_train_config(base: dict[str, Any], params: dict[str, Any], run_uri: str,
                       preset_bases: dict[str, dict[str, Any]] | None = None) -> TrainConfig:
    """The base TrainConfig with a trial's sampled values (dotted keys) and its own run folder; a swept
    ``train_preset`` picks that preset's base config (``preset_bases``) instead."""
    if params.get(PRESET_KEY) is not None:
        base = (preset_bases or {})[params[PRESET_KEY]]
    data = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in params.items():
        if key != PRESET_KEY:
            nested_update(data, key, value)
    data["out"] = run_uri
    return TrainConfig.model_validate(data)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], runs_uri: str,
              preset_bases: dict[str, dict[str, Any]] | None = None) -> None:
    """Tune trainable: one training run of the sampled config, reporting every epoch to Tune.

    A retried or restored trial reruns this with the same trial id, hence the same run folder, and
    the training job resumes from that folder's latest checkpoint instead of starting over.
    """
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    train_and_report(trial_train_config(base, params, storage.join(runs_uri, trial_id), preset_bases))


def train_and_report(cfg: TrainConfig) -> None:
    """Inside a Tune trial: the training run ``cfg`` (resumed from its folder's latest checkpoint when
    there is one), every epoch reported to Tune. A sweep's trials and an experiment's cells run this."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from umaf.train.run import run_training

    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    if storage.exists(storage.join(cfg.out, "metrics.json"), **kw):
        # The run finished, but the driver died before Tune recorded it: hand Tune the final epoch
        # again instead of training (or even re-testing) anything.
        history = storage.read_json(storage.join(cfg.out, "history.json"), **kw)
        ray.tune.report(history[-1])
        return
    run_training(cfg, callbacks=[TuneReportCallback()])


# --------------------------------------------------------------------------------------------
# Driver


def sweep_uri(cfg: TuneConfig) -> str:
    return storage.join(cfg.out, cfg.name)


def _storage_kw(cfg: TuneConfig) -> dict[str, Any]:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}


def prepare_base(cfg: TuneConfig) -> TrainConfig:
    """Resolve the trials' common training config; make the shared inputs once.

    No trial recomputes what every trial shares: the demo data (when no manifest is given) is
    written once under the sweep, and SPP-SCL's frozen-feature cache is built here, before any
    trial starts, into ``<sweep>/feature_cache`` which every trial then reads.
    """
    from umaf.train.run import check_locations, pin_caption_fingerprint, prepare_datasets, resolve_inputs

    base = cfg.base_train_config()
    base = base.model_copy(update={"out": storage.join(sweep_uri(cfg), "shared")})
    base = resolve_inputs(base)  # the demo dataset, when no manifest was given
    check_locations(base)  # inputs exist, the sweep folder is writable: said before any trial starts
    base = pin_caption_fingerprint(base)  # every trial reads the same caption set (several: said here, once)
    if base.model == "sppscl":
        sppscl = base.sppscl.model_copy(update={"cache_dir": base.sppscl.cache_dir or storage.join(sweep_uri(cfg), "feature_cache")})
        base = base.model_copy(update={"sppscl": sppscl})
        if sppscl.feature_cache != "off":
            log.info("building the SPP-SCL frozen-feature cache once for all trials: %s", sppscl.cache_dir)
            prepare_datasets(base)
    return base


def preset_bases(cfg: TuneConfig, base: TrainConfig) -> dict[str, dict[str, Any]]:
    """Each swept preset's trial config, on the base's resolved data and sweep folder."""
    shared = {"out": base.out, "manifest": base.manifest, "captions": base.captions,
              "caption_fingerprint": base.caption_fingerprint}
    return {preset: cfg.base_train_config(preset).model_copy(update=shared).model_dump(mode="json")
            for preset in cfg.swept_presets()}


def default_max_concurrent(base: TrainConfig) -> int:
    """As many trials as the cluster's CPUs/GPUs hold at once: more would only wait for workers."""
    import ray

    resources = ray.cluster_resources()
    per_trial_cpu = base.num_workers * base.cpus_per_worker + TRIAL_DRIVER_CPUS
    limit = math.floor(resources.get("CPU", 1) / per_trial_cpu)
    if base.use_gpu:
        per_trial_gpu = base.num_workers * (base.gpus_per_worker or 1)
        limit = min(limit, math.floor(resources.get("GPU", 0) / per_trial_gpu))
    return max(1, limit)


def build_tuner(cfg: TuneConfig, base: TrainConfig, resume: bool = False):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    space = resolve_space(cfg.model, cfg.search.space)
    metric = f"dev_{cfg.metric or base.resolved_best_metric(_dataset_name(base))}"
    trainable = ray.tune.with_parameters(
        run_trial, base=base.model_dump(mode="json"), runs_uri=storage.join(sweep_uri(cfg), "runs"),
        preset_bases=preset_bases(cfg, base),
    )
    # The trial function only drives Train: its workers hold the CPUs/GPUs, so the trial itself asks
    # for a sliver (Tune refuses an empty request) and max_concurrent_trials bounds how many run at once.
    trainable = ray.tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS})
    fs, path = storage.resolve(cfg.out, **_storage_kw(cfg))
    if resume:
        # With a filesystem given, Tune wants the path on it (``bucket/prefix/name``), not the s3:// URI:
        # pyarrow's S3FileSystem refuses URIs ("Expected a filesystem path, got a URI").
        restore_path = f"{path.rstrip('/')}/{cfg.name}" if storage.is_s3(cfg.out) else os.path.join(path, cfg.name)
        # Finished trials stay finished; unfinished (and errored) ones continue from their run folder.
        return ray.tune.Tuner.restore(
            restore_path, trainable, resume_unfinished=True, resume_errored=True,
            storage_filesystem=fs if storage.is_s3(cfg.out) else None,
        )
    # ASHA stops a trial the moment it reports max_t, which would kill a trial at its last epoch
    # before it writes its test metrics; one past the last epoch lets full-length trials end by
    # themselves (the rungs below max_t are the same).
    max_t = cfg.scheduler.max_epochs or base.epochs + 1
    if cfg.scheduler.kind == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration", max_t=max_t,
            grace_period=min(cfg.scheduler.grace_period, max_t), reduction_factor=cfg.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    if cfg.search.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise RuntimeError("search.algorithm=optuna needs the optuna extra: pip install 'umaf[optuna]'") from exc
    concurrency = cfg.max_concurrent_trials or default_max_concurrent(base)
    # The cap must be on the search algorithm itself: Tune applies ``max_concurrent_trials`` only by
    # wrapping a ``Searcher`` in a ConcurrencyLimiter, and ignores it (with a warning) for a
    # ``BasicVariantGenerator`` — every grid point then started at once. The generator enforces its
    # own ``max_concurrent``; a Searcher is wrapped here, so each algorithm is capped the same way.
    if cfg.search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter

        search_alg = ConcurrencyLimiter(OptunaSearch(seed=cfg.search.seed), max_concurrent=concurrency)
    else:
        search_alg = BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=concurrency)
    return make_tuner(
        trainable, param_space={key: dist.to_tune() for key, dist in space.items()}, name=cfg.name, out=cfg.out,
        storage_kw=_storage_kw(cfg), metric=metric, scheduler=scheduler, search_alg=search_alg,
        num_samples=cfg.search.num_samples, max_failures=cfg.trial_max_failures,
        callbacks=[trial_progress_callback(cfg.model, list(space), metric, grid_size(space) * cfg.search.num_samples)],
    )


def make_tuner(trainable, *, param_space: dict[str, Any], name: str, out: str, storage_kw: dict[str, Any],
               metric: str, scheduler, search_alg, num_samples: int, max_failures: int, callbacks: list):
    """The ``Tuner`` of a sweep or an experiment: Tune's state at ``<out>/<name>``, failed trials retried
    ``max_failures`` times, one log line per trial event (the callbacks) instead of Tune's table."""
    import ray.tune

    fs, path = storage.resolve(out, **storage_kw)
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler, search_alg=search_alg,
                                        num_samples=num_samples),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.tune.FailureConfig(max_failures=max_failures),
            # Tune's periodic status table would repeat every trial every half minute; one line per
            # trial event reads better (and the dashboard's Tune view has the table).
            verbose=0,
            callbacks=callbacks,
        ),
    )


def trial_progress_callback(model: str, keys: list[str], metric: str, total: int | None, *, noun: str = "trial",
                            name_of=None, end_note=None):
    """A Tune callback logging one line when a trial starts, reports an epoch, and ends (with the count
    done and an ETA). ``name_of(trial)`` names a trial (default: its id and swept values);
    ``end_note(trial)`` adds to its end line (an experiment's cell: its test figures)."""
    import time

    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self):
            self.started = time.time()
            self.finished = 0

        def _name(self, trial) -> str:
            if name_of is not None:
                return name_of(trial)
            params = ", ".join(f"{short_name(model, k)}={trial.config.get(k)}" for k in keys)
            return f"trial {trial.trial_id} ({params})"

        def on_trial_start(self, iteration, trials, trial, **info):
            log.info("%s started", self._name(trial))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else value
            # Epochs from 1, as the Train workers' epoch lines count them (reports hold them from 0).
            log.info("%s epoch %d: %s %s", self._name(trial), int(result.get("epoch", -1)) + 1, metric, shown)

        def _ended(self, trial, how: str) -> None:
            self.finished += 1
            elapsed = time.time() - self.started
            eta = ""
            if total and self.finished < total:
                eta = f", ETA {elapsed / self.finished * (total - self.finished):.0f}s"
            note = ""
            if end_note is not None:
                with contextlib.suppress(Exception):  # a note must never break the run
                    note = end_note(trial) or ""
            log.info("%s %s%s; %d/%s %ss done in %.0fs%s", self._name(trial), how, note, self.finished,
                     total or "?", noun, elapsed, eta)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # Finished its epochs, or stopped by ASHA after this one: results.md says which.
            self._ended(trial, f"ended after epoch {int(trial.last_result.get('epoch', -1)) + 1}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "FAILED")

    return TrialProgress()


def _dataset_name(base: TrainConfig) -> str:
    from umaf.data.manifest import read_manifest

    kw = {"endpoint_url": base.storage.endpoint_url, "region": base.storage.region}
    return read_manifest(base.manifest, **kw).dataset


# --------------------------------------------------------------------------------------------
# Results


def _trial_status(result, max_epochs: int, epochs: int) -> str:
    if result.error is not None:
        return "failed"
    return "completed" if epochs >= max_epochs else "stopped_early"


def evaluate_best_on_test(cfg: TrainConfig) -> dict[str, Any] | None:
    """Test metrics of a run's best model (for trials ASHA stopped before their own test pass)."""
    import torch

    from umaf.train.loop import EvalSplits, split_table
    from umaf.train.method import get_method
    from umaf.train.metrics import classification_metrics
    from umaf.train.run import prepare_datasets

    kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
    if not has_best(cfg.out, **kw):
        return None
    data = prepare_datasets(cfg)
    method = get_method(cfg.model)
    torch.manual_seed(cfg.seed)
    model = method.build_model(cfg, len(data["label_names"]))
    load_best(cfg.out, model, **kw)
    # The run's reported evaluation protocol (cfg.eval.protocol), as its own test pass would have used.
    tables = {split: split_table(data["refs"][split]) for split in ("train", "dev", "test")}
    splits = EvalSplits(method, cfg, {"source_positions": data["source_positions"], "context": data["context"]}, tables)
    pred = splits.evaluate(model, "test", cfg.eval.protocol, torch.device("cpu"), contextlib.nullcontext)
    return classification_metrics(pred["label"], pred["pred"], data["label_names"])


def results_rows(cfg: TuneConfig, base: TrainConfig, grid) -> list[dict[str, Any]]:
    """One row per trial: swept values, status, epochs, best dev metric, test metrics, checkpoint."""
    space = resolve_space(cfg.model, cfg.search.space)
    metric_name = cfg.metric or base.resolved_best_metric(_dataset_name(base))
    dev_key = f"dev_{metric_name}"
    max_epochs = min(cfg.scheduler.max_epochs or base.epochs, base.epochs)
    runs_uri = storage.join(sweep_uri(cfg), "runs")
    kw = _storage_kw(cfg)
    rows = []
    for result in grid:
        match = TRIAL_ID_IN_PATH.search(os.path.basename(result.path.rstrip("/"))) if result.path else None
        trial_id = match.group(1) if match else None
        trial_id = (result.metrics or {}).get("trial_id") or trial_id
        run_uri = storage.join(runs_uri, trial_id) if trial_id else None
        # Epochs are those Tune saw reported (the last epoch index + 1): a trial ASHA stops can still
        # finish the epoch in flight before its Train run is torn down, and a trial restored after a
        # driver restart may report its last epoch again, so neither the run's history length nor
        # the number of Tune results is the count the scheduler granted.
        frame = result.metrics_dataframe
        seen = frame.dropna(subset=[dev_key]) if frame is not None and dev_key in frame else None
        if seen is not None and len(seen):
            history = seen[dev_key].tolist()
            epochs = int(seen["epoch"].max()) + 1
        else:
            history_uri = storage.join(run_uri, "history.json") if run_uri else None
            records = storage.read_json(history_uri, **kw) if history_uri and storage.exists(history_uri, **kw) else []
            history = [h[dev_key] for h in records if h.get(dev_key) is not None]
            epochs = len(history)
        row: dict[str, Any] = {short_name(cfg.model, key): (result.config or {}).get(key) for key in space}
        row.update(
            trial_id=trial_id,
            status=_trial_status(result, max_epochs, epochs),
            epochs=epochs,
            **{f"best_{dev_key}": max(history) if history else None},
            error=(str(result.error).strip().splitlines()[-1][:500] if result.error is not None else None),
            run_uri=run_uri,
            checkpoint_uri=storage.join(run_uri, "best") if run_uri and has_best(run_uri, **kw) else None,
        )
        test = None
        if run_uri and storage.exists(storage.join(run_uri, "metrics.json"), **kw):
            test = storage.read_json(storage.join(run_uri, "metrics.json"), **kw).get("test")
        elif row["checkpoint_uri"]:
            params = {key: (result.config or {}).get(key) for key in space}
            test = evaluate_best_on_test(trial_train_config(base.model_dump(mode="json"), params, run_uri,
                                                            preset_bases(cfg, base)))
        # f1_of_weighted_pr: the UMAF paper's F1 (harmonic mean of weighted P and R), beside sklearn's F1s.
        for name in ("accuracy", "macro_f1", "weighted_f1", "f1_of_weighted_pr"):
            row[f"test_{name}"] = float(test[name]) if test and name in test else None
        rows.append(row)
    rows.sort(key=lambda r: (r[f"best_{dev_key}"] is None, -(r[f"best_{dev_key}"] or 0.0)))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    columns = [c for c in rows[0] if c not in ("run_uri", "error")]
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_dev_metric(rows: list[dict[str, Any]], params: list[str], metric_column: str) -> bytes:
    """PNG: the best dev metric of each trial against each swept hyperparameter (one panel each)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4 * max(1, len(params)), 3.4), squeeze=False)
    for ax, param in zip(axes[0], params):
        points = [(r[param], r[metric_column], r["status"]) for r in rows if r[metric_column] is not None]
        for status, marker in (("completed", "o"), ("stopped_early", "x"), ("failed", "s")):
            xs = [p[0] for p in points if p[2] == status]
            ys = [p[1] for p in points if p[2] == status]
            if xs:
                ax.scatter([str(x) if isinstance(x, str) else x for x in xs], ys, marker=marker, label=status)
        ax.set_xlabel(param)
        ax.set_ylabel(metric_column)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_results(cfg: TuneConfig, base: TrainConfig, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Parquet + CSV + Markdown table, best config YAML and the plot, into the sweep folder."""
    import csv
    import io

    import pyarrow.parquet as pq

    kw = _storage_kw(cfg)
    root = sweep_uri(cfg)
    params = [short_name(cfg.model, key) for key in resolve_space(cfg.model, cfg.search.space)]
    metric_column = next(c for c in rows[0] if c.startswith("best_dev_")) if rows else None
    table = pa.Table.from_pylist(rows)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(storage.join(root, "results.parquet"), buffer.getvalue().to_pybytes(), **kw)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text_atomic(storage.join(root, "results.csv"), text.getvalue(), **kw)
    summary = markdown_table(rows)
    storage.write_text_atomic(storage.join(root, "results.md"), summary, **kw)
    paths = {"results": storage.join(root, "results.parquet"), "summary": summary}
    best = next((r for r in rows if r["status"] != "failed" and r[metric_column] is not None), None) if rows else None
    if best is not None:
        swept = {key: best[short_name(cfg.model, key)] for key in resolve_space(cfg.model, cfg.search.space)}
        best_cfg = trial_train_config(base.model_dump(mode="json"), swept, storage.join(root, "best_run"),
                                      preset_bases(cfg, base))
        header = (f"# Best trial {best['trial_id']} of sweep {root}: {metric_column}={best[metric_column]:.4f}\n"
                  f"# Train it: python jobs/train.py --config best_config.yaml out=<run folder>\n")
        storage.write_text_atomic(storage.join(root, "best_config.yaml"), header + dump_yaml(best_cfg), **kw)
        paths["best_config"] = storage.join(root, "best_config.yaml")
    if rows and metric_column:
        storage.write_bytes_atomic(storage.join(root, "dev_metric_vs_params.png"),
                                   plot_dev_metric(rows, params, metric_column), **kw)
        paths["plot"] = storage.join(root, "dev_metric_vs_params.png")
    return paths


def check_sweep_locations(cfg: TuneConfig, resume: bool) -> None:
    """Given inputs exist, the sweep folder is writable, and a sweep to resume is there: a
    :class:`~umaf.errors.UserError` that says which, before any Ray work."""
    kw = _storage_kw(cfg)
    if cfg.manifest:
        storage.require(cfg.manifest, "manifest", "make one with jobs/prepare.py, or fix --manifest", **kw)
    if cfg.captions:
        storage.require(cfg.captions, "captions", "make them with jobs/caption.py, or fix --captions", **kw)
    if resume:
        storage.require(storage.join(sweep_uri(cfg), "tuner.pkl"), "sweep state",
                        f"there is no sweep to resume at {sweep_uri(cfg)}; drop --resume to start it, or fix --out/name",
                        **kw)
    storage.require_folder(sweep_uri(cfg), "sweep folder", **kw)


def run_sweep(cfg: TuneConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep; write and return its results.

    The Tune driver runs as a Ray task pinned to this node whose environment names this cluster in
    ``RAY_ADDRESS``. Trials, their Train controllers and Train's detached ``PlacementGroupCleaner``
    inherit it. Without it the cleaner finds its cluster by scanning the machine, fails wherever
    several Ray clusters share a machine (CI, a laptop with a test cluster up), and then the
    placement group of every trial ASHA stops leaks and starves the next trials.
    """
    resume = resume or cfg.resume
    check_sweep_locations(cfg, resume)  # before Ray starts
    return run_tune_driver(cfg.ray, cfg.worker_start_timeout_s, _run_sweep_here, cfg, resume)


def run_tune_driver(ray_cfg, worker_start_timeout_s: float, fn, *args):
    """Join or start Ray and run ``fn(*args)`` (the Tune driver) as a task pinned to this node, whose
    environment names this cluster and the trials' worker-start timeout (see :func:`run_sweep`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from umaf.raycluster import ray_connection

    # Trial workers that cannot be placed fail after worker_start_timeout_s (no endless wait), and
    # the dashboard stays on: Train inside Tune needs it.
    timeout = str(int(worker_start_timeout_s))
    with ray_connection(ray_cfg, {WORKER_START_TIMEOUT_ENV: timeout}, dashboard=True):
        context = ray.get_runtime_context()
        driver = ray.remote(num_cpus=0, max_retries=0)(fn).options(
            # Trials inherit these, also when this driver joined a running cluster (pipeline, tests).
            runtime_env=trial_runtime_env(worker_start_timeout_s, context.gcs_address),
            # The output folder may be a local path of this node.
            scheduling_strategy=NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False),
        )
        return ray.get(driver.remote(*args))


def trial_runtime_env(worker_start_timeout_s: float, gcs_address: str) -> dict[str, Any]:
    """The Tune driver task's runtime env, which its trials and their Train runs (sweep or experiment
    cells) inherit."""
    from umaf.raycluster import checked_runtime_env

    return checked_runtime_env({"RAY_ADDRESS": gcs_address, WORKER_START_TIMEOUT_ENV: str(int(worker_start_timeout_s))})


def _run_sweep_here(cfg: TuneConfig, resume: bool) -> dict[str, Any]:
    from umaf.cli import setup_logging

    setup_logging()
    base = prepare_base(cfg)
    kw = _storage_kw(cfg)
    storage.makedirs(sweep_uri(cfg), **kw)
    storage.write_text_atomic(storage.join(sweep_uri(cfg), "sweep_config.yaml"), dump_yaml(cfg), **kw)
    tuner = build_tuner(cfg, base, resume=resume)
    grid = tuner.fit()
    rows = results_rows(cfg, base, grid)
    paths = write_results(cfg, base, rows)
    return {"rows": rows, **paths}
