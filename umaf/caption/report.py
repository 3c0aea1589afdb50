"""The quality report of a caption set: what a researcher checks before training on it.

Written after every caption run (and by ``jobs/caption.py --report URI`` for an existing set) under
``<captions>/_reports/<fingerprint>/``: ``quality.json`` (the figures), ``report.md`` (the same, to
read, with sample rows) and ``quality.png`` (length distributions and statuses). The run's
``_summary.json`` carries the figures too.

The figures are over the set's *current* rows: per id, its latest ``ok`` row if it has one, else its
latest row (what a retry has not fixed yet). For each of the three fields, over ``ok`` rows: the empty
rate and the length distribution (characters); the ``invalid`` and ``error`` rates with their most
frequent reasons (paths and numbers masked, so one reason is one line); captions identical for
different images (a field value, or all three together, shared by rows whose image hashes differ:
the sign of a model answering by rote); tokens generated; and a few sample rows (seeded).

A large folder is reported from a sample: files drawn at random (seeded) up to ``max_bytes`` of
Parquet (128 MB, some 10^5 captions), so the report of a 10M-row set stays a driver-sized read; the
report says how many files and bytes it read of how many.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umaf import storage
from umaf.caption.fields import CAPTION_FIELDS
from umaf.caption.store import (
    CAPTION_SCHEMA,
    STATUS_ERROR,
    STATUS_INVALID,
    STATUS_OK,
    UNVERSIONED,
    caption_sets,
    data_files,
    fingerprint_filter,
    latest_per_id,
    read_rows,
)

MAX_BYTES = 128 * 2**20
TOP_REASONS = 5
SAMPLES = 5
SAMPLE_CHARS = 300
_PATH = re.compile(r"(?:[a-z][a-z0-9+.-]*://|/)[^\s()'\"]+")
_NUMBER = re.compile(r"\d+")


def reason_kind(error: str | None) -> str:
    """An error text with paths/URIs and numbers masked: the reason, not the instance."""
    return _NUMBER.sub("N", _PATH.sub("<path>", error or "(no reason given)"))[:160]


def current_rows(table: pa.Table) -> pa.Table:
    """Per id, its latest ``ok`` row if any, else its latest row (ties: the row read last)."""
    return latest_per_id(table, "captioned_at", ok_first=True)


def _lengths(values: list[str | None]) -> dict[str, Any]:
    lengths = np.array([len(v or "") for v in values], dtype=np.int64)
    if not len(lengths):
        return {"count": 0}
    q = np.percentile(lengths, [5, 50, 95])
    return {"count": int(len(lengths)), "mean": round(float(lengths.mean()), 1), "min": int(lengths.min()),
            "p5": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": int(lengths.max())}


def _identical(values: list[str | None], images: list[str | None], top: int = 3) -> dict[str, Any]:
    """Rows whose (non-empty) value is also another image's value."""
    seen: dict[str, set] = {}
    for value, image in zip(values, images):
        if value and image:
            seen.setdefault(value, set()).add(image)
    shared = {v for v, imgs in seen.items() if len(imgs) > 1}
    rows = sum(1 for v in values if v in shared)
    counts = Counter(v for v in values if v in shared)
    return {"rows": rows, "rate": round(rows / len(values), 4) if values else 0.0, "distinct_values": len(shared),
            "top": [{"value": v[:120], "rows": n, "images": len(seen[v])} for v, n in counts.most_common(top)]}


def quality(table: pa.Table, seed: int = 0) -> dict[str, Any]:
    """The figures of the report, for the rows of one caption set (any history). Column by column:
    no Python dict per row."""
    rows = current_rows(table)
    n = rows.num_rows
    tally = Counter(rows["status"].to_pylist())
    ok = rows.filter(pc.equal(rows["status"], STATUS_OK))
    images = ok["image_sha256"].to_pylist()
    fields, values_of = {}, {}
    for name in CAPTION_FIELDS:
        values = values_of[name] = ok[name].to_pylist()
        empty = sum(1 for v in values if not (v or "").strip())
        fields[name] = {"empty_rate": round(empty / len(values), 4) if values else 0.0, "chars": _lengths(values),
                        "identical_for_different_images": _identical(values, images)}
    triples = ["\x1f".join(v or "" for v in parts) for parts in zip(*(values_of[f] for f in CAPTION_FIELDS))]
    identical_all = _identical(triples, images)
    for item in identical_all["top"]:
        item["value"] = " | ".join(item["value"].split("\x1f"))[:120]
    reasons = {}
    for kind in (STATUS_INVALID, STATUS_ERROR):
        errors = rows.filter(pc.equal(rows["status"], kind))["error"].to_pylist()
        reasons[kind] = [{"reason": reason, "rows": count}
                         for reason, count in Counter(reason_kind(e) for e in errors).most_common(TOP_REASONS)]
    generated = table.filter(pc.and_(pc.is_null(table["reused_from"]), pc.is_valid(table["output_tokens"])))
    tokens = generated["output_tokens"].to_numpy().astype(np.int64) if generated.num_rows else np.array([], np.int64)
    rng = random.Random(seed)
    picks = [ok.slice(i, 1) for i in sorted(rng.sample(range(ok.num_rows), min(SAMPLES, ok.num_rows)))]
    for kind in (STATUS_INVALID, STATUS_ERROR):
        bad = rows.filter(pc.equal(rows["status"], kind))
        picks += [bad.slice(i, 1) for i in sorted(rng.sample(range(bad.num_rows), min(2, bad.num_rows)))]
    samples = [r for pick in picks for r in pick.to_pylist()]
    return {
        "ids": n,
        "rows": table.num_rows,
        "status": {s: tally.get(s, 0) for s in (STATUS_OK, STATUS_INVALID, STATUS_ERROR)},
        "rates": {s: round(tally.get(s, 0) / n, 4) if n else 0.0 for s in (STATUS_OK, STATUS_INVALID, STATUS_ERROR)},
        "top_reasons": reasons,
        "fields": fields,
        "identical_captions_for_different_images": identical_all,
        "reused_rows": ok.num_rows - ok["reused_from"].null_count,
        "output_tokens": {"generated_rows": int(len(tokens)), "total": int(tokens.sum()) if len(tokens) else 0,
                          "mean": round(float(tokens.mean()), 1) if len(tokens) else None,
                          "p95": float(np.percentile(tokens, 95)) if len(tokens) else None},
        "samples": [{"id": r["id"], "status": r["status"], "error": r["error"],
                     **{f: (r[f] or "")[:SAMPLE_CHARS] for f in CAPTION_FIELDS}} for r in samples],
    }


def render_markdown(q: dict[str, Any], uri: str, fingerprint: str, spec: dict | None) -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"# Caption quality: {uri}", "", f"Fingerprint `{fingerprint}`"
             + (f" ({spec['backend']}, model {json.dumps(spec['model'])}, prompt {spec['prompt_version']})" if spec else
                " (rows written before fingerprints)"), ""]
    if (sample := q.get("sample")) and sample["files"] < sample["of_files"]:
        lines += [f"Figures over a random sample: {sample['files']} of {sample['of_files']} files "
                  f"({sample['bytes'] / 2**20:.0f} of {sample['of_bytes'] / 2**20:.0f} MB).", ""]
    lines += [
             f"{q['ids']} pairs ({q['rows']} rows written): ok {q['status']['ok']} ({pct(q['rates']['ok'])}), "
             f"invalid {q['status']['invalid']} ({pct(q['rates']['invalid'])}), "
             f"error {q['status']['error']} ({pct(q['rates']['error'])}); {q['reused_rows']} ok rows copied from an "
             "identical request.", ""]
    t = q["output_tokens"]
    if t["generated_rows"]:
        lines += [f"Tokens generated: {t['total']} over {t['generated_rows']} rows (mean {t['mean']}, p95 {t['p95']}).", ""]
    lines += ["## Fields (ok rows)", "", "| field | empty | chars mean | p5 | median | p95 | max | identical for other images |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, f in q["fields"].items():
        c, ident = f["chars"], f["identical_for_different_images"]
        if c.get("count"):
            lines.append(f"| {name} | {pct(f['empty_rate'])} | {c['mean']} | {c['p5']:.0f} | {c['median']:.0f} | "
                         f"{c['p95']:.0f} | {c['max']} | {ident['rows']} rows ({pct(ident['rate'])}) |")
        else:
            lines.append(f"| {name} | – | – | – | – | – | – | – |")
    ident = q["identical_captions_for_different_images"]
    lines += ["", f"All three fields identical for different images: {ident['rows']} rows ({pct(ident['rate'])}), "
              f"{ident['distinct_values']} distinct captions."]
    for name, f in [("all fields", {"identical_for_different_images": ident}), *q["fields"].items()]:
        for item in f["identical_for_different_images"]["top"]:
            lines.append(f"- {name}: {item['rows']} rows, {item['images']} images: `{item['value']}`")
    for kind in (STATUS_INVALID, STATUS_ERROR):
        lines += ["", f"## Top {kind} reasons", ""]
        lines += [f"- {r['rows']} × {r['reason']}" for r in q["top_reasons"][kind]] or ["- none"]
    lines += ["", "## Sample rows", ""]
    for s in q["samples"]:
        lines.append(f"- `{s['id']}` ({s['status']}{': ' + s['error'] if s['error'] else ''})")
        for name in CAPTION_FIELDS:
            if s[name]:
                lines.append(f"  - {name}: {s[name]}")
    return "\n".join(lines) + "\n"


def render_png(q: dict[str, Any], table: pa.Table, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = current_rows(table)
    ok = rows.filter(pc.equal(rows["status"], STATUS_OK))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, name in zip(axes, CAPTION_FIELDS):
        lengths = [len(v or "") for v in ok[name].to_pylist()]
        ax.hist(lengths, bins=30, color="#4C72B0")
        ax.set_title(f"{name} (empty {100 * q['fields'][name]['empty_rate']:.1f}%)")
        ax.set_xlabel("characters")
    axes[0].set_ylabel("ok pairs")
    statuses = list(q["status"])
    axes[3].bar(statuses, [q["status"][s] for s in statuses], color=["#55A868", "#DD8452", "#C44E52"])
    axes[3].set_title("pairs by status")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


def report_dir(uri: str, fingerprint: str) -> str:
    return storage.join(uri, "_reports", fingerprint)


def sample_files(uri: str, max_bytes: int = MAX_BYTES, seed: int = 0, **storage_kw) -> tuple[list, dict[str, int]]:
    """The folder's data files, or a seeded random subset of at most ``max_bytes`` (at least one file)."""
    fs, path = storage.resolve(uri, **storage_kw)
    files = data_files(fs, path)
    total = sum(f.size or 0 for f in files)
    chosen = files
    if total > max_bytes:
        shuffled = random.Random(seed).sample(files, len(files))
        chosen, size = [], 0
        for f in shuffled:
            if chosen and size + (f.size or 0) > max_bytes:
                continue
            chosen.append(f)
            size += f.size or 0
        chosen.sort(key=lambda f: f.path)  # read order decides ties (store docstring)
    return chosen, {"files": len(chosen), "of_files": len(files), "bytes": sum(f.size or 0 for f in chosen),
                    "of_bytes": total}


def write_report(uri: str, fingerprint: str, *, max_bytes: int = MAX_BYTES, **storage_kw) -> dict[str, Any]:
    """Write one caption set's report under ``<uri>/_reports/<fingerprint>/``; return its figures and paths."""
    files, sample = sample_files(uri, max_bytes, **storage_kw)
    table = read_rows(uri, CAPTION_SCHEMA, filter=fingerprint_filter(fingerprint), files=files, **storage_kw)
    q = {**quality(table), "sample": sample}
    spec = None
    if fingerprint != UNVERSIONED and table.num_rows:
        spec = json.loads(table["fingerprint_spec"][0].as_py() or "null")
    folder = report_dir(uri, fingerprint)
    md, png = storage.join(folder, "report.md"), storage.join(folder, "quality.png")
    storage.write_json_atomic(storage.join(folder, "quality.json"), {"fingerprint": fingerprint, "spec": spec, **q},
                              **storage_kw)
    storage.write_text_atomic(md, render_markdown(q, uri, fingerprint, spec), **storage_kw)
    storage.write_bytes_atomic(png, render_png(q, table, f"{uri} · {fingerprint}"), **storage_kw)
    return {"fingerprint": fingerprint, "quality": q, "report": md, "png": png}


def write_reports(uri: str, **storage_kw) -> list[dict[str, Any]]:
    """``jobs/caption.py --report URI``: a report for every caption set at ``uri``."""
    from umaf.errors import UserError

    counts = caption_sets(uri, **storage_kw)
    if not counts:
        raise UserError(f"no caption rows at {uri}: give the captions folder jobs/caption.py wrote (--out)")
    return [write_report(uri, c["fingerprint"], **storage_kw) for c in counts]
