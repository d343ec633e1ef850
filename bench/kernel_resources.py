"""Compile-time resources of the Triton kernel's candidate configs, without a GPU.

Triton compiles for any CUDA target on a CPU-only machine (it ships ``ptxas`` and ``cuobjdump``): this
suite compiles the forward, dK/dV and dQ kernels of ``kernels/interval_attention.py`` for every autotuning
candidate of one (dtype, head dim) on a chosen architecture (default sm90: H100/H200) and records what
the compiler decided: registers per thread, spill stack and local memory, shared memory, an occupancy
estimate (resident CTAs per SM from registers, shared memory and warps), and how the operands are loaded
(pipelined ``cp.async``, TMA bulk copies, or plain synchronous ``ld.global``) and multiplied (``wgmma``).
Kernel engineers can see why a config is slow, or cannot launch, before a GPU session is spent on it.

It must run in a process where Triton is *not* in interpreter mode (``TRITON_INTERPRET=0`` before
``kernels`` is imported); ``python -m bench kernels`` takes care of that.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

# Per-SM limits of the architectures we report on (CUDA programming guide, compute capability tables).
# The kernels compiled by default; dkdv-atomic is the dK/dV kernel of the atomic backward scheme.
KERNELS: tuple[str, ...] = ("fwd", "dkdv", "dkdv-atomic", "dq")
SM_LIMITS = {
    90: {"registers": 65536, "shared_bytes": 228 * 1024, "block_shared_bytes": 227 * 1024, "warps": 64},
    80: {"registers": 65536, "shared_bytes": 164 * 1024, "block_shared_bytes": 163 * 1024, "warps": 64},
}
_RESERVED_SHARED = 1024  # the driver reserves 1 KB of shared memory per resident block


@contextmanager
def compile_only_target(arch: int):
    """Make Triton's active driver a stand-in that only answers "what is the target": enough for
    ``JITFunction.run(..., warmup=True)`` to compile without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _CompileOnly:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    previous = driver._active  # reset_active() would build the default driver, which needs a GPU
    driver.set_active(_CompileOnly())
    try:
        yield
    finally:
        driver._active = previous


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if "REG:" in ln)
    fields = dict(re.findall(r"(\w+):(\d+)", line))
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def _occupancy(arch: int, registers: int, shared: int, warps: int) -> int:
    lim = SM_LIMITS.get(arch, SM_LIMITS[90])
    per_warp_regs = ((registers + 7) // 8 * 8) * 32  # allocated per warp, in steps of 8 per thread
    by_regs = lim["registers"] // (per_warp_regs * warps)
    by_shared = lim["shared_bytes"] // (shared + _RESERVED_SHARED)
    by_warps = lim["warps"] // warps
    return min(by_regs, by_shared, by_warps)


def _plain_forward_kernel():
    """A yardstick: the plain flash-attention forward loop (every key block, no mask, no tile plan),
    compiled with the same configs, so the table shows what the interval logic costs in registers."""
    import triton
    import triton.language as tl

    @triton.jit
    def plain_fwd(Q, K, V, OUT, qk_scale, L, NB, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):  # fmt: skip
        bh = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        base = bh * L * HEAD_DIM
        q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for blk in range(0, NB):
            offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(K + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
            v = tl.load(V + base + offs_n[:, None] * HEAD_DIM + offs_d[None, :])
            s = tl.dot(q, tl.trans(k)) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(OUT + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(OUT.dtype.element_ty))

    return plain_fwd


def _kernel_args(kernel: str, dtype: torch.dtype, head_dim: int, bm: int, bn: int, tma: bool) -> tuple:
    """Stand-in CPU arguments with the launch's types and alignment (never read: compile only)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from kernels.work_order import order_shape

    bsz, heads, length = 1, 2, 256
    x = torch.empty(bsz, heads, length, head_dim, dtype=dtype)
    rows = bsz * heads * length
    vec = torch.empty(bsz, heads, length, dtype=torch.float32)
    lo = torch.zeros(bsz, length, dtype=torch.int32)
    counter = torch.zeros(2, dtype=torch.int32)
    order = torch.zeros(order_shape(bsz, length, length), dtype=torch.int32)[0]  # one side of the table

    def desc(block: int):
        return TensorDescriptor(x, [rows, head_dim], [head_dim, 1], [block, head_dim]) if tma else x

    ints = (heads, length, length)  # H, LQ, LK
    keys = (256, 256, 0)  # LQ_KEY, LK_KEY, TUNE_TAG
    stride = order.shape[1]  # ORDER_STRIDE
    if kernel == "fwd":
        return (x, x, x, desc(bn), desc(bn), x, vec, lo, lo, order, counter, 0.1, *ints, stride, 1, *keys)
    if kernel == "dq":
        return (
            x, x, x, desc(bn), desc(bn), x, x, vec, vec, lo, lo, order, counter, 0.1, 0.1, *ints, stride, 1,
            *keys,
        )  # fmt: skip
    table = torch.zeros(bsz, 64, 4, dtype=torch.int32)
    dq_acc = torch.empty(bsz, heads, length, head_dim, dtype=torch.float32)
    return (
        x,
        x,
        x,
        x,
        desc(bm),
        desc(bm),
        x,
        x,
        dq_acc,
        vec,
        vec,
        lo,
        lo,
        table,
        order,
        counter,
        0.1,
        0.1,
        *ints,
        64,
        stride,
        1,  # ORDERED
        *keys,
    )


def compile_candidates(
    dtype: torch.dtype = torch.bfloat16, head_dim: int = 128, arch: int = 90, kernels: tuple[str, ...] = ()
) -> list[dict]:
    """Compile every candidate config of each kernel for ``sm_<arch>`` and report its resources."""
    import importlib

    ia = importlib.import_module("kernels.interval_attention")
    if ia.INTERPRET:
        raise RuntimeError("kernel resources need TRITON_INTERPRET=0 before kernels is imported")
    # dkdv-atomic: the dK/dV kernel of the atomic backward scheme (it also adds dQ)
    jit = {
        "fwd": ia._fwd_kernel.fn,
        "dkdv": ia._bwd_dkdv_kernel.fn,
        "dkdv-atomic": ia._bwd_dkdv_kernel.fn,
        "dq": ia._bwd_dq_kernel.fn,
    }
    dot_precision = ia._dot_precision(dtype)
    plain = _plain_forward_kernel()
    x = torch.empty(1, 2, 256, head_dim, dtype=dtype)
    rows = []
    with compile_only_target(arch):
        for kernel in kernels or KERNELS:
            cands = ia._GPU_CANDIDATES[kernel][(ia._dtype_class(dtype), head_dim)]
            # The plain forward yardstick, once per pointer config of the forward kernel.
            todo = [(kernel, c) for c in cands]
            todo += [("fwd-plain", c) for c in cands if kernel == "fwd" and not c[4]]
            for name, (bm, bn, warps, stages, tma, *dq_t) in todo:
                dq_t = bool(dq_t and dq_t[0])  # dkdv-atomic: the dQ product computed transposed
                t0 = time.perf_counter()
                if name == "fwd-plain":
                    compiled = plain.run(
                        x, x, x, x, 0.1, 256, 4, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn,
                        num_warps=warps, num_stages=stages, grid=(1,), warmup=True,
                    )  # fmt: skip
                else:
                    compiled = jit[kernel].run(
                        *_kernel_args(kernel.removesuffix("-atomic"), dtype, head_dim, bm, bn, tma),
                        HEAD_DIM=head_dim, DOT_PRECISION=dot_precision, COUNT_TILES=False,
                        BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma, num_warps=warps, num_stages=stages, grid=(1,),
                        warmup=True,
                        **({"CHUNK_": ia.CHUNK, "DQ_ATOMIC": kernel == "dkdv-atomic", "DQ_T": dq_t}
                           if kernel.startswith("dkdv") else {}),
                    )  # fmt: skip
                compile_s = time.perf_counter() - t0
                ptx = compiled.asm["ptx"]
                usage = _resource_usage(compiled.asm["cubin"])
                shared = int(compiled.metadata.shared)
                limit = SM_LIMITS.get(arch, SM_LIMITS[90])["block_shared_bytes"]
                rows.append(
                    dict(
                        kernel=name, dtype=str(dtype).removeprefix("torch."), head_dim=head_dim,
                        arch=f"sm{arch}", block_m=bm, block_n=bn, warps=warps, stages=stages, tma=tma,
                        dq_transposed=dq_t, atomics=len(re.findall(r"\b(?:atom|red)\.global", ptx)),
                        vector_atomics=len(re.findall(r"\b(?:atom|red)\.global\S*\.v[248]\.", ptx)),
                        mma_sync=ptx.count("mma.sync"),
                        **usage, shared_kb=round(shared / 1024, 1), fits=shared <= limit,
                        ctas_per_sm=_occupancy(arch, usage["registers"], shared, warps),
                        wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async.cg") +
                        ptx.count("cp.async.ca"), tma_copies=ptx.count("cp.async.bulk.tensor"),
                        ld_global=ptx.count("ld.global"), compile_s=round(compile_s, 2),
                    )
                )  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    from kernels.config_names import config_name  # here: kernels is imported once TRITON_INTERPRET is set

    cols = [
        ("kernel", "kernel"), ("config", None), ("regs", "registers"), ("stack", "stack"),
        ("shared KB", "shared_kb"), ("CTAs/SM", "ctas_per_sm"), ("wgmma", "wgmma"),
        ("cp.async", "cp_async"), ("TMA", "tma_copies"), ("ld.global", "ld_global"),
        ("mma.sync", "mma_sync"), ("atomics", "atomics"),
    ]  # fmt: skip
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        config = config_name(
            (r["block_m"], r["block_n"], r["warps"], r["stages"], r["tma"], r.get("dq_transposed"))
        )
        cells = [config if key is None else str(r[key]) for _, key in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(
    out_dir: Path, dtype: str, head_dim: int, arch: int, kernels: tuple[str, ...] = KERNELS
) -> list[dict]:
    """Compile, then write ``kernel_resources.csv`` / ``.md`` and provenance under ``out_dir``."""
    import pandas as pd

    from transfusion.provenance import atomic_write_json, atomic_write_text, provenance

    rows = compile_candidates(getattr(torch, dtype), head_dim, arch, kernels)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "kernel_resources.csv", pd.DataFrame(rows).to_csv(index=False))
    meta = provenance("cpu", target=f"sm{arch}", dtype=dtype, head_dim=head_dim)
    atomic_write_json(out_dir / "kernel_resources_provenance.json", meta)
    header = (
        f"# Triton kernel candidates compiled for sm{arch}, {dtype}, D = {head_dim}\n\n"
        f"Triton {meta.get('triton')}; commit {meta.get('commit')}; compile only, no GPU: registers and "
        "spills from cuobjdump, shared memory from the compiler; CTAs/SM is the occupancy those allow.\n\n"
    )
    atomic_write_text(out_dir / "kernel_resources.md", header + markdown_table(rows))
    return rows
