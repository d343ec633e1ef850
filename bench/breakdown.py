"""Where one attention call's time goes: a per-kernel breakdown from ``torch.profiler``.

The sweep says how long a forward+backward takes; this says which kernels take it: for our Triton
backend the forward, ``delta``, dK/dV and dQ kernels and the host-side table ops, for FlexAttention its
generated templates. ``triton-natural`` is our backend with its programs launched in the natural order
instead of heaviest first (kernels/work_order.py), for a direct comparison at the same shape;
``triton-1row`` and ``triton-natural-1row`` are the two orders on one row of ``seq_len`` tokens with 8
heads, where a launch has few programs per SM and the order matters most (``bench launch-order``).
``triton-split`` and ``triton-atomic`` pin the backward scheme (a dQ kernel, or dQ added by the dK/dV
kernel with atomics) that ``triton`` otherwise picks by timing both (``backward_mode("auto")``). Each
backend runs ``iters`` profiled steps at one shape after warm-up (compilation and autotuning happen
there, outside the profile), and every kernel's device time is divided by ``iters``. On a CPU there are
no device kernels, so the rows are the CPU operators' self time instead.

    python -m bench breakdown --out results/gpu [--seq-len 8192 --head-dim 128 --dtype bfloat16]
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.workloads import benchmark_layout
from transfusion.attention import all_backends, attend, get_backend
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance

FIELDS = ("backend", "mode", "batch", "heads", "kernel", "calls_per_step", "us_per_step", "share", "step_us")


@dataclass(frozen=True)
class Variant:
    """A breakdown-only name: a registered backend run in a launch order and, optionally, on one row."""

    backend: str
    order: str | None = None  # kernels.interval_attention.program_order, None: the default
    one_row_heads: int | None = None  # one row of seq_len tokens with this many heads instead of the shape
    backward: str | None = None  # kernels.interval_attention.backward_mode, None: the default ("auto")


VARIANTS: dict[str, Variant] = {
    "triton-natural": Variant("triton", order="natural"),
    "triton-1row": Variant("triton", one_row_heads=8),
    "triton-natural-1row": Variant("triton", order="natural", one_row_heads=8),
    "triton-split": Variant("triton", backward="split"),
    "triton-atomic": Variant("triton", backward="atomic"),
}


def known_backends() -> list[str]:
    """The names ``--backends`` takes: every registered attention backend and every breakdown variant."""
    return sorted({*all_backends(), *VARIANTS})


def check_backends(names: list[str]) -> None:
    """ValueError naming the unknown backends among ``names`` and listing the known ones."""
    unknown = [n for n in names if n not in known_backends()]
    if not names or unknown:
        what = f"unknown backend{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
        raise ValueError(f"{what if unknown else 'no backend'}; known: {', '.join(known_backends())}")


def _variant(name: str) -> Variant:
    return VARIANTS.get(name, Variant(name))


@contextmanager
def _variant_context(name: str) -> Iterator[None]:
    """The context a variant runs in (its launch order and backward scheme, for the triton variants)."""
    variant = _variant(name)
    with ExitStack() as stack:
        if variant.order is not None or variant.backward is not None:
            import importlib

            ia = importlib.import_module("kernels.interval_attention")
            if variant.order is not None:
                stack.enter_context(ia.program_order(variant.order))
            if variant.backward is not None:
                stack.enter_context(ia.backward_mode(variant.backward))
        yield


def _events(prof, device: torch.device) -> list[tuple[str, int, float]]:
    """(name, calls, total microseconds) of the device kernels, or of the CPU operators on a CPU."""
    out = []
    for evt in prof.key_averages():
        if device.type == "cuda":
            if evt.device_type != torch.autograd.DeviceType.CUDA or evt.self_device_time_total <= 0:
                continue
            out.append((evt.key, evt.count, float(evt.self_device_time_total)))
        elif evt.self_cpu_time_total > 0 and not evt.key.startswith("ProfilerStep"):
            out.append((evt.key, evt.count, float(evt.self_cpu_time_total)))
    return out


def _profile_steps(backend: str, layout, shape: tuple[int, ...], dtype: torch.dtype, iters: int):
    """Two warm-up forward+backward steps, then ``iters`` profiled ones; returns the profiler."""
    device = layout.device
    t = {n: torch.randn(*shape, device=device, dtype=dtype) for n in "qkvg"}
    for n in "qkv":
        t[n].requires_grad_(True)

    def step() -> None:
        attend(t["q"], t["k"], t["v"], layout, backend=backend).backward(t["g"])
        for n in "qkv":
            t[n].grad = None

    for _ in range(2):  # compilation, autotuning, caches: outside the profile
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def kernel_breakdown(
    backends: list[str],
    seq_len: int = 8192,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    heads: int = 16,
    tokens_per_batch: int = 32768,
    image_tokens: int = 256,
    image_fraction: float = 0.5,
    iters: int = 5,
    top: int = 12,
) -> list[dict]:
    """Profile forward+backward of each backend at one sweep shape; the ``top`` kernels per backend."""
    check_backends(backends)
    device = torch.device(device)
    rows: list[dict] = []
    for backend in backends:
        variant = _variant(backend)
        b, h = (
            (1, variant.one_row_heads)
            if variant.one_row_heads
            else (max(1, tokens_per_batch // seq_len), heads)
        )
        reason = get_backend(variant.backend).why_not(device.type, dtype, True, head_dim)
        if reason:
            rows.append(
                dict(backend=backend, mode="fwd_bwd", batch=b, heads=h, kernel=f"unsupported: {reason}")
            )
            continue
        layout = benchmark_layout(b, seq_len, image_tokens, image_fraction, device=device)
        with _variant_context(backend):
            prof = _profile_steps(variant.backend, layout, (b, h, seq_len, head_dim), dtype, iters)
        events = sorted(_events(prof, device), key=lambda e: -e[2])
        total = sum(us for _, _, us in events) / iters
        for name, calls, us in events[:top]:
            rows.append(
                dict(
                    backend=backend, mode="fwd_bwd", batch=b, heads=h, kernel=name[:120],
                    calls_per_step=calls / iters, us_per_step=us / iters,
                    share=(us / iters) / total if total else 0.0, step_us=total,
                )
            )  # fmt: skip
    return rows


def run(out_dir: Path, backends: list[str], device: str, **shape) -> list[dict]:
    """Profile and write ``kernel_breakdown.csv`` (+ provenance) under ``out_dir``. The CSV is rewritten
    after every backend, so a run cut short (the GPU script's time limit) keeps the backends it finished."""
    import pandas as pd

    check_backends(backends)  # before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v).removeprefix("torch.") for k, v in shape.items()}
    atomic_write_json(
        out_dir / "kernel_breakdown_provenance.json", provenance(device, backends=backends, **meta)
    )
    rows: list[dict] = []
    for backend in backends:
        rows += kernel_breakdown([backend], device=device, **shape)
        atomic_write_text(
            out_dir / "kernel_breakdown.csv", pd.DataFrame(rows, columns=FIELDS).to_csv(index=False)
        )
    return rows
