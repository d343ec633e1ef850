"""Analytic FLOPs vs FlopCounterMode on a tiny Transfusion model.

Tolerances and why they are not zero:
* The analytic count applies "6 N D" to every weight matrix, but the adapter's first layers (patch
  projection, timestep MLP input) take inputs that need no gradient, so autograd skips one of their two
  backward matmuls: the measurement is slightly LOWER, by the adapter's share (< 0.5% here).
* With the ``naive`` backend the measured attention is exactly the dense count (q @ k^T and p @ v over
  all L x L pairs, backward = 2 x forward), so measured ~= analytic with dense attention, within 0.5%.
* With ``sdpa`` on CPU, FlopCounterMode counts the flash-attention backward as 2.5 x forward (it
  recomputes the scores), i.e. 3.5 / 3 of the dense training count; with that correction, within 0.5%.
* The attention the model needs (allowed pairs of the interval layout) is far below the dense count.
"""

from __future__ import annotations

import pytest
import torch

from transfusion.attention import attend, attention_stand_in
from transfusion.config import get_preset
from transfusion.flops import (
    analytic_flops,
    analytic_step_flops,
    attention_flops,
    measure_flops,
    measure_step_flops,
    measure_without_attention,
    transformer_matmul_params,
)
from transfusion.packing import pack_documents
from transfusion.transfusion_model import Transfusion

TOL = 5e-3


def _batch(n_docs=6, seq_len=128, caption=20, latent=8, patch=2):
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(n_docs):
        cap = torch.randint(5, 200, (caption + i,), generator=g).tolist()
        lat = torch.randn(4, latent, latent, generator=g)
        docs.append([[1, *cap], lat, [2]] if i % 4 else [[1], lat, [*cap, 2]])
    return pack_documents(docs, seq_len, patch, vocab_size=512)


def _model(backend, **kw):
    torch.manual_seed(0)
    cfg = get_preset("tiny", attention=backend, dim=64, n_heads=2, **kw)
    return cfg, Transfusion(cfg)


def test_naive_backend_measures_the_dense_analytic_count():
    batch = _batch()
    cfg, model = _model("naive")
    measured = measure_step_flops(model, batch)
    est = analytic_step_flops(cfg, batch)
    assert measured <= est.total_dense_attention
    assert measured == pytest.approx(est.total_dense_attention, rel=TOL)
    # the attention part alone: the batched matmuls of the naive backend
    _, by_op = measure_flops(lambda: model(batch).loss.backward())
    assert by_op["aten.bmm"] == pytest.approx(est.attention_dense, rel=1e-9)


def test_sdpa_backend_counts_dense_attention_with_a_flash_backward():
    batch = _batch()
    cfg, model = _model("sdpa")
    measured = measure_step_flops(model, batch)
    est = analytic_step_flops(cfg, batch)
    expected = est.dense + est.attention_dense * 3.5 / 3
    assert measured == pytest.approx(expected, rel=TOL)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_the_count_without_attention_is_the_dense_part_whatever_the_backend(backend):
    batch = _batch()
    cfg, model = _model(backend)
    est = analytic_step_flops(cfg, batch)
    counted, rest = measure_without_attention(lambda: model(batch).loss.backward())
    assert counted == measure_step_flops(model, batch)  # the first count is the plain one
    attention = est.attention_dense * (1 if backend == "naive" else 3.5 / 3)  # see the module docstring
    assert counted - rest == pytest.approx(attention, rel=1e-9)
    assert rest <= est.dense and rest == pytest.approx(est.dense, rel=TOL)


def test_the_attention_stand_in_keeps_q_k_v_in_the_graph_and_is_scoped():
    batch = _batch()
    layout = batch.layout
    q, k, v = (torch.randn(layout.batch_size, 2, layout.q_len, 8, requires_grad=True) for _ in range(3))
    with attention_stand_in():
        out = attend(q, k, v, layout, backend="naive")
        torch.testing.assert_close(out, q + k + v)
        out.sum().backward()
        assert all(t.grad is not None and bool((t.grad == 1).all()) for t in (q, k, v))
        with pytest.raises(ValueError, match="self-attention only"):  # decoding: fewer queries than keys
            attend(q[:, :, -1:], k, v, layout.queries(layout.q_len - 1), backend="naive")
    with pytest.raises(RuntimeError), attention_stand_in():
        raise RuntimeError("leave the context by an exception")
    out = attend(q, k, v, layout, backend="naive")  # attends again
    assert not torch.allclose(out, q + k + v)


def test_allowed_pairs_are_counted_from_the_layout():
    batch = _batch()
    cfg = get_preset("tiny", dim=64, n_heads=2)
    est = analytic_step_flops(cfg, batch)
    mask = batch.layout.dense_mask()
    assert est.allowed_pairs == int(mask.sum())
    assert est.dense_pairs == mask.numel()
    assert est.attention_allowed == attention_flops(cfg, int(mask.sum()))
    assert est.attention_allowed < 0.5 * est.attention_dense
    # 4 * head_dim per pair per head per layer forward, x3 for training
    assert est.attention_allowed == 3 * 4 * cfg.head_dim * est.allowed_pairs * cfg.n_heads * cfg.n_layers
    # the causal-only ablation allows fewer pairs (no look-ahead inside images)
    causal = analytic_step_flops(cfg.replace(causal_only_images=True), batch)
    assert causal.allowed_pairs < est.allowed_pairs


def test_dense_part_is_six_n_d():
    cfg = get_preset("tiny")
    est = analytic_flops(cfg, positions=1000, lm_tokens=600, images=0, allowed_pairs=0, dense_pairs=0)
    n = transformer_matmul_params(cfg)
    assert n == cfg.transformer_params() - (2 * cfg.n_layers + 1) * cfg.dim  # minus the RMSNorm gains
    assert est.transformer == 6 * n * 1000
    assert est.lm_head == 6 * cfg.dim * cfg.vocab_size * 600
    assert est.adapter == 0 and est.total == est.dense
    fwd = analytic_flops(cfg, 1000, 600, 0, 0, 0, training=False)
    assert fwd.total * 3 == est.total


def test_unet_adapter_flops_are_counted():
    pytest.importorskip("diffusers")
    batch = _batch()
    cfg, model = _model("naive", adapter="unet", unet_channels=(16, 32))
    est = analytic_step_flops(cfg, batch)
    assert est.adapter > 0
    measured = measure_step_flops(model, batch)
    # the U-Net's first conv gets no input gradient either: allow 2%
    assert measured == pytest.approx(est.total_dense_attention, rel=2e-2)
