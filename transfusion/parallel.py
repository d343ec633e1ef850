"""Data parallelism: joining the process group under ``torchrun`` and choosing the model wrapper.

``train.parallel`` picks the wrapper under torchrun: "ddp" (default; ``DistributedDataParallel``),
"fsdp" (FSDP2: ``torch.distributed.fsdp.fully_shard`` on every transformer ``Block``, then on the root
model, the torchtitan pattern; parameters, gradients and optimizer state are sharded, and the gradient
reduce-scatter averages like DDP), "auto" (fsdp when the model has more than ``FSDP_AUTO_THRESHOLD``
parameters, else ddp) or "none" (one process only). The wrapping lives here and in the loop, not in the
model. How FSDP runs save and resume: ``transfusion.checkpoints``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from transfusion.devices import resolve_device
from transfusion.train_config import TrainConfig

FSDP_AUTO_THRESHOLD = 300_000_000  # train.parallel = "auto": fsdp for models with more parameters


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False


def init_distributed(train_cfg: TrainConfig) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dev = resolve_device(train_cfg, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP (fully_shard wraps in place: nothing to unwrap)
    return getattr(model, "_orig_mod", model)  # torch.compile


def resolve_parallel(train_cfg: TrainConfig, world_size: int, n_params: int) -> str:
    """The wrapper a run uses: "none" on one process, else ``train.parallel`` with "auto" resolved by
    the parameter count (fsdp above ``FSDP_AUTO_THRESHOLD``)."""
    if world_size <= 1:
        return "none"
    if train_cfg.parallel == "auto":
        return "fsdp" if n_params > FSDP_AUTO_THRESHOLD else "ddp"
    return train_cfg.parallel


def apply_fsdp(model: nn.Module, device: torch.device, world_size: int) -> int:
    """FSDP2 in place: ``fully_shard`` each transformer ``Block`` (its own all-gather / reduce-scatter
    unit), then the root (embeddings, adapters, heads, final norm). Returns the number of blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from transfusion.model import Block

    # Block returns (x, new_kv); the KV tensors are views, unused in training and never modified in
    # place, so FSDP2's warning about in-place ops on a view output does not apply here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    mesh = init_device_mesh(device.type, (world_size,))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def _grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a (replicated) DTensor when the gradients are DTensors (FSDP2)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
