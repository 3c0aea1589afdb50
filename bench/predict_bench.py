"""Predict throughput: the predict job's Ray Data pipeline vs a plain single-process loop, same model.

    python bench/predict_bench.py [--model umaf|sppscl] [--n 960] [--batch-size 64] [--actors 1] [--num-cpus 2] [--device cpu]
    python bench/predict_bench.py --run RUN --manifest URI [--captions URI]     # an existing trained run

Both sides label the same pairs with the same exported run (by default a freshly built tiny model
exported as the training loop exports its best model; `--run` for a trained one) and the same code:
the loop loads the run with `umaf.models.load_run` and calls `predict_rows` on consecutive batches
of the job's batch size (the run's eval_batch_size for SPP-SCL) over the rows the job's planner
prepares (captions joined by id). Rows/s of the pipeline are end to end (local cluster already up;
planning, actor start, model load and Parquet writes included, as a user pays them); the loop's
model load is timed separately and left out. Prints one JSON line with the ratio pipeline/loop, and
a Markdown table row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, timed_on_local_ray  # noqa: E402

from umaf.config import load_config  # noqa: E402
from umaf.predict.config import PredictConfig  # noqa: E402


def plain_loop(config: PredictConfig, device: str) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc

    from umaf.models import load_run
    from umaf.predict.pipeline import BATCH, check_locations, input_rows, plan_batches

    card = check_locations(config)
    rows, _ = input_rows(config, card)
    size = card["eval_batch_size"] if card["method"] == "sppscl" else config.actors.batch_size
    plan = plan_batches(rows, pa.array([], pa.string()), size, whole_batches=card["method"] == "sppscl")
    start = time.perf_counter()
    model = load_run(config.run, device=device, **config.storage_kw)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    ok = 0
    for index in range(int(plan[BATCH][-1].as_py()) + 1 if plan.num_rows else 0):
        batch = plan.filter(pc.equal(plan[BATCH], index)).to_pydict()
        _, image_ok = model.predict_rows(batch)
        ok += int(image_ok.sum())
    seconds = time.perf_counter() - start
    return {"rows": plan.num_rows, "seconds": round(seconds, 2), "model_load_s": round(load_s, 2),
            "rows_per_s": round(plan.num_rows / seconds, 2), "ok": ok}


def ray_pipeline(config: PredictConfig, num_cpus: int) -> dict:
    from umaf.predict.pipeline import run_predict

    summary, seconds = timed_on_local_ray(lambda: run_predict(config), num_cpus)
    return {"rows": summary["predicted"], "seconds": round(seconds, 2),
            "rows_per_s": round(summary["predicted"] / seconds, 2), "ok": summary["this_run"]["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="umaf", choices=("umaf", "sppscl"), help="method of the fresh tiny run")
    parser.add_argument("--run", help="an existing trained run (default: a fresh tiny run, exported)")
    parser.add_argument("--manifest", help="manifest to label (default: the demo set, --n pairs)")
    parser.add_argument("--captions", help="captions for a UMAF run")
    parser.add_argument("--n", type=int, default=960, help="demo pairs to label")
    parser.add_argument("--batch-size", type=int, default=64, help="UMAF forward batch (SPP-SCL: the run's eval batch)")
    parser.add_argument("--actors", type=int, default=1, help="model actors in the pipeline")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="both sides (cuda: 1 GPU per actor)")
    parser.add_argument("overrides", nargs="*", help="predict config key=value overrides")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = tempfile.mkdtemp(prefix="predict-bench-")
    run, manifest, captions = args.run, args.manifest, args.captions
    if not run:
        from umaf.data.demo import write_demo
        from umaf.data.manifest import read_manifest
        from umaf.predict.model import export_untrained_run
        from umaf.train.config import TrainConfig

        demo = write_demo(os.path.join(work, "demo"), n_train=4, n_dev=4, n_test=args.n)
        manifest, captions, run = demo["manifest"], demo["reference_captions"], os.path.join(work, "run")
        cfg = load_config(TrainConfig, "train", overrides=[f"model={args.model}", f"manifest={manifest}",
                                                          f"captions={captions}", f"out={run}"])
        export_untrained_run(cfg, read_manifest(manifest).labels["sentiment"], "sentiment", "demo")
    config = load_config(PredictConfig, "predict", preset="tiny", overrides=[
        f"run={run}", f"out={os.path.join(work, 'predictions')}", "splits=[test]",
        f"device={args.device}", f"actors.num_gpus={1 if args.device == 'cuda' else 0}",
        f"actors.batch_size={args.batch_size}", f"actors.min_actors={args.actors}", f"actors.max_actors={args.actors}",
        *([f"manifest={manifest}"] if manifest else []), *([f"captions={captions}"] if captions else []),
        *args.overrides,
    ])
    loop = plain_loop(config, args.device)
    pipeline = ray_pipeline(config, args.num_cpus)
    result = {
        **environment(),
        "model": args.model if not args.run else args.run, "device": args.device, "n": loop["rows"], "batch_size": args.batch_size,
        "actors": args.actors, "num_cpus": args.num_cpus, "loop": loop, "pipeline": pipeline,
        "ratio_pipeline_over_loop": round(pipeline["rows_per_s"] / loop["rows_per_s"], 3),
    }
    print(json.dumps(result))
    print(f"| {result['date']} | {result['machine']} | {result['model']} | {loop['rows']} | {args.batch_size} | "
          f"{args.actors} | {loop['rows_per_s']} | {pipeline['rows_per_s']} | {result['ratio_pipeline_over_loop']} | "
          f"{result['versions']} |")


if __name__ == "__main__":
    main()
