"""What the caption job adds around the ``ray.data.llm`` processor that ray 2.60 builds.

Ray's processor runs five stages as actor pools: four on CPU (``PrepareMultimodalStage``: fetch and
decode the image; ``ChatTemplateStage``; ``TokenizeStage``; ``DetokenizeStage``) around the vLLM
engine. Only the engine stage turns a failing row into an error row
(``_generate_with_error_handling``, with ``should_continue_on_error``). A CPU stage calls its UDF on
the whole batch (``StatefulStageUDF.__call__`` in ``ray/llm/_internal/batch/stages/base.py``), so
one row that makes, say, the model's chat template raise fails the batch, then its retries, then
the job.

:func:`guard_cpu_stages` gives each CPU stage a subclass of ray's own UDF class (the processor's
public ``get_stage_by_name(...).fn``) that keeps the batch call and, only when it raises, redoes the
batch row by row: rows that pass are kept, a row that still fails gets ray's own error marker
(``__inference_error__ = "<stage>: <Type>: <message>"``). Every later stage, the engine included,
passes such a row through untouched (``StatefulStageUDF.__call__`` separates error rows before
calling the UDF), and the job writes it as a ``status=error`` caption row that ``--retry-failed``
redoes. Nothing of ray's code is copied or patched; the subclasses only wrap ``udf``.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

log = logging.getLogger("umaf.caption")

INFERENCE_ERROR = "__inference_error__"
# ray.data.llm's CPU stages, by the names its processor gives them (Processor._append_stage: the class name).
CPU_STAGES = ("PrepareMultimodalStage", "ChatTemplateStage", "TokenizeStage", "DetokenizeStage")


class RowGuard:
    """Mixin over one of ray's ``StatefulStageUDF`` classes: a failing batch is redone row by row and
    the rows that still fail become error rows instead of failing the batch."""

    stage_name = "stage"

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        try:
            # Ray's CPU UDFs are pure per row: a batch that fails half-way is redone whole, row by row.
            outputs = [out async for out in super().udf(batch)]  # type: ignore[misc]
        except Exception as batch_error:  # noqa: BLE001 - any row-level failure, see the module docstring
            log.warning("[caption stage=%s] a batch of %d rows failed (%s: %s); retrying row by row",
                        self.stage_name, len(batch), type(batch_error).__name__, batch_error)
            outputs = []
            for row in batch:
                try:
                    outputs.extend([out async for out in super().udf([row])])  # type: ignore[misc]
                except Exception as exc:  # noqa: BLE001
                    outputs.append({self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN],  # type: ignore[attr-defined]
                                    INFERENCE_ERROR: f"{self.stage_name}: {type(exc).__name__}: {exc}"})
        for out in outputs:
            yield out


def guarded(udf_class: type, stage_name: str) -> type:
    """``udf_class`` with :class:`RowGuard` in front of its ``udf``; the same class for the same inputs."""
    key = (udf_class, stage_name)
    if key not in _GUARDED:
        _GUARDED[key] = type(f"Guarded{udf_class.__name__}", (RowGuard, udf_class),
                             {"stage_name": stage_name, "__module__": __name__})
    return _GUARDED[key]


_GUARDED: dict[tuple[type, str], type] = {}


def guard_cpu_stages(processor: Any) -> Any:
    """Give each CPU stage of a ``ray.data.llm`` processor the row-by-row fallback; returns it."""
    for name in processor.list_stage_names():
        base = name.rsplit("_", 1)[0] if name.rsplit("_", 1)[-1].isdigit() else name
        if base in CPU_STAGES:
            stage = processor.get_stage_by_name(name)
            if not issubclass(stage.fn, RowGuard):
                # A copy with the new class (the stage model's assignment validation refuses a class
                # for its `fn` field), put where the processor keeps its stages, in the same order.
                processor.stages[name] = stage.model_copy(update={"fn": guarded(stage.fn, base.removesuffix("Stage"))})
    return processor
