"""Config presets and validation, and the shared transformer (RoPE, backends, KV cache)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.random_layouts import random_row_spans
from transfusion.config import LADDER_PRESETS, PAPER_PRESETS, PRESETS, ModelConfig, get_preset
from transfusion.layout import AttentionLayout
from transfusion.model import KVCache, RMSNorm, Transformer, apply_rope, rope_angles

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread (tests/conftest.py)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(
        **{"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "ffn_multiple_of": 16, **kw}
    )


# ---------------------------------------------------------------- config
def test_presets_sizes():
    counts = {n: (c := get_preset(n)).transformer_params() + c.text_params() for n in PRESETS}
    assert 0.4e6 < counts["tiny"] < 0.7e6
    assert 80e6 < counts["L"] < 120e6
    ladder = [counts[n] for n in LADDER_PRESETS]
    assert ladder == sorted(ladder)
    # The paper's shapes with the Llama-2 vocabulary land on the paper's names.
    for name, expect in zip(PAPER_PRESETS, (0.16e9, 0.37e9, 0.76e9, 1.4e9, 7e9)):
        assert abs(counts[name] - expect) / expect < 0.05, (name, counts[name])
    assert counts["7B"] == 6_738_415_616  # Llama-2 7B exactly
    shapes = {n: (get_preset(n).n_layers, get_preset(n).dim, get_preset(n).n_heads) for n in PAPER_PRESETS}
    assert shapes == {
        "0.16B": (16, 768, 12),
        "0.37B": (24, 1024, 16),
        "0.76B": (24, 1536, 24),
        "1.4B": (24, 2048, 16),
        "7B": (32, 4096, 32),
    }


def test_get_preset_unknown_names_it_and_lists_valid():
    with pytest.raises(ValueError, match="'XXL'") as e:
        get_preset("XXL")
    assert "tiny" in str(e.value) and "7B" in str(e.value)
    assert get_preset("tiny", patch_size=4).patch_size == 4


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"dim": 0}, "dim"),
        ({"n_layers": -1}, "n_layers"),
        ({"dim": 30, "n_heads": 4}, "dim"),
        ({"patch_size": 3}, "patch_size"),
        ({"latent_size": 6, "patch_size": 4}, "patch_size"),
        ({"diffusion_lambda": -1.0}, "diffusion_lambda"),
        ({"noise_limit_t": 1000}, "noise_limit_t"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"adapter": "mlp"}, "adapter"),
        ({"unet_channels": (32, 30)}, "unet_channels"),
        ({"adapter": "unet", "patch_size": 1, "unet_channels": (16, 32)}, "unet_channels"),
        ({"vocab_size": True}, "vocab_size"),
    ],
)
def test_config_validation_names_field(changes, field):
    with pytest.raises(ValueError, match=field):
        tiny(**changes)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = get_preset("S", adapter="unet", unet_channels=(16, 32), noise_limit_t=None, qk_norm=True)
    d = json.loads(json.dumps(cfg.to_dict()))
    back = ModelConfig.from_dict(d)
    assert back == cfg and back.unet_channels == (16, 32)
    with pytest.raises(ValueError, match="'n_layer'"):
        ModelConfig.from_dict({**d, "n_layer": 3})
    with pytest.raises(ValueError, match="n_heads"):
        cfg.replace(n_heads=7)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_transformer_param_count_matches_config(qk_norm):
    cfg = tiny(qk_norm=qk_norm)
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.transformer_params()
    # No biases anywhere in the Llama blocks.
    assert not [n for n, _ in Transformer(cfg).named_parameters() if n.endswith("bias")]


# ---------------------------------------------------------------- building blocks
def test_rmsnorm_values():
    norm = RMSNorm(4, eps=0.0)
    x = torch.tensor([[3.0, -3.0, 3.0, -3.0]])
    torch.testing.assert_close(norm(x), torch.tensor([[1.0, -1.0, 1.0, -1.0]]))


def test_rope_is_relative():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, 16, generator=g)
    k = torch.randn(1, 1, 1, 16, generator=g)

    def score(m: int, n: int) -> float:
        cq, sq = rope_angles(torch.tensor([[m]]), 16, 10000.0)
        ck, sk = rope_angles(torch.tensor([[n]]), 16, 10000.0)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(107, 103), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    # Position 0 is the identity rotation; norms are preserved.
    c0, s0 = rope_angles(torch.tensor([[0]]), 16, 10000.0)
    torch.testing.assert_close(apply_rope(q, c0, s0), q)
    c9, s9 = rope_angles(torch.tensor([[9]]), 16, 10000.0)
    assert apply_rope(q, c9, s9).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def _random_layout(seed: int, batch: int, seq_len: int) -> AttentionLayout:
    rng = random.Random(seed)
    return AttentionLayout.stack(
        [AttentionLayout.from_spans(seq_len, *random_row_spans(rng, seq_len)) for _ in range(batch)]
    )


def test_transformer_naive_equals_sdpa():
    torch.manual_seed(0)
    layout = _random_layout(3, batch=3, seq_len=40)
    x = torch.randn(3, 40, 32)
    model = Transformer(tiny(attention="naive", qk_norm=True))
    out_naive = model(x, layout)
    for layer in model.layers:
        layer.attn.backend = "sdpa"
    out_sdpa = model(x, layout)
    assert torch.isfinite(out_sdpa).all()
    # Same math, different kernels: float32 rounding only.
    torch.testing.assert_close(out_naive, out_sdpa, rtol=1e-5, atol=1e-5)


def test_positions_shift_invariance():
    """RoPE is relative: shifting every position by a constant leaves the outputs unchanged."""
    torch.manual_seed(0)
    layout = AttentionLayout.from_spans(16, [(0, 16)], [(4, 8)])
    x = torch.randn(1, 16, 32)
    model = Transformer(tiny())
    a = model(x, layout)
    b = model(x, layout, positions=torch.arange(16) + 50)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    L, P = 20, 12
    full = AttentionLayout.from_spans(L, [(0, L)], [(5, 9)])
    x = torch.randn(1, L, 32)
    model = Transformer(tiny(qk_norm=True)).eval()
    with torch.no_grad():
        ref = model(x, full)
        cache = KVCache(model.cfg.n_layers)
        prefix = model(x[:, :P], AttentionLayout.from_spans(P, [(0, P)], [(5, 9)]), cache=cache)
        assert len(cache) == P
        # A look-ahead that is not committed leaves the cache as it was.
        peek = model(x[:, P:], full.queries(P), cache=cache, commit=False)
        assert len(cache) == P
        steps = [
            model(x[:, i : i + 1], _prefix_layout(full, i + 1).queries(i), cache=cache) for i in range(P, L)
        ]
    torch.testing.assert_close(prefix, ref[:, :P], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(peek, ref[:, P:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, P:], rtol=1e-5, atol=1e-5)
    assert len(cache) == L
    with pytest.raises(ValueError, match="KV cache holds"):
        model(x[:, :1], full.queries(L - 1), cache=KVCache(model.cfg.n_layers))


def _prefix_layout(full: AttentionLayout, n: int) -> AttentionLayout:
    """The first n positions of a one-document row with text after its images (decoding text)."""
    return AttentionLayout.from_spans(n, [(0, n)], [s for s in full.image_spans[0] if s[1] <= n])
