"""Parity FLOP ratio (paper Table 3): the share of the baseline's training compute at which Transfusion
reaches the baseline's final value of a metric.

Given Transfusion's metric at a few checkpoints (cumulative training FLOPs, value) and the baseline's final
value and total FLOPs, the ratio is ``F / baseline_flops`` where ``F`` is where Transfusion's curve first
reaches the target. Between two checkpoints the curve is read as a straight line in log-FLOPs, as one
reads a scaling plot. Two cases have no crossing to interpolate and are reported as bounds:

* ``at_most``: the first checkpoint already reaches the target (the ratio is at most its FLOPs share);
* ``more_than``: no checkpoint reaches it (the ratio is more than the last checkpoint's share).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Parity:
    ratio: float  # FLOPs share (exact, or the bound named by ``kind``)
    kind: Literal["exact", "at_most", "more_than"]
    target: float
    flops: float  # Transfusion FLOPs at the crossing (or at the bounding checkpoint)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        prefix = {"exact": "", "at_most": "<= ", "more_than": "> "}[self.kind]
        return f"{prefix}{self.ratio:.3g}"


def parity_flop_ratio(
    flops: Sequence[float],
    values: Sequence[float],
    target: float,
    baseline_flops: float,
    lower_is_better: bool = True,
) -> Parity:
    """Where the curve ``(flops, values)`` first reaches ``target``, as a share of ``baseline_flops``."""
    if len(flops) != len(values) or not flops:
        raise ValueError(f"flops ({len(flops)}) and values ({len(values)}) must be equally long, non-empty")
    if any(f <= 0 for f in flops) or baseline_flops <= 0:
        raise ValueError(f"FLOPs must be positive; got {list(flops)} and baseline_flops = {baseline_flops}")
    if any(b <= a for a, b in zip(flops, flops[1:])):
        raise ValueError(f"flops must increase along the curve; got {list(flops)}")
    if not all(math.isfinite(v) for v in values) or not math.isfinite(target):
        raise ValueError(f"values and target must be finite; got {list(values)} and {target}")

    def reached(v: float) -> bool:
        return v <= target if lower_is_better else v >= target

    for i, (f, v) in enumerate(zip(flops, values)):
        if not reached(v):
            continue
        if i == 0:
            return Parity(f / baseline_flops, "at_most", target, f)
        f0, v0 = flops[i - 1], values[i - 1]
        frac = (target - v0) / (v - v0)  # v0 has not reached the target, v has: 0 < frac <= 1
        log_f = math.log(f0) + frac * (math.log(f) - math.log(f0))
        return Parity(math.exp(log_f) / baseline_flops, "exact", target, math.exp(log_f))
    return Parity(flops[-1] / baseline_flops, "more_than", target, flops[-1])
