"""``jobs/experiment.py``'s driver: every cell of an experiment as a training run inside one Ray Tune run,
then the statistics and the report from the runs' per-item test predictions.

The Tune run is the sweep machinery of :mod:`umaf.tune.sweep` (the pinned driver task, the Tuner, the
per-trial progress lines): one trial per trained cell (a grid over the cell ids), FIFO, at most
``max_concurrent_cells`` at once (default: what the cluster's CPUs/GPUs hold), each cell's Train run
asking for its own workers (fractional GPUs: ``resources.gpus_per_worker=0.25``). A trial trains its
cell into ``runs/<row>/<dataset>/seed<k>`` (resuming from that folder's checkpoint when it has one),
then evaluates the caption-reliance perturbations of that run, if the experiment has any, as one Ray
task with the cell's CPU/GPU. A failed trial is retried ``cell_max_failures`` times, then recorded as
failed; the others go on. Layout of ``<out>/<name>/``::

    experiment.yaml                    the resolved experiment config
    runs/<row>/<dataset>/seed<k>/      each cell's run folder (a train run, or a perturbation's predictions)
    tune/<run>/                        Tune's state of each invocation (a --resume is a new Tune run)
    feature_cache/                     frozen-encoder features shared by every cell
    results.parquet                    one row per cell: row, dataset, seed, status, every metric, run URI
    summary.parquet                    one row per row × dataset: means, stds, CIs, paired tests, methods
    report.md, report.tex              the paper-style table(s)
    figures/*.png                      per-class F1 per row; each row's confusion matrix
"""

from __future__ import annotations

import logging
import time
from typing import Any

from umaf import storage
from umaf.config import dump_yaml
from umaf.errors import UserError
from umaf.experiment.config import Cell, ExperimentConfig

log = logging.getLogger("umaf.experiment")

METRICS_FILE = "metrics.json"


def experiment_uri(cfg: ExperimentConfig) -> str:
    return storage.join(cfg.out, cfg.name)


def _kw(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}


def cell_uri(cfg: ExperimentConfig, cell: Cell) -> str:
    return storage.join(experiment_uri(cfg), "runs", cell.row, cell.dataset, f"seed{cell.seed}")


def check_locations(cfg: ExperimentConfig, resume: bool) -> None:
    """Inputs exist, the experiment folder is writable, and there is (or is not) an experiment to resume:
    a :class:`UserError` that says which, before Ray starts."""
    kw = _kw(cfg)
    for name, data in cfg.datasets.items():
        if data.manifest:
            storage.require(data.manifest, f"datasets.{name}.manifest", "make one with jobs/prepare.py", **kw)
        if data.captions:
            storage.require(data.captions, f"datasets.{name}.captions", "make them with jobs/caption.py", **kw)
    root = experiment_uri(cfg)
    there = storage.exists(storage.join(root, "experiment.yaml"), **kw)
    if resume and not there:
        raise UserError(f"there is no experiment to resume at {root}; drop --resume to start it, or fix --out/name")
    if there and not resume:
        raise UserError(f"{root} already holds an experiment: add --resume to run only its missing or failed cells "
                        "(and rewrite its results and report), or choose another --out or name=")
    storage.require_folder(root, "experiment folder", **kw)


def run_experiment(cfg: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the experiment; write and return its results, summary and report."""
    from umaf.tune.sweep import run_tune_driver

    resume = resume or cfg.resume
    check_locations(cfg, resume)  # before Ray starts, like the checks below
    configs = cell_configs(cfg)
    if resume:
        _check_resumed_cells(configs, _kw(cfg))
        if not cells_to_run(cfg, configs):  # every cell finished: only the statistics and report, no Ray
            from umaf.experiment.report import write_outputs

            log.info("experiment %s: every cell has finished; writing its results and report", cfg.name)
            return write_outputs(cfg)
    return run_tune_driver(cfg.ray, cfg.worker_start_timeout_s, _run_here, cfg, configs)


def cells_to_run(cfg: ExperimentConfig, configs: dict[str, dict[str, Any]]) -> list[str]:
    """Trained cells without a finished run, and those whose perturbation cells are not all finished."""
    kw = _kw(cfg)
    plan = perturbation_plan(cfg)
    finished = {key for key, c in configs.items() if storage.exists(storage.join(c["out"], METRICS_FILE), **kw)}
    perturbing = {key for key, items in plan.items()
                  if any(not storage.exists(storage.join(i["out"], METRICS_FILE), **kw) for i in items)}
    return [key for key in configs if key not in finished or key in perturbing]


# --------------------------------------------------------------------------------------------
# Inside the cluster


def cell_configs(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Every trained cell's TrainConfig (as JSON), its run folder set, the demo data (datasets without a
    manifest) written once, and frozen-encoder caches pointed at one folder shared by every cell."""
    from umaf.data.demo import write_demo
    from umaf.train.run import pin_caption_fingerprint

    kw = _kw(cfg)
    root = experiment_uri(cfg)
    demo = None
    pinned: dict[str, str] = {}
    cache = storage.join(root, "feature_cache")
    out: dict[str, dict[str, Any]] = {}
    for cell in cfg.cells():
        if cfg.rows[cell.row].perturb is not None:
            continue
        train = cfg.cell_train_config(cell)
        update: dict[str, Any] = {"out": cell_uri(cfg, cell)}
        if train.manifest is None:
            if demo is None:
                demo_dir = storage.join(root, "demo")
                if not storage.exists(storage.join(demo_dir, "manifest"), **kw):
                    write_demo(demo_dir, **kw)
                demo = {"manifest": storage.join(demo_dir, "manifest"),
                        "captions": storage.join(demo_dir, "reference_captions")}
            update["manifest"] = demo["manifest"]
            update["captions"] = train.captions or demo["captions"]
        # Feature caches are keyed by what they hold, so every cell can share one folder.
        update["umaf"] = train.umaf.model_copy(update={"image_cache_dir": train.umaf.image_cache_dir or cache,
                                                       "text_cache_dir": train.umaf.text_cache_dir or cache})
        update["sppscl"] = train.sppscl.model_copy(update={"cache_dir": train.sppscl.cache_dir or cache})
        train = train.model_copy(update=update)
        # The caption set is chosen here, once per captions folder, not when each cell starts: every
        # cell of a dataset reads the same set, and a resumed cell is compared against the set it ran.
        if train.reads_captions and train.caption_fingerprint is None:
            if train.captions not in pinned:
                pinned[train.captions] = pin_caption_fingerprint(train).caption_fingerprint
            train = train.model_copy(update={"caption_fingerprint": pinned[train.captions]})
        out[cell.key] = train.model_dump(mode="json")
    return out


def perturbation_plan(cfg: ExperimentConfig) -> dict[str, list[dict[str, Any]]]:
    """Trained cell id → the perturbation cells evaluated from its run."""
    plan: dict[str, list[dict[str, Any]]] = {}
    for cell in cfg.cells():
        row = cfg.rows[cell.row]
        if row.perturb is not None:
            source = Cell(row.of, cell.dataset, cell.seed)
            plan.setdefault(source.key, []).append({"kind": row.perturb, "out": cell_uri(cfg, cell), "seed": cell.seed})
    return plan


def run_cell(params: dict[str, Any], *, configs: dict[str, dict[str, Any]],
             perturbations: dict[str, list[dict[str, Any]]]) -> None:
    """Tune trainable: train one cell (reporting every epoch to Tune), then evaluate its perturbations."""
    import ray

    from umaf.experiment.perturb import evaluate_perturbations
    from umaf.train.config import TrainConfig
    from umaf.tune.sweep import train_and_report

    cfg = TrainConfig.model_validate(configs[params["cell"]])
    train_and_report(cfg)
    todo = perturbations.get(params["cell"])
    if todo:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        kw = {"endpoint_url": cfg.storage.endpoint_url, "region": cfg.storage.region}
        task = ray.remote(evaluate_perturbations).options(
            num_cpus=cfg.cpus_per_worker, num_gpus=(cfg.gpus_per_worker or 1) if cfg.use_gpu else 0, max_retries=0,
            # Outside the trial's placement group (a sliver of CPU for the trial itself), like Train's workers.
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
        ray.get(task.remote(cfg.out, todo, kw))


def _check_resumed_cells(configs: dict[str, dict[str, Any]], kw: dict[str, Any]) -> None:
    """A cell that already ran must have run this config: a changed experiment would mix two settings.
    Keys the finished run's config.yaml lacks (added to the code since) are not held against it."""
    import yaml

    from umaf.tune.config import _flatten

    for key, config in configs.items():
        uri = storage.join(config["out"], "config.yaml")
        if not storage.exists(uri, **kw):
            continue
        ran = _flatten(yaml.safe_load(storage.read_text(uri, **kw)) or {})
        now = _flatten(_normal(config))
        differ = [f"{k}: ran {ran[k]!r}, now {now[k]!r}" for k in sorted(ran)
                  if k in now and not _operational(k) and _normal(ran[k]) != now[k]]
        if differ:
            raise UserError(f"cell {key} ran with other settings than the experiment now gives ({'; '.join(differ[:4])}): "
                            f"restore them, delete {config['out']}, or run the new settings under another name=")


# Keys that say where and how a cell runs, not what it trains: a resumed experiment may change them
# (another cluster, another cache folder).
OPERATIONAL = {"out", "log_every_s", "prefetch_batches", "preprocess_concurrency", "max_failures", "controller_failure_limit",
               "checkpoints_to_keep", "num_workers", "use_gpu", "cpus_per_worker", "gpus_per_worker",
               "node_resource"}  # (dropped on a one-machine Ray: config.yaml records None)


def _operational(key: str) -> bool:
    top, last = key.split(".")[0], key.split(".")[-1]
    return top in ("ray", "storage") or key in OPERATIONAL or last.endswith("cache_dir") or last == "encoder_cache"


def _normal(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def _prebuild_caches(configs: dict[str, dict[str, Any]], keys: list[str]) -> None:
    """Frozen-encoder features once per dataset before the cells start (cells on the same rows then
    read them instead of racing to build the same cache)."""
    from umaf.train.config import TrainConfig
    from umaf.train.run import prepare_datasets

    done: set[tuple] = set()
    for key in keys:
        train = TrainConfig.model_validate(configs[key])
        caches = ((train.model == "sppscl" and train.sppscl.use_feature_cache)
                  or (train.model == "umaf" and (train.umaf.caches_image_tokens or train.umaf.caches_text_states)))
        if not caches:
            continue
        # What the cached features depend on (rows differing in other settings share them).
        section = train.umaf if train.model == "umaf" else train.sppscl
        inputs = ("encoder", "tokenizer", "max_length", "caption_field_shares", "backbone", "use_captions",
                  "image_encoder", "text_encoder", "image_size", "train_encoder", "train_image_encoder")
        what = str((train.manifest, train.captions, train.model, train.task, train.max_rows_per_split,
                    train.missing_caption, _normal({k: getattr(section, k) for k in inputs if hasattr(section, k)})))
        if what in done:
            continue
        done.add(what)
        log.info("building the frozen-encoder features of %s once for its cells", key)
        prepare_datasets(train)


def _run_here(cfg: ExperimentConfig, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import ray.tune
    from ray.tune.search import BasicVariantGenerator

    from umaf.cli import setup_logging
    from umaf.tune.sweep import (TRIAL_DRIVER_CPUS, default_max_concurrent, make_tuner,
                                 trial_progress_callback)

    setup_logging()
    kw = _kw(cfg)
    root = experiment_uri(cfg)
    storage.makedirs(root, **kw)
    storage.write_text_atomic(storage.join(root, "experiment.yaml"), dump_yaml(cfg), **kw)
    plan = perturbation_plan(cfg)
    to_run = cells_to_run(cfg, configs)
    errors: dict[str, str] = {}
    if to_run:
        log.info("experiment %s: %d of %d trained cells to run, at %s", cfg.name, len(to_run), len(configs), root)
        _prebuild_caches(configs, to_run)
        from umaf.train.config import TrainConfig

        sample = TrainConfig.model_validate(configs[to_run[0]])
        concurrency = cfg.max_concurrent_cells or default_max_concurrent(sample)
        trainable = ray.tune.with_parameters(run_cell, configs=configs, perturbations=plan)
        trainable = ray.tune.with_resources(trainable, {"CPU": TRIAL_DRIVER_CPUS})
        metric = f"dev_{sample.best_metric or 'weighted_f1'}"

        def end_note(trial) -> str:
            uri = storage.join(configs[trial.config["cell"]]["out"], METRICS_FILE)
            test = storage.read_json(uri, **kw).get("test", {}) if storage.exists(uri, **kw) else {}
            return (f": test accuracy {test['accuracy']:.4f}, weighted F1 {test['weighted_f1']:.4f}"
                    if "accuracy" in test else "")

        tuner = make_tuner(
            trainable, param_space={"cell": ray.tune.grid_search(to_run)}, name=time.strftime("run-%Y%m%d-%H%M%S"),
            out=storage.join(root, "tune"), storage_kw=kw, metric=metric,
            scheduler=ray.tune.schedulers.FIFOScheduler(),
            search_alg=BasicVariantGenerator(max_concurrent=concurrency), num_samples=1,
            max_failures=cfg.cell_max_failures,
            callbacks=[trial_progress_callback(cfg.model, ["cell"], metric, len(to_run), noun="cell",
                                               name_of=lambda t: f"cell {t.config.get('cell')}", end_note=end_note)],
        )
        for result in tuner.fit():
            if result.error is not None:
                errors[(result.config or {}).get("cell", "?")] = str(result.error).strip().splitlines()[-1][:500]
    from umaf.experiment.report import write_outputs

    return write_outputs(cfg, errors)
