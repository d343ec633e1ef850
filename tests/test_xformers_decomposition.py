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


def test_pytorch_backed_operators_stay_usable_without_the_cpp_extension():
    """An xformers wheel built for another torch cannot load its C++ extension; its CUTLASS and flash
    operators are PyTorch's own aten kernels and must still dispatch (the extension-only ones must not)."""
    import xformers._cpp_lib as cpp_lib
    import xformers.ops.fmha as fmha
    from xformers.ops.fmha.torch_attention_compat import is_pt_cutlass_compatible

    from transfusion.attention.xformers_ops import enable_pytorch_backed_ops

    if cpp_lib._cpp_library_load_exception is None:
        pytest.skip("this xformers build loads its C++ extension: nothing to enable")
    if not is_pt_cutlass_compatible():
        pytest.skip("this torch's aten::_efficient_attention schema differs from what xformers expects")
    enable_pytorch_backed_ops()
    assert fmha.common._built_with_cuda
    assert fmha.cutlass.FwOp.is_available() and fmha.cutlass.BwOp.is_available()
    assert str(fmha.cutlass.FwOp.OPERATOR).startswith("aten.")  # PyTorch's kernel, not the extension's
    assert enable_pytorch_backed_ops() is not None  # idempotent


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["xformers", "xformers-dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xformers_on_cuda(backend, dtype):
    from tests.test_attention import check_backend

    check_backend(
        backend, "cuda", dtype, backward=True, trials=6, seq_lens=[256, 999], tol=2e-2, head_dims=(32, 64)
    )
