"""FID/KID via torch-fidelity with the suite's shapes CNN (CPU, small samples)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transfusion.data.shapes import ShapesConfig, ShapesGenerator
from transfusion.eval.features import (
    FeatureCNNConfig,
    feature_cnn_path,
    get_feature_cnn,
    load_feature_cnn,
    train_feature_cnn,
)
from transfusion.eval.fid import fid_kid, to_uint8_images

CFG = FeatureCNNConfig(train_steps=200, train_images=2048)
N = 250


def _images(split: str, start: int, n: int) -> torch.Tensor:
    gen = ShapesGenerator(ShapesConfig())
    arr = np.stack([gen.sample(split, i).image for i in range(start, start + n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.exp(-(torch.arange(-4, 5).float() ** 2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)
    y = F.conv2d(F.pad(x.float(), (4, 4, 0, 0), mode="reflect"), k.view(3, 1, 1, 9), groups=3)
    y = F.conv2d(F.pad(y, (0, 0, 4, 4), mode="reflect"), k.view(3, 1, 9, 1), groups=3)
    return y.round().clamp(0, 255).to(torch.uint8)


def _noise(x: torch.Tensor, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (x.float() + std * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return get_feature_cnn(CFG, tmp_path_factory.mktemp("fidcache"))


@pytest.fixture(scope="module")
def real_pair():
    return _images("test", 0, N), _images("test", N, N)


def test_cnn_cache_and_metadata(weights):
    assert weights == feature_cnn_path(CFG, weights.parent) and weights.suffix == ".safetensors"
    mtime = weights.stat().st_mtime_ns
    assert get_feature_cnn(CFG, weights.parent) == weights and weights.stat().st_mtime_ns == mtime
    model = load_feature_cnn(weights)
    assert model.config == CFG
    assert feature_cnn_path(FeatureCNNConfig(seed=1), weights.parent) != weights


def test_training_is_deterministic():
    cfg = FeatureCNNConfig(train_steps=3, train_images=128, batch_size=32)
    a, _ = train_feature_cnn(cfg)
    b, _ = train_feature_cnn(cfg)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("kind", ["blur", "noise"])
def test_fid_kid_rise_with_degradation(weights, real_pair, kind):
    real, real2 = real_pair
    base = fid_kid(real, real2, weights_path=weights)
    levels = (1.5, 2.5, 4.0) if kind == "blur" else (32.0, 48.0, 64.0)
    degrade = _blur if kind == "blur" else _noise
    results = [fid_kid(real, degrade(real2, s), weights_path=weights) for s in levels]
    fids = [base["fid"]] + [r["fid"] for r in results]
    kids = [base["kid_mean"]] + [r["kid_mean"] for r in results]
    print(kind, "fid", fids, "kid", kids)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert fids[-1] > 1.5 * fids[0]
    assert abs(base["kid_mean"]) < 3 * base["kid_std"] + 0.02  # real vs real': KID ~ 0


def test_input_formats_agree(weights, real_pair):
    real, real2 = real_pair
    a = fid_kid(real[:100], real2[:100], weights_path=weights)
    b = fid_kid(real[:100].permute(0, 2, 3, 1).numpy(), real2[:100].float() / 127.5 - 1, weights_path=weights)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-5)
    assert torch.equal(to_uint8_images(real2.float() / 127.5 - 1), real2)


def test_missing_weights_path_is_named(real_pair, tmp_path):
    real, real2 = real_pair
    missing = tmp_path / "nope" / "pt_inception-2015-12-05.pth"
    for extractor in ("inception", "cnn"):
        with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")):
            fid_kid(real[:10], real2[:10], extractor=extractor, weights_path=missing)
    with pytest.raises(ValueError, match="never downloaded"):
        fid_kid(real[:10], real2[:10], extractor="inception")


def test_feature_cnn_trains_inside_no_grad():
    import torch

    from transfusion.eval.features import FeatureCNNConfig, train_feature_cnn

    with torch.no_grad():
        _, stats = train_feature_cnn(FeatureCNNConfig(train_steps=3, train_images=64, batch_size=16))
    assert stats["train_loss"] > 0


def _random_inception_weights(path, monkeypatch) -> None:
    """A state dict of torch-fidelity's own Inception module with random convolutions (its constructor is
    kept from downloading the real weights): the real file's format, made offline. He-scaled, so that the
    2048 pool features keep their scale through the 94 convolutions and differ between images."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with monkeypatch.context() as m:
        m.setattr(inception, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5 if v.dim() == 4 else v
             for k, v in net.state_dict().items()}  # fmt: skip
    torch.save(state, path)


def test_inception_runs_from_a_local_file_and_the_quick_job_can_use_it(real_pair, tmp_path, monkeypatch):
    from bench.quick import QuickConfig, fid_against

    weights = tmp_path / "pt_inception.pth"
    _random_inception_weights(weights, monkeypatch)
    real, real2 = real_pair
    same = fid_kid(real[:24], real[:24], extractor="inception", weights_path=weights)
    other = fid_kid(real[:24], _noise(real2[:24], 60.0), extractor="inception", weights_path=weights)
    assert same["extractor"] == "inception-v3-compat" and same["feature_layer"] == "2048"
    assert abs(same["fid"]) < 1e-3 < other["fid"]  # identical sets: 0; noisy other images: more
    cfg = QuickConfig(fid_inception_weights=str(weights))
    got = fid_against(cfg, real[:24], _noise(real2[:24], 60.0))
    assert got["extractor"] == "inception-v3-compat" and got["fid"] == pytest.approx(other["fid"], rel=1e-5)
    from bench.quick import check_eval_items

    missing = QuickConfig(fid_inception_weights=str(tmp_path / "nope.pth"))  # (a stored config loads)
    with pytest.raises(ValueError, match="fid_inception_weights = .*nope.pth.*no such file"):
        check_eval_items(missing)  # what quick and study run before anything trains
