"""`python -m bench kernels`: the Triton kernels compile for sm90 on a CPU-only machine, and what the
compiler reports (registers, shared memory, load paths) is read back correctly.

The checks are on the compiled code itself: the forward kernel's full-tile loop must be software-pipelined
(``cp.async`` copies and shared-memory buffers for every stage) in the pointer configs, and must use TMA
bulk copies instead in the TMA configs. A Triton upgrade that stops pipelining the loop fails here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_nvidia_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


@pytest.mark.skipif(not _has_nvidia_tools(), reason="needs Triton's bundled ptxas and cuobjdump")
def test_forward_candidates_compile_for_sm90_with_pipelined_loads(tmp_path):
    out = tmp_path / "kernels"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "kernels",
        "--kernels",
        "fwd",
        "--head-dim",
        "32",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(out / "kernel_resources.csv")
    assert set(df.kernel) == {"fwd", "fwd-plain"}  # fwd-plain: the unmasked flash loop, a yardstick
    ours = df[df.kernel == "fwd"]
    assert len(ours) >= 2 and ours.tma.any() and (~ours.tma).any()
    assert len(df[df.kernel == "fwd-plain"]) == (~ours.tma).sum()
    assert ((df.registers > 0) & (df.registers <= 255)).all()
    assert df.fits.all() and (df.ctas_per_sm >= 1).all() and (df.wgmma > 0).all()
    for r in df.itertuples():
        # K and V buffers for every pipeline stage live in shared memory (bf16: 2 bytes).
        assert r.shared_kb * 1024 >= r.stages * 2 * r.block_n * 32 * 2, r
        if r.tma:
            assert r.tma_copies > 0 and r.cp_async == 0, r
        else:
            assert r.cp_async > 0 and r.tma_copies == 0, r
    assert "| fwd |" in (out / "kernel_resources.md").read_text()
    assert "sm90" in (out / "kernel_resources_provenance.json").read_text()


@pytest.mark.skipif(not _has_nvidia_tools(), reason="needs Triton's bundled ptxas and cuobjdump")
def test_atomic_backward_kernel_compiles_with_vector_atomics(tmp_path):
    """The atomic scheme's dK/dV kernel adds dQ with vectorized fp32 atomics (and only it: the split
    scheme's kernel has the dQ code compiled out); each of its candidates fits an sm90 SM."""
    out = tmp_path / "kernels"
    cmd = [sys.executable, "-m", "bench", "kernels", "--kernels", "dkdv,dkdv-atomic", "--head-dim", "32"]
    done = subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    df = pd.read_csv(out / "kernel_resources.csv")
    split, atomic = df[df.kernel == "dkdv"], df[df.kernel == "dkdv-atomic"]
    assert len(split) >= 3 and len(atomic) >= 2
    assert (split.atomics == 0).all() and (~split.dq_transposed).all()
    assert (atomic.atomics > 0).all() and atomic.fits.all() and (atomic.ctas_per_sm >= 1).all()
    assert (atomic.vector_atomics == atomic.atomics).all()  # 2 or 4 floats per instruction, not one
    assert "| dkdv-atomic |" in (out / "kernel_resources.md").read_text()
