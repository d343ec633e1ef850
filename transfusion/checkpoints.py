"""Checkpoints of a run directory, and loading a trained model back from one.

``out_dir/checkpoints/`` holds step_XXXXXXXX.safetensors (weights) + step_XXXXXXXX.state.pt (optimizer,
scheduler, data stream position, RNG states, log accumulators) and latest.json, each written atomically
(temporary file + os.replace); only the newest ``train.keep_checkpoints`` are kept.

FSDP checkpoints are gathered to full state dicts on rank 0 (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``): the weights file is the
same as DDP's and loads in one process; the optimizer state is stored keyed by parameter name
(``optimizer_format = "fqn"``), and a run may resume under another ``train.parallel`` (either format loads
either way).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from transfusion.config import ModelConfig
from transfusion.families import get_family
from transfusion.optimizer import build_optimizer
from transfusion.parallel import _unwrap
from transfusion.provenance import atomic_write_json
from transfusion.train_config import TrainConfig

CKPT_DIR = "checkpoints"
LATEST = "latest.json"


def latest_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``latest.json`` record ({"step", "model", "state"}) of a run directory, or None."""
    path = Path(out_dir) / CKPT_DIR / LATEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint; ``weights`` (a full state dict, e.g. gathered from FSDP shards) replaces
    ``model.state_dict()`` when given."""
    from safetensors.torch import save_file

    ckpt = out_dir / CKPT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    if weights is None:
        weights = _unwrap(model).state_dict()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    tmp = ckpt / f".{name}.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, ckpt / f"{name}.safetensors")
    tmp = ckpt / f".{name}.state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / f"{name}.state.pt")
    atomic_write_json(
        ckpt / LATEST, {"step": step, "model": f"{name}.safetensors", "state": f"{name}.state.pt"}
    )
    steps = sorted(int(p.name[5:13]) for p in ckpt.glob("step_*.safetensors"))
    for old in steps[:-keep]:
        if old != step:
            for suffix in (".safetensors", ".state.pt"):
                (ckpt / f"step_{old:08d}{suffix}").unlink(missing_ok=True)
    return ckpt / name


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _checkpoint_payload(model: nn.Module, opt: torch.optim.Optimizer, parallel: str):
    """(weights or None, optimizer state, optimizer format) to save. Under FSDP every rank must call this
    (the gathers are collective); rank 0 gets the full CPU tensors, the others empty dicts."""
    if parallel != "fsdp":
        return None, opt.state_dict(), "index"
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _full_state_options()
    weights = get_model_state_dict(model, options=opts)
    return weights, get_optimizer_state_dict(model, opt, options=opts), "fqn"


def _optimizer_state_by_name(model: nn.Module, state: dict[str, Any], cfg: TrainConfig, device) -> dict:
    """A checkpoint's optimizer state keyed by parameter name ("fqn" format), converting the index-keyed
    ``opt.state_dict()`` of a DDP / single-process run through a throwaway optimizer on the plain model."""
    if state.get("optimizer_format") == "fqn":
        return state["optimizer"]
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tmp = build_optimizer(model, cfg, device)
    tmp.load_state_dict(state["optimizer"])
    by_name = get_optimizer_state_dict(model, tmp)
    del tmp
    return by_name


def _load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, optim_state: dict, fqn: bool, sharded: bool
) -> None:
    """Load index-keyed (``opt.state_dict()``) or name-keyed ("fqn") optimizer state; under FSDP
    (``sharded``) the full name-keyed state is split into this rank's shards."""
    if not fqn:
        opt.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if sharded else None
    set_optimizer_state_dict(model, opt, optim_state, options=options)


def load_run_config(out_dir: str | Path) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """(model config, train config, full config.json) of a run directory."""
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    return ModelConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"]), cfg


def load_checkpoint_model(out_dir: str | Path, step: int | None = None, device: str = "cpu") -> nn.Module:
    """The model of a run directory with the weights of checkpoint ``step`` (default: the latest)."""
    from safetensors.torch import load_file

    model_cfg, train_cfg, _ = load_run_config(out_dir)
    ckdir = Path(out_dir) / CKPT_DIR
    if step is None:
        latest = latest_checkpoint(out_dir)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {ckdir}")
        name = latest["model"]
    else:
        name = f"step_{step:08d}.safetensors"
    model = get_family(train_cfg.family).build_model(model_cfg)
    model.load_state_dict(load_file(str(ckdir / name), device=device))
    return model.to(device)
