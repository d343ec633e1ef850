"""Training FLOPs: an analytic count and a measured one, and how they relate.

Analytic (per training step, forward + backward = 3 x forward):

* dense layers, the "6 N D" rule: every weight matrix costs 2 FLOPs per parameter per position it is
  applied to in the forward pass, and twice that in the backward pass (gradients of input and weight).
  Counted exactly by where each matrix runs:
    - transformer blocks (attention projections + SwiGLU): on every one of the B x L positions (padding
      included: the model computes on it);
    - LM head: only on positions with an LM target (``Transfusion`` gathers them first);
    - linear image adapter: patch projections on every patch, the timestep MLP once per image.
      (A U-Net adapter has convolutions; its FLOPs are measured on the meta device, see below.)
  Embedding lookups, norms, activations, softmax and RoPE are not counted (they are not matmuls).
* attention: ``4 * head_dim`` FLOPs per (query, key) pair per head per layer in the forward pass (QK^T and
  PV), times 3 for training. ``attention_allowed`` counts only the pairs the interval layout allows (the
  work an ideal kernel does); ``attention_dense`` counts all ``B * L * L`` pairs (what the dense-mask
  backends "naive" and "sdpa" compute).

Measured: ``torch.utils.flop_counter.FlopCounterMode`` counts matmuls/convolutions/attention ops by their
shapes. What it sees for attention depends on the backend:

* ``naive``: explicit ``q @ k^T`` and ``p @ v`` batched matmuls over the full L x L score matrix, and their
  autograd backward (2 matmuls each): exactly ``attention_dense``.
* ``sdpa`` on CPU dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``, which this torch has no
  formula for (it would count 0); ``COUNTER_FORMULAS`` adds torch's own SDPA formulas for it. Those count
  the backward as 2.5 x forward (a flash backward recomputes the scores), so the measured dense attention is
  3.5 / 3 of ``attention_dense``.
* ``flex`` (CUDA) is counted by torch's flex formulas, which count the full dense score matrix as well.

* ``triton`` (our kernel) is invisible to the counter: it counts 0.

The differences that remain against the analytic dense count are small and one-sided: the adapter's first
layers (patch projection, timestep MLP input) take inputs that need no gradient, so autograd skips their
input-gradient matmul (4 instead of 6 FLOPs per parameter and use). ``tests/test_flops.py`` checks the
agreement.

What training records (the x axis of every parity comparison) is therefore neither count alone: the
trainer counts the step a second time with attention replaced by a matmul-free stand-in
(:func:`measure_without_attention`), which leaves exactly the non-attention FLOPs whatever the backend,
and adds the analytic attention on allowed pairs. The two families then pay for the attention their
masks need, not for what one backend happens to compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils.flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode

from transfusion.config import ModelConfig
from transfusion.packing import PackedBatch

TRAIN_MULTIPLIER = 3  # forward + backward (2 x forward)


def _cpu_flash_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query, key, value)


def _cpu_flash_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out, query, key, value)


# FLOP formulas FlopCounterMode lacks in this torch (the CPU SDPA kernels), keyed by op overload packet.
COUNTER_FORMULAS: dict[Any, Callable[..., int]] = {}
for _name, _fn in (
    ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_fwd),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_bwd),
):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None and _op not in _fc.flop_registry:
        COUNTER_FORMULAS[_op] = _fn


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU SDPA kernels."""
    return FlopCounterMode(display=False, custom_mapping=COUNTER_FORMULAS)


@dataclass(frozen=True)
class FlopEstimate:
    """Analytic FLOPs of one step (training: forward + backward), by part."""

    transformer: float
    lm_head: float
    adapter: float
    attention_allowed: float
    attention_dense: float
    positions: int  # B * L
    tokens: int  # non-padding positions
    lm_tokens: int
    images: int
    allowed_pairs: int  # summed over rows (per head and layer)
    dense_pairs: int

    @property
    def dense(self) -> float:
        """All dense-layer FLOPs (the 6ND part)."""
        return self.transformer + self.lm_head + self.adapter

    @property
    def total(self) -> float:
        """Dense layers + attention on allowed pairs only (the work the model needs)."""
        return self.dense + self.attention_allowed

    @property
    def total_dense_attention(self) -> float:
        """Dense layers + attention on every (q, k) pair (the work dense-mask backends do)."""
        return self.dense + self.attention_dense

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(dense=self.dense, total=self.total, total_dense_attention=self.total_dense_attention)
        return d


def transformer_matmul_params(cfg: ModelConfig) -> int:
    """Weight-matrix parameters of the transformer blocks (norm gains excluded)."""
    return cfg.n_layers * (4 * cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_hidden_dim)


def attention_flops(cfg: ModelConfig, pairs: int, training: bool = True) -> float:
    """FLOPs of attention over ``pairs`` (query, key) pairs per head, all layers."""
    mult = TRAIN_MULTIPLIER if training else 1
    return float(mult * 4 * cfg.head_dim * pairs * cfg.n_heads * cfg.n_layers)


def adapter_flops(cfg: ModelConfig, images: int, training: bool = True) -> float:
    """FLOPs of the image adapter for ``images`` images (encode + decode)."""
    if images == 0:
        return 0.0
    mult = TRAIN_MULTIPLIER if training else 1
    if cfg.adapter == "linear":
        n = cfg.patches_per_image
        per_image = 2 * n * (2 * cfg.patch_dim * cfg.dim)  # in_proj + out_proj on every patch
        per_image += 2 * (cfg.timestep_freq_dim * cfg.dim + cfg.dim * cfg.dim)  # timestep MLP
        return float(mult * per_image * images)
    return float(mult * _measured_adapter_forward(cfg) * images)


_ADAPTER_CACHE: dict[str, int] = {}


def _measured_adapter_forward(cfg: ModelConfig) -> int:
    """Forward FLOPs of one image through a non-linear adapter, counted on the meta device (no compute)."""
    import json

    from transfusion.adapters import build_adapter

    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _ADAPTER_CACHE:
        with torch.device("meta"):
            adapter = build_adapter(cfg)
            x = torch.zeros(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
            t = torch.zeros(1, dtype=torch.long)
        with flop_counter() as fc, torch.no_grad():
            tokens, ctx = adapter.encode(x, t)
            adapter.decode(tokens, ctx)
        _ADAPTER_CACHE[key] = fc.get_total_flops()
    return _ADAPTER_CACHE[key]


def analytic_flops(
    cfg: ModelConfig,
    positions: int,
    lm_tokens: int,
    images: int,
    allowed_pairs: int,
    dense_pairs: int,
    tokens: int | None = None,
    training: bool = True,
) -> FlopEstimate:
    """Analytic FLOPs from counts (see the module docstring)."""
    mult = TRAIN_MULTIPLIER if training else 1
    return FlopEstimate(
        transformer=float(mult * 2 * transformer_matmul_params(cfg) * positions),
        lm_head=float(mult * 2 * cfg.dim * cfg.vocab_size * lm_tokens),
        adapter=adapter_flops(cfg, images, training),
        attention_allowed=attention_flops(cfg, allowed_pairs, training),
        attention_dense=attention_flops(cfg, dense_pairs, training),
        positions=int(positions),
        tokens=int(positions if tokens is None else tokens),
        lm_tokens=int(lm_tokens),
        images=int(images),
        allowed_pairs=int(allowed_pairs),
        dense_pairs=int(dense_pairs),
    )


def analytic_step_flops(cfg: ModelConfig, batch: PackedBatch, training: bool = True) -> FlopEstimate:
    """Analytic FLOPs of one Transfusion step on ``batch``; attention pairs come from its layout
    (the causal-only ablation's layout when ``cfg.causal_only_images``)."""
    layout = batch.layout.causal_only() if cfg.causal_only_images else batch.layout
    B, L = batch.tokens.shape
    return analytic_flops(
        cfg,
        positions=B * L,
        lm_tokens=int(batch.lm_mask.sum()),
        images=batch.num_images,
        allowed_pairs=int(layout.allowed_pairs().sum()),
        dense_pairs=B * layout.q_len * layout.kv_len,
        tokens=int(sum(e - s for _, s, e in batch.doc_spans)),
        training=training,
    )


def measure_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` under the FLOP counter; (total FLOPs, FLOPs by op name)."""
    with flop_counter() as fc:
        fn()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return fc.get_total_flops(), by_op


def measure_without_attention(fn: Callable[[], Any]) -> tuple[int, int]:
    """FLOPs of ``fn()`` as the counter sees them, and of ``fn()`` again with every attention call replaced
    by a matmul-free stand-in (``attention_stand_in``): the second is the non-attention part exactly, and
    the difference is what the counter saw of attention (which depends on the backend). ``fn`` runs twice:
    it must give the same work each time (seeded noise, gradients zeroed or accumulated, not stepped)."""
    from transfusion.attention import attention_stand_in

    counted = measure_flops(fn)[0]
    with attention_stand_in():
        rest = measure_flops(fn)[0]
    return counted, rest


def measure_step_flops(model: torch.nn.Module, batch: PackedBatch, **forward_kwargs: Any) -> int:
    """Measured FLOPs of one training forward + backward of ``model`` on ``batch`` (gradients are left
    accumulated in the model: zero them before using it for training)."""

    def step() -> None:
        out = model(batch, **forward_kwargs)
        out.loss.backward()

    return measure_flops(step)[0]


__all__ = [
    "COUNTER_FORMULAS",
    "TRAIN_MULTIPLIER",
    "FlopEstimate",
    "adapter_flops",
    "analytic_flops",
    "analytic_step_flops",
    "attention_flops",
    "flop_counter",
    "measure_flops",
    "measure_without_attention",
    "measure_step_flops",
    "transformer_matmul_params",
]
