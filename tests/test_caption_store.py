"""The caption store's contract, without Ray: one ok row per id, caption sets side by side, torn files.

Files are written here by hand (pyarrow), as runs and crashes would leave them; expected rows are
named by the test from what it wrote, never read back from the code under test.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from umaf import storage
from umaf.caption.pipeline import done_ids, read_done, read_statuses
from umaf.caption.store import (
    CAPTION_SCHEMA,
    UNVERSIONED,
    caption_sets,
    read_captions,
    read_ok_captions,
    select_captions,
)
from umaf.errors import UserError

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(pair_id: str, status: str = "ok", *, at: datetime = T0, fp: str | None = "fpA", ocr: str = "", **extra) -> dict:
    return {"id": pair_id, "ocr": ocr, "visual_scene": "v", "textimage_relation": "r", "raw": None, "status": status,
            "error": None if status == "ok" else "why", "model": f"model-of-{fp}", "prompt_version": "p1",
            "sampling": "{}", "image_sha256": None, "output_tokens": 5, "captioned_at": at, "fingerprint": fp,
            "fingerprint_spec": None if fp is None else '{"m": "%s"}' % fp, "request_key": None, "reused_from": None,
            **extra}


def write(uri: str, name: str, rows: list[dict], schema: pa.Schema = CAPTION_SCHEMA, **kw) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    fs, path = storage.resolve(storage.join(uri, name), **kw)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        pq.write_table(table, out)


def test_latest_ok_row_wins_and_ties_go_to_the_row_written_last(tmp_path):
    uri = str(tmp_path / "captions")
    later = T0 + timedelta(seconds=1)
    # Run 1 (file names sort by run start): x ok, then x ok again later in the same file (a rerun's
    # row can also land in an older-named file); y twice at the same microsecond in one file.
    write(uri, "part-20260101T000000-aaaa-00000.parquet", [
        row("x", at=later, ocr="x-late"), row("x", at=T0, ocr="x-early"),
        row("y", at=T0, ocr="y-first-row"), row("y", at=T0, ocr="y-second-row"),
        row("z", at=T0, ocr="z-run1"),
    ])
    # Run 2: z again at the same microsecond (the tie goes to the later file), w error then ok.
    write(uri, "part-20260102T000000-bbbb-00000.parquet", [
        row("z", at=T0, ocr="z-run2"), row("w", "error", at=later), row("w", at=T0, ocr="w-ok"),
    ])
    ok = {r["id"]: r["ocr"] for r in read_ok_captions(uri).to_pylist()}
    assert ok == {"x": "x-late", "y": "y-second-row", "z": "z-run2", "w": "w-ok"}


def test_caption_sets_side_by_side_must_be_chosen_by_fingerprint(tmp_path):
    uri = str(tmp_path / "captions")
    write(uri, "part-1.parquet", [row("a", fp="fpA", ocr="A"), row("b", fp="fpA"), row("c", "error", fp="fpA")])
    write(uri, "part-2.parquet", [row("a", fp="fpB", ocr="B"), row("a", fp="fpB", at=T0 + timedelta(1), ocr="B2")])
    # A file from before fingerprints: the column is absent, so its rows are the unversioned set.
    legacy = CAPTION_SCHEMA.remove(CAPTION_SCHEMA.get_field_index("fingerprint"))
    write(uri, "part-0.parquet", [{k: v for k, v in row("a", fp=None, ocr="old").items() if k != "fingerprint"}],
          schema=legacy)

    with pytest.raises(UserError) as err:
        select_captions(uri)
    message = str(err.value)
    assert "3 caption sets" in message and "caption_fingerprint=" in message
    assert "fpA (2 ok ids in 3 rows, model model-of-fpA" in message
    assert "fpB (1 ok ids in 2 rows" in message and f"{UNVERSIONED} (1 ok ids in 1 rows" in message

    chosen = select_captions(uri, "fpB")
    assert chosen.fingerprint == "fpB" and chosen.spec == {"m": "fpB"}
    assert chosen.table.to_pydict()["ocr"] == ["B2"]
    assert {r["id"]: r["ocr"] for r in read_ok_captions(uri, "fpA").to_pylist()} == {"a": "A", "b": ""}
    assert read_ok_captions(uri, UNVERSIONED)["ocr"].to_pylist() == ["old"]
    with pytest.raises(UserError, match=r"hold no fingerprint 'fpC'.*fpA"):
        select_captions(uri, "fpC")

    # Resume keys on (pair, fingerprint): fpB's skip set is {a}, fpA's {a, b} (+ c without --retry-failed).
    # read_done (file by file, what the jobs use) and done_ids over the whole table agree.
    done = lambda fp, retry: sorted(read_done(uri, fingerprint=fp, retry_failed=retry)[0].to_pylist())  # noqa: E731
    whole = lambda fp, retry: sorted(done_ids(read_statuses(uri, fingerprint=fp), retry_failed=retry).to_pylist())  # noqa: E731
    assert done("fpB", False) == whole("fpB", False) == ["a"]  # a's two ok rows (two files' worth) count once
    assert done("fpA", True) == whole("fpA", True) == ["a", "b"]
    assert done("fpA", False) == whole("fpA", False) == ["a", "b", "c"]
    assert done("fpC", False) == whole("fpC", False) == []
    assert read_done(uri, fingerprint="fpA", retry_failed=False)[1] == {"ok": 2, "error": 1}
    # Another file with a second ok row for a: still 2 ok ids of fpA, now in 4 rows.
    write(uri, "part-3.parquet", [row("a", fp="fpA", ocr="A-again")])
    assert next(c for c in caption_sets(uri) if c["fingerprint"] == "fpA") == {
        "fingerprint": "fpA", "rows": 4, "ok_ids": 2, "model": "model-of-fpA", "prompt_version": "p1"}
    assert done("fpA", False) == ["a", "b", "c"]


def test_one_set_is_chosen_without_asking(tmp_path):
    uri = str(tmp_path / "captions")
    write(uri, "part-1.parquet", [row("a"), row("b", "invalid")])
    chosen = select_captions(uri)
    assert chosen.fingerprint == "fpA" and chosen.table["id"].to_pylist() == ["a"]
    assert chosen.describe()["ok_ids"] == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_torn_file_is_skipped_with_a_warning_naming_it(where, tmp_path, request, caplog):
    kw = {}
    if where == "s3":
        kw = {"endpoint_url": request.getfixturevalue("s3_endpoint")}
        uri = request.getfixturevalue("s3_bucket") + "/captions"
    else:
        uri = str(tmp_path / "captions")
    write(uri, "part-1.parquet", [row("a"), row("b")], **kw)
    whole = pa.Table.from_pylist([row("c")], schema=CAPTION_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(whole, sink)
    data = sink.getvalue().to_pybytes()
    storage.write_bytes_atomic(storage.join(uri, "part-2.parquet"), data[: len(data) // 2], **kw)  # a torn copy
    storage.write_bytes_atomic(storage.join(uri, "_summary.json"), b"{}", **kw)  # not data: never read as Parquet

    with caplog.at_level(logging.WARNING, logger="umaf.caption"):
        assert sorted(read_captions(uri, **kw)["id"].to_pylist()) == ["a", "b"]
    torn = [r.getMessage() for r in caplog.records if "part-2.parquet" in r.getMessage()]
    assert len(torn) == 1 and storage.join(uri, "part-2.parquet") in torn[0]
    assert sorted(read_ok_captions(uri, **kw)["id"].to_pylist()) == ["a", "b"]

    # A folder holding only a torn file reads as empty (with the schema), as does a missing folder.
    only = storage.join(uri, "only")
    storage.write_bytes_atomic(storage.join(only, "part-1.parquet"), data[:100], **kw)
    assert read_captions(only, **kw).schema == CAPTION_SCHEMA and read_captions(only, **kw).num_rows == 0
    assert read_captions(storage.join(uri, "none"), **kw).num_rows == 0



def test_request_ledger_lets_one_pair_pay_per_request(tmp_path):
    from umaf.caption.pipeline import RequestLedger, done_request_keys, key_words

    key = lambda i: f"{i:016x}{(i * 7919) % 2**64:016x}"  # noqa: E731 - 32 hex, high and low words differ
    uri = str(tmp_path / "captions")
    write(uri, "part-1.parquet", [row("a", request_key=key(1)), row("b", "error", request_key=key(2)),
                                  row("c", fp="fpB", request_key=key(3)), row("d", request_key=key(1))])
    hi, lo = key_words(pa.array([key(5), key(2**63 + 3)]))
    assert [int(h) for h in hi] == [5, 2**63 + 3] and int(lo[0]) == 5 * 7919
    done = done_request_keys([uri, str(tmp_path / "nothing-here")], "fpA")  # ok rows of fpA only: key 1 (twice)
    ledger = RequestLedger(done)
    # Key 1 is captioned already; key 2 only failed (its pairs are captioned); key 3 is another set's.
    assert ledger.claim([key(1), key(2), key(3), None], ["x", "y", "z", "w"]) == ["", None, None, None]
    # Within the run the first claimant pays; a retried claim by it gets the same answer.
    assert ledger.claim([key(2), key(3), key(2)], ["y2", "z", "y"]) == ["y", None, None]


@pytest.mark.parametrize("slice_size", [1, 2, 3, 1 << 20])
def test_pending_ids_take_out_done_ids_whatever_the_lookup_slice(tmp_path, monkeypatch, slice_size):
    """The skip set looks the selection up a slice at a time (to bound its hash tables): an id selected
    twice, in two slices, is done in both or pending once; error rows count only without --retry-failed."""
    import pyarrow as pa

    import umaf.caption.pipeline as pipeline

    monkeypatch.setattr(pipeline, "PENDING_SLICE", slice_size)
    uri = str(tmp_path / "captions")
    write(uri, "part-1.parquet", [row("a"), row("c"), row("e")])
    write(uri, "part-2.parquet", [row("c"), row("x"), row("g", "error"), row("h", fp="fpB")])
    selected = pa.array(["a", "b", "c", "d", "e", "a", "g", "b", "h"])
    todo, tally = pipeline.pending_ids(selected, uri, fingerprint="fpA", retry_failed=False)
    assert todo.to_pylist() == ["b", "d", "h"] and tally == {"ok": 5, "error": 1}
    assert pipeline.pending_ids(selected, uri, fingerprint="fpA", retry_failed=True)[0].to_pylist() == ["b", "d", "g", "h"]
    assert pipeline.pending_ids(selected, uri, fingerprint="fpC", retry_failed=False)[0].to_pylist() == [
        "a", "b", "c", "d", "e", "g", "h"]
