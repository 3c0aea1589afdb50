"""Search spaces over training keys, written in YAML, turned into Ray Tune / Optuna domains.

A sweep names dotted ``TrainConfig`` keys (``umaf.top_k``) or the papers' symbols, which are aliases
per method (UMAF: ``K``, ``lambda``, ``tau``; SPP-SCL: ``lambda``, ``tau``, ``alpha``). Each key gets
exactly one distribution::

    search:
      space:
        K: {grid: [5, 10, 20]}                # every value (grid search)
        lambda: {choice: [0.05, 0.1, 0.5]}    # sampled
        tau: {loguniform: [0.03, 0.3]}
        lr: {uniform: [1e-5, 1e-4]}

Pure: no Ray import at module level, so spaces validate before any cluster starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from umaf.config import StrictModel

# The papers' symbols → the TrainConfig keys they set (UMAF Eq. 4–6; SPP-SCL Eq. 7, Alg. 1).
ALIASES: dict[str, dict[str, str]] = {
    "umaf": {
        "K": "umaf.top_k",
        "k": "umaf.top_k",
        "lambda": "umaf.uniformity_weight",
        "tau": "umaf.uniformity_tau",
    },
    "sppscl": {
        "lambda": "sppscl.ce_weight",
        "tau": "sppscl.tau",
        "alpha": "sppscl.alpha",
    },
}


class Distribution(StrictModel):
    """One key's values: exactly one of grid / choice / uniform / loguniform / randint."""

    grid: list[Any] | None = Field(None, description="every value is tried (grid search)")
    choice: list[Any] | None = Field(None, description="values sampled uniformly")
    uniform: tuple[float, float] | None = Field(None, description="[low, high] sampled uniformly")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high] sampled log-uniformly")
    randint: tuple[int, int] | None = Field(None, description="[low, high) integers")

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [name for name in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform, randint (got {', '.join(given) or 'none'})"
            )
        for name in ("grid", "choice"):
            values = getattr(self, name)
            if values is not None and not values:
                raise ValueError(f"{name} needs at least one value")
        for name in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name} needs low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(n for n in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, n) is not None)

    def to_tune(self):
        from ray import tune

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(*self.randint)


class SearchConfig(StrictModel):
    algorithm: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every grid value (x num_samples); random: Tune's sampler; optuna: OptunaSearch (TPE)"
    )
    num_samples: int = Field(
        1, ge=1, description="grid: repeats of the full grid; random/optuna: number of trials"
    )
    seed: int = Field(0, description="seeds the sampler so a sweep is repeatable")
    space: dict[str, Distribution] = Field(default_factory=dict, description="swept keys (dotted or aliases)")

    @model_validator(mode="after")
    def _grid_only_for_grid(self) -> SearchConfig:
        kinds = {key: dist.kind for key, dist in self.space.items()}
        if self.algorithm == "optuna" and any(kind == "grid" for kind in kinds.values()):
            bad = [k for k, kind in kinds.items() if kind == "grid"]
            raise ValueError(f"optuna samples its own points: use choice instead of grid for {', '.join(bad)}")
        return self


def canonical_key(model: str, key: str) -> str:
    """``K`` → ``umaf.top_k`` for UMAF; dotted keys pass through."""
    return ALIASES.get(model, {}).get(key, key)


def resolve_space(model: str, space: dict[str, Distribution]) -> dict[str, Distribution]:
    """Aliases → dotted TrainConfig keys; two names for the same key is an error."""
    resolved: dict[str, Distribution] = {}
    for key, dist in space.items():
        target = canonical_key(model, key)
        if target in resolved:
            raise ValueError(f"search.space sets {target!r} twice (as {key!r} and another name)")
        resolved[target] = dist
    return resolved


def short_name(model: str, key: str) -> str:
    """Column name for a swept key: the paper's symbol where one exists (``K``), else the dotted key."""
    for alias, target in ALIASES.get(model, {}).items():
        if target == key and alias != "k":
            return alias
    return key


def nested_update(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``nested_update(d, "umaf.top_k", 4)`` sets ``d["umaf"]["top_k"] = 4``."""
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def grid_size(space: dict[str, Distribution]) -> int:
    size = 1
    for dist in space.values():
        if dist.grid is not None:
            size *= len(dist.grid)
    return size
