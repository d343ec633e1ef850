import random

import pytest
import torch

from tests.random_layouts import definition_mask, random_row_spans, reference_attention
from transfusion.attention import attend, available_backends, get_backend
from transfusion.layout import AttentionLayout

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_batch(rng: random.Random, batch: int, seq_len: int, device: str = "cpu"):
    rows = [random_row_spans(rng, seq_len) for _ in range(batch)]
    layout = AttentionLayout.stack([AttentionLayout.from_spans(seq_len, d, i) for d, i in rows]).to(device)
    mask = torch.stack([definition_mask(seq_len, d, i) for d, i in rows]).to(device)
    return layout, mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, with ||b|| floored at 0.1 per element: inputs are unit-scale, and a reference
    that is (nearly) zero, such as dq of a query that sees one key, leaves only rounding noise."""
    a, b = a.detach().double(), b.detach().double()
    floor = 0.1 * b.numel() ** 0.5
    return float((a - b).norm() / b.norm().clamp_min(floor))


def check_backend(
    backend: str,
    device: str,
    dtype: torch.dtype,
    backward: bool,
    trials: int,
    seq_lens,
    tol,
    head_dims=(16, 32),
    batch_sizes=(1, 2, 3),
    heads=(1, 2),
):
    rng = random.Random()  # fresh layouts every run; the seed is printed on failure
    seed = random.randrange(2**32)
    rng.seed(seed)
    torch.manual_seed(seed)
    for trial in range(trials):
        L = rng.choice(seq_lens)
        B, H, D = rng.choice(batch_sizes), rng.choice(heads), rng.choice(head_dims)
        layout, mask = random_batch(rng, B, L, device)
        q, k, v = (
            torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=backward) for _ in range(3)
        )
        ref = reference_attention(q, k, v, mask)
        out = attend(q, k, v, layout, backend=backend)
        ctx = f"backend={backend} seed={seed} trial={trial} L={L}"
        assert out.shape == q.shape and out.dtype == dtype, ctx
        assert torch.isfinite(out).all(), ctx
        assert rel_err(out, ref) <= tol, f"forward {ctx}: {rel_err(out, ref)}"
        assert (out[~layout.valid[:, None].expand(B, H, L)] == 0).all(), f"padding not zero {ctx}"
        if backward:
            grad = torch.randn_like(out)
            ref_grads = torch.autograd.grad(ref, (q, k, v), grad.double())
            grads = torch.autograd.grad(out, (q, k, v), grad)
            for name, g, r in zip("qkv", grads, ref_grads):
                assert torch.isfinite(g).all(), f"d{name} {ctx}"
                assert rel_err(g, r) <= tol, f"d{name} {ctx}: {rel_err(g, r)}"


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_dense_backends_match_float64_reference(backend):
    check_backend(backend, "cpu", torch.float32, backward=True, trials=40, seq_lens=range(1, 70), tol=1e-5)


def test_flex_forward_on_cpu():
    # Fixed lengths: each new shape recompiles flex (seconds on CPU); layouts are fresh every trial.
    check_backend("flex", "cpu", torch.float32, backward=False, trials=12, seq_lens=[64, 200], tol=1e-5)


def test_triton_backend_through_attend_on_cpu_interpreter():
    pytest.importorskip("triton")
    missing = get_backend("triton").unavailable_reason()  # e.g. a Triton / NumPy pair it cannot run
    if missing:
        pytest.skip(missing)
    check_backend(
        "triton",
        "cpu",
        torch.float32,
        backward=True,
        trials=4,
        seq_lens=range(1, 40),
        tol=1e-4,
        head_dims=(32,),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["naive", "sdpa", "flex", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_on_cuda(backend, dtype):
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    # Fixed B, H, D: every new shape recompiles flex (seconds each); layouts are fresh every trial.
    shape = dict(head_dims=(64,), batch_sizes=(2,), heads=(2,))
    check_backend(backend, "cuda", dtype, backward=True, trials=6, seq_lens=[256, 1000], tol=tol, **shape)


def test_suffix_queries_match_full_attention():
    rng = random.Random()
    layout, _ = random_batch(rng, 2, 48)
    q, k, v = (torch.randn(2, 2, 48, 16) for _ in range(3))
    full = attend(q, k, v, layout, backend="sdpa")
    for backend in ("naive", "sdpa"):
        part = attend(q[:, :, 30:], k, v, layout.queries(30), backend=backend)
        torch.testing.assert_close(part, full[:, :, 30:], rtol=1e-5, atol=1e-6)


def test_unsupported_call_names_backend_reason_and_alternatives():
    layout = AttentionLayout.from_spans(8, [(0, 8)])
    q = torch.randn(1, 1, 8, 16, requires_grad=True)
    with pytest.raises(
        RuntimeError, match=r"'flex' cannot run this call: it has no backward pass on cpu.*'naive'"
    ):
        attend(q, q, q, layout, backend="flex")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attend(q, q, q, layout, backend="nope")
    with pytest.raises(ValueError, match="layout is"):
        attend(q[:, :, :4], q[:, :, :4], q[:, :, :4], layout)


def test_available_backends_reports_capabilities():
    assert {"naive", "sdpa", "flex"} <= set(available_backends("cpu", torch.float32, requires_grad=False))
    with_grad = available_backends("cpu", torch.float32, requires_grad=True)
    assert "flex" not in with_grad and {"naive", "sdpa"} <= set(with_grad)
    assert get_backend("flex").why_not("cpu", torch.float64, False, 16) is not None


def test_flex_block_mask_counts_only_touched_blocks():
    from transfusion.attention.flex import interval_block_mask

    layout = AttentionLayout.from_spans(512, [(0, 256), (256, 512)], [(100, 164)])
    bm = interval_block_mask(layout, block=128)
    dense = bm.to_dense()[0, 0]  # (q blocks, kv blocks) 0/1
    mask = layout.dense_mask()[0]
    touched = mask.view(4, 128, 4, 128).any(dim=(1, 3))
    assert torch.equal(dense.bool(), touched)
    assert bm is interval_block_mask(layout, block=128)  # cached on the layout
