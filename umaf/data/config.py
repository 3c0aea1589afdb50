"""``PrepareConfig``: every key of ``jobs/prepare.py`` (presets in ``configs/prepare/*.yaml``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from umaf.config import PathOrUri, StorageConfig, StrictModel

Format = Literal["mvsa-raw", "clmlf", "hfm-raw", "msed", "mmsd2", "demo"]


class DemoSizes(StrictModel):
    """Rows per split of the synthetic demo dataset (``format: demo``)."""

    n_train: int = Field(240, ge=0)
    n_dev: int = Field(60, ge=0)
    n_test: int = Field(60, ge=0)


class PrepareConfig(StrictModel):
    """``jobs/prepare.py``: read a published dataset (or draw the demo set) into a manifest."""

    format: Format = Field("demo", description="input format")
    source: PathOrUri | None = Field(None, description="the dataset's folder (local or s3://); not used by 'demo'")
    images: PathOrUri | None = Field(
        None, description="image folder (local or s3://); default per format: mvsa-raw <source>/data, msed <source>, "
        "others none (image column left empty)"
    )
    out: PathOrUri = Field(
        "./outputs/demo/manifest",
        description="manifest URI (local folder or s3://); the report goes to <out>.report.json; 'demo' also "
        "writes images/ and reference_captions/ beside the manifest (in its parent folder)",
    )
    dataset: str | None = Field(
        None, description="dataset name stored in the manifest; default from the format/source (demo: always 'demo')"
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="an unparseable line or unknown label: stop naming file/line/value, or skip and count it"
    )
    missing_images: Literal["keep", "drop"] = Field(
        "keep", description="rows whose image is missing/unreadable: keep them with image_ok=false, or drop them"
    )
    check_images: Literal["open", "stat"] = Field(
        "open", description="'open': decode-check every image (finds corrupt files); 'stat': only check it exists"
    )
    seed: int = Field(0, description="seed of the mvsa-raw split, of the row order within splits, and of the demo set")
    split_ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/dev/test ratios of the mvsa-raw split (no published split)"
    )
    mvsa_variant: Literal["auto", "single", "multiple"] = Field(
        "auto", description="mvsa-raw: 1 annotator (Single) or 3 (Multiple); auto: from the label file"
    )
    clmlf_task: Literal["auto", "sentiment", "sarcasm"] = Field(
        "auto", description="clmlf: MVSA sentiment or HFM sarcasm labels; auto: valid.json means HFM"
    )
    demo: DemoSizes = Field(default_factory=DemoSizes)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @field_validator("split_ratios")
    @classmethod
    def _ratios_sum_to_one(cls, ratios: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
            raise ValueError("the three ratios must be >= 0 and sum to 1, e.g. [0.8, 0.1, 0.1]")
        return ratios

    @model_validator(mode="after")
    def _source_unless_demo(self) -> PrepareConfig:
        if self.format != "demo" and not self.source:
            raise ValueError(f"source is required for format {self.format!r}: give --source DIR (or source=DIR)")
        return self

    @property
    def storage_kw(self) -> dict[str, Any]:
        return {"endpoint_url": self.storage.endpoint_url, "region": self.storage.region}
