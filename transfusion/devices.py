"""Where and how a run computes: the device (``train.device``), the attention backend that trains there,
the precision (bf16 autocast or fp32) and the number of CPU threads."""

from __future__ import annotations

import os

import torch

from transfusion.config import ModelConfig
from transfusion.train_config import ConfigError, TrainConfig


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this machine has; a one-line ValueError naming it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{str(device)!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{str(device)!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # a device type this build of torch or this machine lacks
            raise ValueError(f"{str(device)!r} is not usable here ({str(e).splitlines()[0]})") from None
    return dev


def resolve_device(train_cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    if train_cfg.device == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        name = train_cfg.device
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {train_cfg.device!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def resolve_attention(train_cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> ModelConfig:
    """The model config with the attention backend the run uses (checked to run here, with gradients)."""
    from transfusion.attention import registry

    dtype = torch.bfloat16 if _use_bf16(train_cfg, device) else torch.float32
    name = train_cfg.attention
    if name == "auto":
        name = model_cfg.attention
        if device.type == "cuda" and "flex" in registry.available_backends(
            device, dtype, True, model_cfg.head_dim
        ):
            name = "flex"
    key = "train.attention" if train_cfg.attention != "auto" else "model.attention"
    try:
        backend = registry.get_backend(name)
    except ValueError as e:
        raise ConfigError(f"{key} = {name!r}: {e}") from None
    why = backend.why_not(device.type, dtype, True, model_cfg.head_dim)
    if why is not None:
        ok = registry.available_backends(device, dtype, True, model_cfg.head_dim)
        raise ConfigError(f"{key} = {name!r} cannot train here: it {why}; usable: {ok}")
    return model_cfg if name == model_cfg.attention else model_cfg.replace(attention=name)


def _use_bf16(train_cfg: TrainConfig, device: torch.device) -> bool:
    return train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")


def resolve_threads(requested: int = 0, procs_per_machine: int = 1) -> int:
    """CPU threads for this process.

    ``requested > 0`` is used as is. ``0`` (auto): torch's current setting when ``OMP_NUM_THREADS`` is set,
    else the cores not already busy (cores minus the 1-minute load average, rounded, at least 1) divided
    among this machine's processes. Why: OpenMP threads spin while they wait for each other, so asking
    for more threads than there are free cores makes small-tensor CPU training several times slower (on
    a shared 2-core machine we measured 10-20x), while using fewer costs at most the parallel speed-up.
    """
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = max(1, min(cores, round(cores - busy)))
    return max(1, free // max(1, procs_per_machine))
