"""xformers backends: the interval mask as two block-diagonal calls, and a dense-bias variant.

``xformers`` decomposes the mask with xformers' own attention-bias objects (no L x L tensor):

1. every query, flattened over the batch, goes through one ``BlockDiagonalCausalMask`` call whose
   blocks are the documents (and padding runs) of every row: this is exactly right for text tokens;
2. the image patches go through one ``BlockDiagonalMask`` call: block i holds image i's patches as
   queries and its document prefix up to the image's last patch (``lo .. hi``) as keys, gathered;
3. the outputs are merged: image positions take call 2, padding is zeroed. Gradients flow through both.

``xformers-dense`` passes the derived mask as an additive tensor bias, for comparison. Both run on CUDA
only (xformers' fused kernels); the decomposition itself is tested on CPU by materializing the biases.
xformers' CUTLASS and flash operators are PyTorch's own aten kernels behind xformers' dispatch, so they
run even where xformers' C++ extension was built for another torch (``enable_pytorch_backed_ops``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from transfusion.attention.registry import Backend, register_backend
from transfusion.layout import AttentionLayout


@functools.cache
def _xformers_unavailable() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # ImportError, or a broken binary build
        return f"needs xformers ({type(e).__name__}: {e})"
    enable_pytorch_backed_ops()
    return None


@functools.cache
def enable_pytorch_backed_ops() -> bool:
    """Let xformers dispatch its PyTorch-backed operators when its own C++ extension cannot load.

    xformers' CUTLASS fmha operator *is* PyTorch's ``aten::_efficient_attention_forward`` / ``_backward``
    (xformers upstreamed it), and without the ``flash_attn`` package its flash operator wraps PyTorch's
    ``aten::_flash_attention_forward`` / ``_backward``. But when the C++ extension fails to load (a wheel
    built for another torch: xformers 0.0.35 targets torch 2.10), xformers flags the whole library as
    "not built with CUDA" and refuses every operator. If the aten schemas are the ones xformers expects
    (its own ``is_pt_cutlass_compatible`` check), clear that flag; operators that do need the extension
    stay refused by their own availability check. Returns whether the flag was cleared.
    """
    import xformers._cpp_lib as cpp_lib
    import xformers.ops.fmha.common as fmha_common
    from xformers.ops.fmha.torch_attention_compat import is_pt_cutlass_compatible

    if fmha_common._built_with_cuda or cpp_lib._cpp_library_load_exception is None:
        return False  # a working build: nothing to do
    if torch.version.hip is not None or not is_pt_cutlass_compatible():
        return False
    fmha_common._built_with_cuda = True
    return True


@dataclass
class XformersPlan:
    """Everything the two fused calls need, derived from the layout (cached per layout)."""

    text_bias: object  # BlockDiagonalCausalMask over B * L flattened tokens
    image_bias: object | None  # BlockDiagonalMask: image patches vs their prefix keys
    image_q_index: torch.Tensor  # (Nq,) flat indices of image patches, in image order
    image_k_index: torch.Tensor  # (Nk,) flat indices of the gathered prefix keys


def xformers_plan(layout: AttentionLayout) -> XformersPlan:
    if "xformers_plan" in layout.cache:
        return layout.cache["xformers_plan"]
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask, BlockDiagonalMask

    if layout.q_offset != 0:
        raise NotImplementedError(
            f"the xformers backend takes full rows (q_offset = 0); got q_offset = {layout.q_offset}"
        )
    B, L = layout.batch_size, layout.q_len
    doc_id = layout.doc_id.cpu()
    lo, hi = layout.lo.cpu(), layout.hi.cpu()
    seqlens: list[int] = []
    q_idx: list[torch.Tensor] = []
    k_idx: list[torch.Tensor] = []
    q_lens: list[int] = []
    k_lens: list[int] = []
    for b in range(B):
        # Runs of equal doc id (padding runs included) are the causal blocks of this row.
        change = torch.nonzero(doc_id[b, 1:] != doc_id[b, :-1]).flatten() + 1
        bounds = [0, *change.tolist(), L]
        seqlens += [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        for start, end in layout.image_spans[b]:
            key_lo, key_hi = int(lo[b, start]), int(hi[b, start])
            q_idx.append(torch.arange(start, end) + b * L)
            k_idx.append(torch.arange(key_lo, key_hi + 1) + b * L)
            q_lens.append(end - start)
            k_lens.append(key_hi + 1 - key_lo)
    device = layout.device
    plan = XformersPlan(
        text_bias=BlockDiagonalCausalMask.from_seqlens(seqlens, device=device),
        image_bias=BlockDiagonalMask.from_seqlens(q_lens, k_lens, device=device) if q_lens else None,
        image_q_index=(torch.cat(q_idx) if q_idx else torch.zeros(0, dtype=torch.long)).to(device),
        image_k_index=(torch.cat(k_idx) if k_idx else torch.zeros(0, dtype=torch.long)).to(device),
    )
    layout.cache["xformers_plan"] = plan
    return plan


def run_plan(q, k, v, layout: AttentionLayout, scale: float, attention_fn) -> torch.Tensor:
    """Execute the decomposition with ``attention_fn(q, k, v, bias, scale)`` on (1, N, H, D) tensors.

    On CUDA ``attention_fn`` is xformers' fused kernel; tests pass a materializing reference on CPU.
    """
    plan = xformers_plan(layout)
    B, H, L, D = q.shape
    flat = lambda t: t.transpose(1, 2).reshape(1, B * L, H, D)  # (B, H, L, D) -> (1, B*L, H, D)
    qf, kf, vf = flat(q), flat(k), flat(v)
    out = attention_fn(qf, kf, vf, plan.text_bias, scale)
    if plan.image_bias is not None:
        img = attention_fn(
            qf[:, plan.image_q_index],
            kf[:, plan.image_k_index],
            vf[:, plan.image_k_index],
            plan.image_bias,
            scale,
        )
        out = out.index_copy(1, plan.image_q_index, img)
    out = out.reshape(B, L, H, D).transpose(1, 2)
    return out * layout.valid[:, None, :, None].to(out.dtype)


def _fused(q, k, v, bias, scale):
    import xformers.ops as xops

    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


def xformers_attention(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    return run_plan(q, k, v, layout, scale, _fused)


def xformers_dense_attention(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    import xformers.ops as xops

    B, H, L, D = q.shape
    bias = layout.cache.get(("xformers_dense_bias", q.dtype))
    if bias is None:
        mask = layout.dense_mask()
        pad_q = (~layout.valid).nonzero(as_tuple=True)  # padding sees itself: no all -inf row, no NaN
        mask[pad_q[0], pad_q[1], pad_q[1] + layout.q_offset] = True
        # xformers wants the bias's last-dim stride aligned to 8 elements: allocate wider, then slice.
        width = -(-layout.kv_len // 8) * 8
        full = torch.full((B, 1, L, width), float("-inf"), dtype=q.dtype, device=q.device)
        full[..., : layout.kv_len].masked_fill_(mask[:, None], 0.0)
        bias = full[..., : layout.kv_len].expand(B, H, L, layout.kv_len)
        layout.cache[("xformers_dense_bias", q.dtype)] = bias
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    ).transpose(1, 2)
    return out * layout.valid[:, None, :, None].to(out.dtype)


_XF_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
register_backend(
    Backend(
        name="xformers",
        prepare=xformers_plan,
        fn=xformers_attention,
        devices=("cuda",),
        dtypes=_XF_DTYPES,
        backward_devices=("cuda",),
        description="xformers fused: causal block-diagonal over documents + block-diagonal image calls",
        unavailable_reason=_xformers_unavailable,
    )
)
register_backend(
    Backend(
        name="xformers-dense",
        fn=xformers_dense_attention,
        devices=("cuda",),
        dtypes=_XF_DTYPES,
        backward_devices=("cuda",),
        description="xformers fused attention with the derived mask as a dense additive bias",
        unavailable_reason=_xformers_unavailable,
    )
)
