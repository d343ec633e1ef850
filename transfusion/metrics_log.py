"""``metrics.jsonl``: one JSON row per logging step (columns: ``METRIC_FIELDS``). Reading skips a torn
last line; on resume the file is cut back to the checkpoint's step, so it never holds a step twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transfusion.provenance import atomic_write_text

METRIC_FIELDS = (
    "step",  # optimizer steps done
    "loss",  # mean total loss over the steps since the previous row (global batch)
    "lm_loss",  # same, LM part (per family: one "<part>_loss" per loss part)
    "diffusion_loss",  # same, diffusion part (unweighted; loss = lm_loss + lambda * diffusion_loss)
    "lr",  # learning rate used at this step
    "grad_norm",  # gradient norm at this step, before clipping
    "tokens_seen",  # non-padding positions trained on so far (text, <BOI>/<EOI>, image patches)
    "train_flops",  # FLOPs of step 1 (counted without attention + allowed-pair attention, all ranks) x step
    "wall_time",  # seconds spent in the training loop so far (over resumes)
)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
