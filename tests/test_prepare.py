"""jobs/prepare.py end to end: in-process and as a subprocess, local folders and a real S3 server (moto)."""

from __future__ import annotations

import collections
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from PIL import Image

from umaf import storage
from umaf.data.manifest import read_manifest
from umaf.data.prepare import report_uri

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs import prepare as prepare_job  # noqa: E402


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


def write_raw_mvsa(root: Path, rows: list[str]) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "labelResultAll.txt").write_text("ID\ttext,image\n" + "\n".join(rows) + "\n")
    for row in rows:
        pair_id = row.split("\t")[0]
        (root / "data" / f"{pair_id}.txt").write_text(f"tweet {pair_id}")
        (root / "data" / f"{pair_id}.jpg").write_bytes(jpeg_bytes())
    return root


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "prepare.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_demo_preset_in_process(tmp_path: Path, capsys):
    out = str(tmp_path / "demo" / "manifest")
    report = prepare_job.main(["--preset", "tiny", "--out", out, "demo.n_train=30", "demo.n_dev=9", "demo.n_test=9"])
    printed = capsys.readouterr().out
    assert f"prepared 'demo' (demo): 48 pairs → {out}" in printed
    assert "train     30  sentiment: negative 10, neutral 10, positive 10" in printed
    manifest = read_manifest(out)
    assert manifest.table.num_rows == 48 and manifest.dataset == "demo"
    assert json.loads(Path(report_uri(out)).read_text())["counts"] == report["counts"]
    assert (tmp_path / "demo" / "reference_captions").is_dir() and (tmp_path / "demo" / "images").is_dir()


def test_mvsa_raw_subprocess_writes_split_and_report(tmp_path: Path):
    rows = [f"{100 + k}\t{['positive', 'neutral', 'negative'][k % 3]},neutral" for k in range(30)]
    rows.append("200\tpositive,negative")  # dropped by the cleaning
    source = write_raw_mvsa(tmp_path / "MVSA_Single", rows)
    out = tmp_path / "mvsa" / "manifest"
    done = run_job("--format", "mvsa-raw", "--source", str(source), "--out", str(out), "seed=5")
    assert done.returncode == 0, done.stderr
    assert "prepared 'mvsa-single' (mvsa-raw): 30 pairs" in done.stdout
    assert "cleaning: text and image labels conflict (positive vs negative): 1 dropped" in done.stdout
    report = json.loads(Path(report_uri(str(out))).read_text())
    assert report["split"] == {"method": "seeded shuffle stratified by label", "seed": 5, "ratios": [0.8, 0.1, 0.1],
                               "variant": "single"}
    assert {s: report["counts"][s]["rows"] for s in ("train", "dev", "test")} == {"train": 24, "dev": 3, "test": 3}
    table = read_manifest(str(out)).table
    assert collections.Counter(table["split"].to_pylist()) == {"train": 24, "dev": 3, "test": 3}
    assert all(table["image_ok"].to_pylist())
    assert table["image"][0].as_py().startswith(str(source / "data"))


def test_bad_line_fails_with_file_and_line_then_skip_counts_it(tmp_path: Path):
    source = write_raw_mvsa(tmp_path / "MVSA_Single", ["1\tpositive,positive", "2\tpositive,neutral"])
    with open(source / "labelResultAll.txt", "a") as fh:
        fh.write("3\tgood,neutral\n")
    out = tmp_path / "m"
    failed = run_job("--format", "mvsa-raw", "--source", str(source), "--out", str(out))
    assert failed.returncode == 2  # bad input: one message, exit status 2
    assert f"{source / 'labelResultAll.txt'}:4" in failed.stderr and "'good,neutral'" in failed.stderr
    assert not out.exists()  # nothing written before the error
    skipped = run_job("--format", "mvsa-raw", "--source", str(source), "--out", str(out), "--on-error", "skip")
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped records: 1" in skipped.stdout and "labelResultAll.txt:4" in skipped.stdout
    assert json.loads(Path(report_uri(str(out))).read_text())["skipped_records"] == 1


def test_duplicate_ids_are_bad_records(tmp_path: Path, capsys):
    record = [{"id": "7", "text": "same id twice", "emotion_label": 0}]
    for name in ("train", "dev", "test"):
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    out = str(tmp_path / "m")
    with pytest.raises(SystemExit) as exit_info:
        prepare_job.main(["--format", "clmlf", "--source", str(tmp_path), "--out", out])
    assert exit_info.value.code == 2
    assert "duplicate id (first at" in capsys.readouterr().err
    report = prepare_job.main(["--format", "clmlf", "--source", str(tmp_path), "--out", out, "on_error=skip"])
    assert report["counts"]["total"] == 1 and report["skipped_records"] == 2


def test_drop_needs_an_image_folder(tmp_path: Path, capsys):
    for name in ("train", "dev", "test"):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"id": name, "text": "t", "emotion_label": 1}]))
    with pytest.raises(SystemExit):
        prepare_job.main(["--format", "clmlf", "--source", str(tmp_path), "--out", str(tmp_path / "m"),
                          "--missing-images", "drop"])
    assert "give --images DIR" in capsys.readouterr().err


def test_msed_to_s3_with_s3_images(shared_data: Path, s3_bucket: str):
    """MSED → moto S3 through pyarrow's S3 filesystem, images on S3 too; read back three ways."""
    import boto3

    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    uploaded = {"train": [1, 2, 3], "dev": [1, 2]}
    for split, ks in uploaded.items():
        for k in ks:
            s3.upload_file(str(shared_data / f"msed/{split}/images/{k}.jpg"), bucket, f"msed-images/{split}/images/{k}.jpg")
    s3.put_object(Bucket=bucket, Key="msed-images/dev/images/3.jpg", Body=b"truncated")  # present but corrupt

    out = f"{s3_bucket}/manifests/msed"
    report = prepare_job.main(["--format", "msed", "--source", str(shared_data / "msed"),
                               "--images", f"{s3_bucket}/msed-images", "--out", out, "--missing-images", "drop"])
    assert report["counts"]["total"] == 5
    assert report["missing_images"] == 9190 - 6 and report["unreadable_images"] == 1
    assert report["rows_dropped_for_image"] == 9190 - 5

    manifest = read_manifest(out)
    assert manifest.dataset == "msed" and list(manifest.labels) == ["sentiment", "emotion", "desire"]
    assert sorted(manifest.table["image"].to_pylist()) == sorted(
        f"{s3_bucket}/msed-images/{s}/images/{k}.jpg" for s, ks in uploaded.items() for k in ks)
    fs, path = storage.resolve(out)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    assert dataset.count_rows() == 5 and "label_desire" in dataset.schema.names
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="manifests/")["Contents"]]
    assert "manifests/msed.report.json" in keys
    assert any(k.startswith("manifests/msed/") and k.endswith(".parquet") for k in keys)
    on_s3 = json.loads(s3.get_object(Bucket=bucket, Key="manifests/msed.report.json")["Body"].read())
    assert on_s3["counts"] == report["counts"]
    assert {"id": "dev-3", "image": f"{s3_bucket}/msed-images/dev/images/3.jpg"} == {
        k: on_s3["unreadable_image_list"][0][k] for k in ("id", "image")}


def test_source_on_s3(shared_data: Path, s3_bucket: str):
    """--source may itself be an s3:// folder (here the MMSD2.0 sample, uploaded with boto3)."""
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    boto3.client("s3").upload_file(str(shared_data / "mmsd2/data/text_json_final/test.json"), bucket, "mmsd2/test.json")
    report = prepare_job.main(["--format", "mmsd2", "--source", f"{s3_bucket}/mmsd2", "--out", f"{s3_bucket}/m",
                               "--images", f"{s3_bucket}/mmsd2-images"])
    assert report["counts"]["test"] == {"rows": 15, "sarcasm": {"not_sarcastic": 5, "sarcastic": 10}}
    assert report["missing_images"] == 15  # no images uploaded: listed, not fatal
    table = read_manifest(f"{s3_bucket}/m").table
    assert table.num_rows == 15 and not any(table["image_ok"].to_pylist())


def test_the_official_order_survives_prepares_shuffle(shared_data: Path, tmp_path: Path):
    """CLMLF's files are sorted by label and the official SPP-SCL code evaluates them unshuffled: prepare
    shuffles the manifest but keeps each row's position in its source file as source_index."""
    folder = shared_data / "clmlf/MVSA-single/10-flod-1"
    out = str(tmp_path / "manifest")
    prepare_job.main(["--format", "clmlf", "--source", str(folder), "--out", out])
    manifest = read_manifest(out)
    for split, filename in (("test", "test.json"), ("train", "train.json")):
        published = [r["id"] for r in json.loads((folder / filename).read_text())]
        rows = manifest.split(split).to_pylist()
        assert [r["id"] for r in rows] != published  # shuffled
        assert [r["id"] for r in sorted(rows, key=lambda r: r["source_index"])] == published
    # Why it matters: in source order, batches of 64 are nearly single-label.
    labels = [r["label_sentiment"] for r in sorted(manifest.split("test").to_pylist(), key=lambda r: r["source_index"])]
    batches = [labels[i:i + 64] for i in range(0, len(labels), 64)]
    purity = sum(max(collections.Counter(b).values()) / len(b) for b in batches) / len(batches)
    assert purity > 0.9
