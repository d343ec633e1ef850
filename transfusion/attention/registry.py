"""Attention backend registry: each backend declares what it supports; a dispatcher checks or explains.

Modelled on xformers' fmha operators: a backend says which devices, dtypes and head dims it handles
and where it has a backward pass; ``attend`` refuses anything else with the reason and the list of
backends that would work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from transfusion.layout import AttentionLayout

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionLayout, float], torch.Tensor]
# attention_stand_in's switch: process-wide (a FLOP count runs one step at a time), not per thread
_STAND_IN = False


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    backward_devices: tuple[str, ...]
    head_dims: tuple[int, ...] | None = None  # None: any head dim
    description: str = ""
    # Returns why the backend cannot run in this process (missing library), or None.
    unavailable_reason: Callable[[], str | None] = lambda: None
    # Builds and caches on the layout whatever the backend derives from it (mask, BlockMask, plan), so a
    # benchmark can time that step apart from the attention itself.
    prepare: Callable[[AttentionLayout], object] | None = None

    def why_not(
        self, device: str, dtype: torch.dtype, requires_grad: bool, head_dim: int | None
    ) -> str | None:
        """None if the backend supports this call, else a human-readable reason."""
        if device not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {device}"
        missing = self.unavailable_reason()  # after the device check: never import a CUDA library on CPU
        if missing:
            return missing
        if dtype not in self.dtypes:
            return f"supports {', '.join(str(d).removeprefix('torch.') for d in self.dtypes)}, not {dtype}"
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            return f"supports head dims {self.head_dims}, not {head_dim}"
        if requires_grad and device not in self.backward_devices:
            return f"has no backward pass on {device}" + (
                f" (backward on {'/'.join(self.backward_devices)})" if self.backward_devices else ""
            )
        return None


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in _BACKENDS:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def all_backends() -> list[str]:
    return list(_BACKENDS)


def available_backends(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    head_dim: int | None = None,
) -> list[str]:
    """Names of the backends that can run this call in this process."""
    dev = torch.device(device).type
    return [n for n, b in _BACKENDS.items() if b.why_not(dev, dtype, requires_grad, head_dim) is None]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if (layout.batch_size, layout.q_len, layout.kv_len) != (B, Lq, k.shape[2]):
        raise ValueError(
            f"layout is (batch={layout.batch_size}, q_len={layout.q_len}, kv_len={layout.kv_len}) but "
            f"q, k are (batch={B}, q_len={Lq}, kv_len={k.shape[2]})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout,
    backend: str = "sdpa",
    scale: float | None = None,
) -> torch.Tensor:
    """Interval-masked attention: q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D).

    Padding queries (empty interval) return zeros.
    """
    check_inputs(q, k, v, layout)
    if _STAND_IN:
        return _stand_in(q, k, v)
    b = get_backend(backend)
    requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    reason = b.why_not(q.device.type, q.dtype, requires_grad, q.shape[-1])
    if reason is not None:
        others = available_backends(q.device, q.dtype, requires_grad, q.shape[-1])
        raise RuntimeError(
            f"attention backend {backend!r} cannot run this call: it {reason}. "
            f"Backends that can: {others or 'none'}"
        )
    return b.fn(q, k, v, layout, q.shape[-1] ** -0.5 if scale is None else float(scale))


def _stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if q.shape != k.shape:
        raise ValueError(
            f"attention_stand_in covers self-attention only (q and k of one shape); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}"
        )
    return q + k + v


@contextmanager
def attention_stand_in() -> Iterator[None]:
    """Inside the context ``attend`` returns ``q + k + v`` (self-attention calls, Lq == Lk) instead of
    attending: no matmul, yet q, k and v all stay in the autograd graph. A FLOP count of a training step
    taken inside it is the step without attention (FLOP accounting only: the results are meaningless)."""
    global _STAND_IN
    old, _STAND_IN = _STAND_IN, True
    try:
        yield
    finally:
        _STAND_IN = old
