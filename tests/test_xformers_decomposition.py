"""The xformers backend's decomposition, checked on CPU by materializing xformers' own bias objects."""

import random

import pytest
import torch

from tests.random_layouts import definition_mask, random_row_spans, reference_attention
from tests.test_attention import random_batch, rel_err

pytest.importorskip("xformers.ops.fmha.attn_bias")

from transfusion.attention import attend  # noqa: E402
from transfusion.attention.xformers_ops import run_plan, xformers_plan  # noqa: E402
from transfusion.layout import AttentionLayout  # noqa: E402


def materialized_attention(q, k, v, bias, scale):
    """Reference for xformers' fused call: softmax(q k^T * scale + materialized bias) v in float64."""
    b = bias.materialize((q.shape[1], k.shape[1]), dtype=torch.float64)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale + b
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())


def test_biases_compose_to_the_layout_mask():
    rng = random.Random()
    for _ in range(30):
        L = rng.randint(1, 60)
        docs, images = random_row_spans(rng, L)
        layout = AttentionLayout.from_spans(L, docs, images)
        plan = xformers_plan(layout)
        allowed = torch.isfinite(plan.text_bias.materialize((L, L)))  # causal within doc / padding runs
        if plan.image_bias is not None:
            img = torch.isfinite(
                plan.image_bias.materialize((len(plan.image_q_index), len(plan.image_k_index)))
            )
            allowed[plan.image_q_index] = False
            rows, cols = img.nonzero(as_tuple=True)
            allowed[plan.image_q_index[rows], plan.image_k_index[cols]] = True
        valid = layout.valid[0]
        allowed[~valid] = False  # padding rows are zeroed after the call
        assert torch.equal(allowed, definition_mask(L, docs, images)), (docs, images)


def test_decomposition_matches_reference_forward_and_backward():
    rng = random.Random()
    for _ in range(20):
        L, B, H, D = rng.randint(1, 60), rng.randint(1, 3), 2, 16
        layout, mask = random_batch(rng, B, L)
        q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = run_plan(q, k, v, layout, D**-0.5, materialized_attention)
        ref = reference_attention(q, k, v, mask)
        assert rel_err(out, ref) < 1e-10
        g = torch.randn_like(out)
        for a, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            assert rel_err(a, r) < 1e-10


def test_fused_path_refuses_cpu_clearly():
    layout, _ = random_batch(random.Random(0), 1, 16)
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(RuntimeError, match="'xformers' cannot run this call: it runs on cuda, not cpu"):
        attend(q, q, q, layout, backend="xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["xformers", "xformers-dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_on_cuda(backend, dtype):
    from tests.test_attention import check_backend

    check_backend(
        backend, "cuda", dtype, backward=True, trials=6, seq_lens=[256, 999], tol=2e-2, head_dims=(32, 64)
    )
