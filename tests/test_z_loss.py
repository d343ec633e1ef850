"""The z-loss: its value against a float64 reference from the LM head, how each family adds it to the loss
and to the training step's loss parts, and that it is off (no term, no column) by default."""

import pytest
import torch

from transfusion.config import get_preset
from transfusion.families import get_family
from transfusion.packing import SpecialTokens, pack_documents
from transfusion.z_loss import z_loss

SP = SpecialTokens()


def _reference(model, hidden, lm_mask):
    """mean(logsumexp^2) of the LM head's logits at the target positions, in float64."""
    h = hidden.reshape(-1, hidden.shape[-1])[lm_mask.reshape(-1)].double()
    lse = torch.logsumexp(h @ model.lm_head.weight.double().T, dim=-1)
    return (lse**2).mean()


def test_z_loss_is_the_mean_square_log_normaliser():
    logits = torch.randn(7, 11, dtype=torch.float64) * 3
    expected = torch.log(torch.exp(logits).sum(-1)).pow(2).mean()
    torch.testing.assert_close(z_loss(logits).double(), expected, rtol=1e-6, atol=0)
    assert z_loss(torch.zeros(0, 11)).item() == 0.0


def _transfusion(z):
    from transfusion.transfusion_model import Transfusion

    torch.manual_seed(0)
    cfg = get_preset(
        "tiny", dim=32, n_layers=1, n_heads=2, vocab_size=64, latent_size=4, max_seq_len=64, z_loss=z
    )
    return Transfusion(cfg)


def _transfusion_batch():
    g = torch.Generator().manual_seed(1)
    docs = [
        [[SP.bos, 10, 11, 12], torch.randn(4, 4, 4, generator=g), [13, 14, SP.eos]],
        [[SP.bos, 20, 21, 22, SP.eos]],
    ]
    return pack_documents(docs, seq_len=48, patch_size=2, special=SP)


@pytest.mark.parametrize("weight", [0.0, 0.05])
def test_transfusion_adds_the_weighted_z_loss(weight):
    model = _transfusion(weight)
    batch = _transfusion_batch()
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full((batch.num_images,), 300, dtype=torch.long)
    out = model(batch, noise=noise, timesteps=t, return_hidden=True)
    base = out.lm_loss + model.cfg.diffusion_lambda * out.diffusion_loss
    if weight == 0:
        assert out.z_loss is None and torch.equal(out.loss, base)
        return
    ref = _reference(model, out.hidden, batch.lm_mask)
    torch.testing.assert_close(out.z_loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, base + weight * out.z_loss)
    out.z_loss.backward()  # a training signal, not a logged number
    assert model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("weight", [0.0, 0.05])
def test_discrete_adds_the_weighted_z_loss(weight):
    from transfusion.baseline import DiscreteLM, pack_discrete_documents

    torch.manual_seed(0)
    cfg = get_preset("tiny", dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=64, z_loss=weight)
    model = DiscreteLM(cfg, codebook_size=16)
    codes = torch.randint(0, 16, (2, 2), generator=torch.Generator().manual_seed(3))
    docs = [[[SP.bos, 10, 11], codes, [12, SP.eos]], [[SP.bos, 20, 21, 22, SP.eos]]]
    batch = pack_discrete_documents(docs, seq_len=32, vocab=model.vocab, special=SP)
    out = model(batch, return_hidden=True)
    if weight == 0:
        assert out.z_loss is None and torch.equal(out.loss, out.lm_loss)
        return
    torch.testing.assert_close(
        out.z_loss.double(), _reference(model, out.hidden, batch.lm_mask), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(out.loss, out.lm_loss + weight * out.z_loss)


def test_the_training_step_gets_a_weighted_z_part_only_when_on():
    fam = get_family("transfusion")
    batch = _transfusion_batch()
    for weight in (0.0, 0.05):
        model = _transfusion(weight)
        parts = fam.loss_parts(model, batch, (0, batch.batch_size), torch.Generator().manual_seed(0), "cpu")
        names = {p.name: p for p in parts}
        if weight == 0:
            assert "z" not in names
        else:
            z = names["z"]
            assert z.weight == weight and z.count == names["lm"].count and z.total == names["lm"].total
            assert z.value.item() > 0


def test_a_negative_or_nonfinite_weight_is_refused():
    for bad in (-1e-5, float("nan"), True):
        with pytest.raises(ValueError, match="z_loss"):
            get_preset("tiny", z_loss=bad)


def test_a_short_run_logs_the_z_loss_in_its_objective(tmp_path):
    from tests.test_train import SMALL_MODEL, SMALL_TRAIN
    from transfusion.train import TrainConfig, read_metrics, train

    weight = 0.01
    model_cfg = get_preset("tiny", **SMALL_MODEL, z_loss=weight)
    train(
        model_cfg, TrainConfig(**{**SMALL_TRAIN, "steps": 4, "log_every": 2}), tmp_path / "run", preset="tiny"
    )
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for r in rows:
        assert r["z_loss"] > 0
        objective = r["lm_loss"] + model_cfg.diffusion_lambda * r["diffusion_loss"] + weight * r["z_loss"]
        assert r["loss"] == pytest.approx(objective, rel=1e-5)
