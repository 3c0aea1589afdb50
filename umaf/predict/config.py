"""``PredictConfig``: every knob of ``jobs/predict.py`` (presets in ``configs/predict/*.yaml``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from umaf.caption.config import ActorsConfig, OutputConfig
from umaf.config import PathOrUri, RayConfig, StorageConfig, StrictModel, comma_separated


class PredictActorsConfig(ActorsConfig):
    """The pool of actors holding the run's best model (as the caption job's VLM actors)."""

    batch_size: int = Field(
        64, ge=1, description="pairs per forward pass (UMAF); SPP-SCL always uses the run's eval_batch_size (CMF "
        "attends across the batch)",
    )


class PredictConfig(StrictModel):
    """``jobs/predict.py``: label a manifest's pairs with a trained run's best model."""

    run: PathOrUri = Field("./outputs/pipeline/runs/train", description="the trained run folder (local or s3://)")
    manifest: PathOrUri | None = Field(None, description="manifest URI of the pairs to label; None: the run's own")
    captions: PathOrUri | None = Field(
        None, description="captions URI joined by id (UMAF runs trained with captions); None: the run's captions"
    )
    caption_fingerprint: str | None = Field(
        None, description="which caption set at captions to join (UMAF); None: the one the run was trained on if "
        "present, else the only one there",
    )
    out: PathOrUri = Field("./outputs/predictions", description="predictions dataset URI (local folder or s3://)")
    splits: list[Literal["train", "dev", "test"]] | None = Field(None, description="label only these splits")
    limit: int | None = Field(None, ge=1, description="label only the first N selected rows (manifest order)")
    retry_failed: bool = Field(False, description="also redo ids whose last row is an error row")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where each actor runs the model; auto: CUDA when the actor has a GPU"
    )
    precision: Literal["bf16", "fp32"] | None = Field(
        None, description="GPU compute (bf16 autocast or fp32); None: the run's training precision. CPUs use fp32"
    )
    actors: PredictActorsConfig = Field(default_factory=PredictActorsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    _splits = field_validator("splits", mode="before")(comma_separated)  # --splits dev,test

    @property
    def storage_kw(self) -> dict[str, Any]:
        return {"endpoint_url": self.storage.endpoint_url, "region": self.storage.region}
