"""``TrainConfig``: every key of ``jobs/train.py`` (and of each Tune trial, which launches the same job).

Shared keys (data, optimisation, Ray Train scaling, run folder) live at the top level; each method has
its own section, ``umaf:`` (:class:`umaf.models.umaf.UmafConfig`) and ``sppscl:``
(:class:`umaf.models.sppscl.SppSclConfig`); only the section named by ``model`` is used.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from umaf.config import PathOrUri, RayConfig, StorageConfig, StrictModel
from umaf.models.sppscl import SppSclConfig
from umaf.models.umaf import UmafConfig

# f1_of_weighted_pr: the UMAF paper's F1 (harmonic mean of weighted P and R; see umaf.train.metrics).
BestMetric = Literal["weighted_f1", "macro_f1", "accuracy", "f1_of_weighted_pr"]
Precision = Literal["bf16", "fp32"]


class EvalConfig(StrictModel):
    """How dev and test are evaluated where a pair's prediction depends on its batch-mates (SPP-SCL's CMF);
    see :mod:`umaf.train.order`. Methods that predict each pair alone are unaffected."""

    protocol: Literal["train_context", "official_order"] = Field(
        "train_context",
        description="the reported protocol (dev metric for the best model, metrics.json dev/test, predictions/"
        "{dev,test}.parquet): train_context = each pair in a batch completed with a fixed draw of training pairs "
        "(cannot depend on other test pairs); official_order = the official protocol (source files' order, "
        "consecutive batches of eval_batch_size)",
    )
    compare: bool = Field(
        True, description="also evaluate the best model under the other protocol and report it, and the gap"
    )


class TrainConfig(StrictModel):
    model: Literal["umaf", "sppscl"] = Field("umaf", description="which method to train")

    # ---- data --------------------------------------------------------------------------------
    manifest: PathOrUri | None = Field(
        None, description="manifest URI (local path, file:// or s3://); None: the demo dataset written under out/demo"
    )
    captions: PathOrUri | None = Field(
        None, description="captions URI (UMAF); None with no manifest: the demo's reference captions"
    )
    caption_fingerprint: str | None = Field(
        None, description="which caption set at captions to use (the fingerprint jobs/caption.py printed); None: the "
        "only one there (several: an error lists them); the run records the one it used",
    )
    task: str | None = Field(None, description="label task (column label_<task>); None: the manifest's first task")
    missing_caption: Literal["text_only", "drop"] = Field(
        "text_only", description="pairs without an ok caption: keep with T alone, or drop them (UMAF)"
    )
    max_rows_per_split: int | None = Field(
        None, ge=1, description="use at most this many rows of each split (quick runs, benches)"
    )

    # ---- run folder ----------------------------------------------------------------------------
    out: PathOrUri = Field(
        "runs/train", description="the run folder (local path or s3://bucket/prefix); rerun with the same out to resume"
    )

    # ---- optimisation (shared by every method) ------------------------------------------------
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="GLOBAL batch size (split evenly over the workers)")
    eval_batch_size: int = Field(
        64, ge=1, description="batch size of dev/test evaluation (rank 0); SPP-SCL: the batch CMF attends across "
        "(the paper presets: the training batch size), see eval.protocol")
    lr: float = Field(1e-4, gt=0, description="learning rate of the new (randomly initialised) layers")
    encoder_lr: float = Field(2e-5, ge=0, description="learning rate of pretrained encoder weights (when trained)")
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["linear", "cosine", "constant", "step"] = Field(
        "linear", description="per-step warm-up then linear/cosine decay or constant; 'step': StepLR per epoch"
    )
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of all steps spent warming up (not 'step')")
    step_size: int = Field(10, ge=1, description="StepLR: epochs between decays (scheduler=step)")
    gamma: float = Field(0.5, gt=0, description="StepLR: decay factor (scheduler=step)")
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None: no clipping")
    precision: Precision | None = Field(
        None, description="GPU compute: bf16 (autocast) or fp32; None: fp32 under sppscl.compat=official (the "
        "official code trains in fp32), else bf16. CPUs always compute in fp32")
    seed: int = 42
    best_metric: BestMetric | None = Field(
        None, description="dev metric that picks the best checkpoint; None: macro_f1 for HFM, else weighted_f1"
    )
    shuffle_buffer: int = Field(
        1000, ge=0, description="unused: every epoch is a full seeded permutation of the training split "
        "(umaf.train.order); kept so that older run configs still load")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    prefetch_batches: int = Field(
        2, ge=0, description="batches Ray Data prepares ahead of the step (collate, pinned copy to the GPU) in a thread"
    )
    log_every_s: float = Field(
        15.0, gt=0, description="seconds between rank 0's step-progress lines (and TensorBoard step scalars); the "
        "loss terms stay on the device in between"
    )

    # ---- Ray Train -----------------------------------------------------------------------------
    num_workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float | None = Field(None, gt=0, description="default 1 when use_gpu")
    node_resource: str | None = Field(
        None,
        description="custom Ray resource that the training node type offers one unit of per GPU (train_node in "
        "cluster/aws.yaml and the KubeRay gpu-train group); each worker asks for its GPU share of it (1 without "
        "GPUs), so workers run only there and their demand starts those nodes. None: any node",
    )
    max_failures: int = Field(1, ge=-1, description="worker-group restarts after a failure (-1: unlimited)")
    controller_failure_limit: int = Field(
        2, ge=0, description="Train controller failures tolerated (e.g. workers that cannot be placed) before the run fails"
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray checkpoints kept (the latest is always kept)")
    preprocess_concurrency: int = Field(1, ge=1, description="Ray Data actors for preprocessing (tokenisation)")
    preprocess_gpus_per_actor: float = Field(
        1.0, gt=0, le=1, description="with use_gpu: the GPU share of each frozen-encoder actor of a feature cache "
        "build (0.25: 4 of preprocess_concurrency actors per GPU, one's host work overlapping another's kernels)"
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    # ---- methods -------------------------------------------------------------------------------
    umaf: UmafConfig = Field(default_factory=UmafConfig)
    sppscl: SppSclConfig = Field(default_factory=SppSclConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size < self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least num_workers ({self.num_workers})")
        return self

    @property
    def reads_captions(self) -> bool:
        """Whether this run joins a caption set (UMAF with captions on, and a captions folder)."""
        return self.model == "umaf" and self.umaf.uses_captions and bool(self.captions)

    @property
    def resolved_precision(self) -> Precision:
        if self.precision:
            return self.precision
        return "fp32" if self.model == "sppscl" and self.sppscl.compat == "official" else "bf16"

    def per_worker_batch_size(self) -> int:
        return max(1, self.batch_size // self.num_workers)

    def resolved_best_metric(self, dataset: str) -> BestMetric:
        """The paper protocols: weighted F1 for MVSA and MSED, macro F1 for HFM (sarcasm)."""
        if self.best_metric:
            return self.best_metric
        return "macro_f1" if "hfm" in dataset.lower() or "mmsd" in dataset.lower() else "weighted_f1"
