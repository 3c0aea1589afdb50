"""Raw HFM, the Twitter sarcasm set of Cai et al. 2019 (headacheboy/data-of-multimodal-sarcasm-detection).

``text/train.txt``, ``text/valid2.txt``, ``text/test2.txt``: one Python-literal list per line,
``['id', 'text', label]``; valid/test lines carry two labels and the LAST is the human one. Lines are
parsed with :func:`ast.literal_eval` — never ``eval``: a data file must not run code.

The official cleaning drops every line whose whitespace tokens include one of :data:`KEYWORDS`
(words that give the label away, and URL placeholders): train 29,040 raw lines → 19,816
(8,642 sarcastic); valid/test are already clean (2,410/2,409). Images: ``<images>/<id>.jpg``.
"""

from __future__ import annotations

import ast

from umaf.data.readers import ReaderOutput
from umaf.data.report import PrepareReport
from umaf.data.sources import SourceDir, image_uri

KEYWORDS = frozenset(
    ["exgag", "sarcasm", "sarcastic", "reposting", "<url>", "joke", "humour", "humor", "jokes", "irony", "ironic"]
)
LABELS = ["not_sarcastic", "sarcastic"]
SPLIT_FILES = {"train": "text/train.txt", "dev": "text/valid2.txt", "test": "text/test2.txt"}


def has_keyword(text: str) -> bool:
    return not KEYWORDS.isdisjoint(text.split())


def read_hfm_raw(source: SourceDir, images: str | None, report: PrepareReport, *,
                 dataset: str | None = None) -> ReaderOutput:
    rows: list[dict] = []
    for split, relative in SPLIT_FILES.items():
        if not source.exists(relative):
            raise FileNotFoundError(f"{source.uri_of(relative)} not found: --source must be the folder that holds "
                                    "text/train.txt, text/valid2.txt and text/test2.txt")
        file = source.uri_of(relative)
        dropped = 0
        # split("\n"), not splitlines(): tweets may hold U+2028 or U+0085, which splitlines() breaks on.
        for number, line in enumerate(source.read_text(relative).split("\n"), start=1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            try:
                record = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
                report.bad_record(file, number, line, f"not a Python literal list ({type(exc).__name__})")
                continue
            if (not isinstance(record, (list, tuple)) or len(record) < 3
                    or not isinstance(record[0], str) or not isinstance(record[1], str)):
                report.bad_record(file, number, line, "expected ['id', 'text', label, ...]")
                continue
            label = record[-1]  # valid/test: [id, text, automatic label, human label] — the human one
            if label not in (0, 1) or isinstance(label, bool):
                report.bad_record(file, number, label, "unknown label; allowed 0 (not sarcastic) or 1 (sarcastic)")
                continue
            if has_keyword(record[1]):
                dropped += 1
                continue
            rows.append({
                "id": record[0].strip(), "split": split, "text": record[1], "label_sarcasm": int(label),
                "image": image_uri(images, f"{record[0].strip()}.jpg"), "_where": f"{file}:{number}",
            })
        report.cleaning[f"hfm keyword filter ({split})"] += dropped
    return ReaderOutput(rows=rows, labels={"sarcasm": LABELS}, dataset=dataset or "hfm")
