"""The per-stage RoPE schedule of progressive context extension, and the config it writes.

Each training stage runs at a longer length than the one before and with a larger RoPE base,
so that the rotary frequencies still separate positions the model never saw. A stage's base is
given explicitly, or derived by the paper's rule (arXiv 2412.18860): x4 per doubling of the
length from the previous stage (x growth^log2(L_k / L_k-1) for other ratios), starting from
the base model's own length and base. The stage's `config.json` then carries its base in
`rope_parameters["rope_theta"]` (transformers 5) and its length in `max_position_embeddings`.

Models that ship a rope scaling (Llama-3.1's "llama3" type) are handled as asked: "keep" raises
only the base under the same scaling, "drop" replaces the scaling by plain RoPE at the new base.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

from longctx.errors import ConfigError, RuleError

PAPER_GROWTH = 4.0  # RoPE base multiplier per doubling of the length (the paper's rule)
ScalingPolicy = Literal["keep", "drop"]


@dataclass(frozen=True)
class Stage:
    """One stage as configured: its sequence length, and its RoPE base if given."""

    length: int
    rope_theta: float | None = None


@dataclass(frozen=True)
class ScheduledStage:
    """One stage as it will train: length and RoPE base, both decided."""

    index: int
    length: int
    rope_theta: float
    derived: bool  # True: the base came from the growth rule, not from the params


def base_rope(config: Any) -> tuple[int, float]:
    """(max_position_embeddings, rope_theta) of a transformers config; a model without RoPE
    cannot be extended this way, which is worth saying before any training starts."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    length = getattr(config, "max_position_embeddings", None)
    if theta is None or length is None:
        kind = getattr(config, "model_type", type(config).__name__)
        raise ConfigError(
            f"base model ({kind}) has no RoPE base (config.rope_parameters['rope_theta']) or no "
            "max_position_embeddings: progressive RoPE extension needs a rotary model")
    return int(length), float(theta)


def check_stages(stages: list[Stage], base_length: int | None, base_theta: float | None,
                 growth: float = PAPER_GROWTH, base: str = "the base model's"
                 ) -> list[float | None]:
    """Each stage's RoPE base, checking that lengths grow from `base_length` and bases never
    shrink: both would undo what the previous stage learned. Written once for both callers:
    training knows the base model's length and base; params alone (`longctx validate`) may
    know neither, so a check that needs an unknown (None) is skipped and a base derived from
    one stays None, as do the stages before the first explicit base. A broken rule raises
    RuleError keyed `[i].length` or `[i].rope_theta`; `base` names what stage 0 follows."""
    out: list[float | None] = []
    length, theta = base_length, base_theta
    for i, stage in enumerate(stages):
        before = f"stage {i - 1}'s" if i else base
        if length is not None and stage.length <= length:
            raise RuleError(f"[{i}].length", f"{stage.length} must exceed {before} {length} "
                            "(stages extend the context, each longer than the last)")
        if stage.rope_theta is not None:
            new_theta = float(stage.rope_theta)
        elif theta is not None and length is not None:
            new_theta = theta * growth ** math.log2(stage.length / length)
        else:
            new_theta = None
        if new_theta is not None and theta is not None and new_theta < theta:
            raise RuleError(f"[{i}].rope_theta", f"{new_theta:g} is below {before} {theta:g} "
                            "(a longer context needs a RoPE base at least as large)")
        out.append(new_theta)
        length, theta = stage.length, new_theta
    return out


def schedule(stages: list[Stage], base_length: int, base_theta: float,
             growth: float = PAPER_GROWTH, key: str = "train.stages") -> list[ScheduledStage]:
    """Every stage's (length, base), from the base model's own length and base."""
    if not stages:
        raise ConfigError(f"{key}: at least one stage is needed")
    if growth < 1:
        raise ConfigError(f"{key}: the RoPE growth per doubling must be >= 1, got {growth}")
    try:
        thetas = check_stages(stages, base_length, base_theta, growth)
    except RuleError as exc:
        raise ConfigError(str(exc.under(key))) from None
    return [ScheduledStage(i, stage.length, float(theta), stage.rope_theta is None)
            for i, (stage, theta) in enumerate(zip(stages, thetas))]


def stage_config(config: Any, stage: ScheduledStage, scaling: ScalingPolicy = "drop") -> Any:
    """A copy of `config` for one stage: its length and RoPE base, the scaling as asked."""
    base_rope(config)  # a clear error for a model without RoPE
    new = copy.deepcopy(config)
    params = dict(new.rope_parameters)
    if params.get("rope_type", "default") != "default" and scaling == "drop":
        params = {"rope_type": "default"}
    params["rope_theta"] = stage.rope_theta
    new.rope_parameters = params
    new.max_position_embeddings = stage.length
    return new
