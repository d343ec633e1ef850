"""VAE / VQ autoencoders: architecture, training, save/load, latent caches and errors.

Everything uses tiny widths and a few dozen steps so the file runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transfusion.autoencoders import (
    META_NAME,
    WEIGHTS_NAME,
    AutoencoderConfig,
    TrainedAutoencoder,
    build_autoencoder,
    cache_key,
    cache_path,
    cached_latents,
    load_autoencoder,
    load_images,
    psnr,
    save_autoencoder,
    train_autoencoder,
)
from transfusion.data import get_dataset

pytest.importorskip("diffusers")

TINY = {"block_out_channels": (8, 8, 8), "norm_num_groups": 4, "codebook_size": 64}
TRAIN = {"steps": 40, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "train_images": 128, "val_images": 32}

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: one thread (tests/conftest.py)


def tiny_cfg(kind: str = "vae", **overrides) -> AutoencoderConfig:
    return AutoencoderConfig(kind=kind, **{**TINY, **TRAIN, "scale_images": 64, **overrides})


def tiny_ae(kind: str = "vae", seed: int = 0, scaling: float = 1.0) -> TrainedAutoencoder:
    cfg = tiny_cfg(kind, seed=seed)
    return TrainedAutoencoder(build_autoencoder(cfg), cfg, scaling_factor=scaling)


def images(n: int = 4, split: str = "val") -> torch.Tensor:
    ds = get_dataset("shapes", split, length=max(n, 1))
    return load_images(ds, range(n), 32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[TrainedAutoencoder, Path]]:
    """One short training run per kind (shared by several tests)."""
    root = tmp_path_factory.mktemp("ae")
    train = get_dataset("shapes", "train", length=512)
    val = get_dataset("shapes", "val", length=64)
    out = {}
    for kind in ("vae", "vq"):
        rng_before = torch.get_rng_state()
        ae = train_autoencoder(tiny_cfg(kind), train, root / kind, progress=False, val_dataset=val)
        assert torch.equal(torch.get_rng_state(), rng_before), "training must not touch the global RNG"
        out[kind] = (ae, root / kind)
    return out


# ---------------------------------------------------------------- psnr


def test_psnr_known_values() -> None:
    target = torch.zeros(2, 3, 4, 4)
    pred = target + 0.1  # MSE 0.01 on a range of 2 -> 10 log10(4 / 0.01)
    assert torch.allclose(psnr(pred, target), torch.full((2,), 10 * math.log10(400.0)))
    assert (psnr(target, target) > 90).all()
    assert torch.isclose(psnr(target + 5.0, target)[0], torch.tensor(10 * math.log10(4.0)))  # clamped to 1
    with pytest.raises(ValueError, match="shape"):
        psnr(pred, target[:1])


# ---------------------------------------------------------------- architecture


def test_vae_and_vq_share_the_architecture() -> None:
    vae, vq = tiny_ae("vae"), tiny_ae("vq")
    enc_v, enc_q = vae.model.encoder.state_dict(), vq.model.encoder.state_dict()
    dec_v, dec_q = vae.model.decoder.state_dict(), vq.model.decoder.state_dict()
    assert enc_v.keys() == enc_q.keys() and dec_v.keys() == dec_q.keys()
    for k in enc_v:  # identical except the head: the VAE outputs mean and log-variance
        if not k.startswith("conv_out"):
            assert enc_v[k].shape == enc_q[k].shape, k
    assert enc_v["conv_out.weight"].shape[0] == 2 * enc_q["conv_out.weight"].shape[0] == 8
    assert all(dec_v[k].shape == dec_q[k].shape for k in dec_v)
    assert len(vae.model.encoder.down_blocks) == len(vq.model.encoder.down_blocks) == 3

    x = images(3)
    z = vae.encode(x)
    assert vae.latent_shape == vq.latent_shape == (4, 8, 8) and z.shape == (3, 4, 8, 8)
    codes = vq.encode_codes(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < vq.codebook_size == 64
    assert vae.codebook_size is None and vae.kind == "vae" and vq.kind == "vq"
    for out in (vae.decode(z), vq.decode_codes(codes), vq.decode(vq.encode(x))):
        assert out.shape == (3, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    # codes and quantised latents are two views of the same thing
    assert torch.allclose(vq.codes_to_latents(codes), vq.encode(x), atol=1e-6)
    with pytest.raises(TypeError, match="VQ"):
        vae.encode_codes(x)


@pytest.mark.parametrize(("downsample", "channels", "grid"), [(2, (8, 8), 16), (8, (8, 8, 8, 8), 4)])
def test_downsample_factor_sets_latent_grid(downsample: int, channels: tuple, grid: int) -> None:
    for kind in ("vae", "vq"):
        cfg = tiny_cfg(kind, downsample=downsample, block_out_channels=channels)
        ae = TrainedAutoencoder(build_autoencoder(cfg), cfg)
        assert ae.encode(images(1)).shape == (1, 4, grid, grid)
        assert ae.latent_shape == (4, grid, grid)


def test_default_channels_follow_downsample() -> None:
    assert AutoencoderConfig().block_out_channels == (16, 16, 32)
    assert AutoencoderConfig(downsample=8).block_out_channels == (16, 16, 32, 32)
    assert AutoencoderConfig(downsample=2).block_out_channels == (16, 32)
    assert AutoencoderConfig(downsample=1).block_out_channels == (16,)


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_save_load_round_trip_is_exact(kind: str, tmp_path: Path) -> None:
    ae = tiny_ae(kind, seed=3, scaling=0.7 if kind == "vae" else 1.0)
    save_autoencoder(ae, tmp_path / "ae")
    assert (tmp_path / "ae" / WEIGHTS_NAME).is_file() and (tmp_path / "ae" / META_NAME).is_file()
    loaded = load_autoencoder(tmp_path / "ae")
    assert loaded.config == ae.config and loaded.scaling_factor == ae.scaling_factor
    assert loaded.fingerprint() == ae.fingerprint()
    x = images(2)
    assert torch.equal(loaded.encode(x), ae.encode(x))
    assert torch.equal(loaded.decode(ae.encode(x)), ae.decode(ae.encode(x)))
    if kind == "vq":
        assert torch.equal(loaded.encode_codes(x), ae.encode_codes(x))
    # saving again over an existing folder replaces it and leaves no temporary folders behind
    save_autoencoder(tiny_ae(kind, seed=4), tmp_path / "ae")
    assert load_autoencoder(tmp_path / "ae").fingerprint() != ae.fingerprint()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_training_lowers_error_and_records_psnr(kind: str, trained) -> None:
    ae, path = trained[kind]
    m = ae.metrics
    assert m["val_psnr"] > m["val_psnr_init"] + 3.0, m
    assert m["train_loss_last"] < 0.5 * m["train_loss_first"], m
    meta = json.loads((path / META_NAME).read_text())
    assert meta["kind"] == kind and meta["metrics"]["val_psnr"] == pytest.approx(m["val_psnr"])
    assert meta["provenance"]["seed"] == 0 and "torch" in meta["provenance"]
    assert meta["config"]["steps"] == TRAIN["steps"]
    # the recorded PSNR is what the saved model actually achieves on the held-out images
    loaded = load_autoencoder(path)
    val = images(TRAIN["val_images"])
    assert float(psnr(loaded.reconstruct(val), val).mean()) == pytest.approx(m["val_psnr"], abs=1e-3)
    if kind == "vq":
        assert 0 < m["codebook_usage"] <= 1 and meta["codebook_size"] == 64
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_scaling_factor_gives_unit_latent_std(trained) -> None:
    ae, _ = trained["vae"]
    sample = images(64, split="train")  # the images the scaling factor was measured on
    z = ae.encode(sample)
    assert float(z.std()) == pytest.approx(1.0, abs=1e-3)
    assert ae.scaling_factor == pytest.approx(1.0 / ae.metrics["latent_std_raw"])
    assert trained["vq"][0].scaling_factor == 1.0


def test_training_is_deterministic(tmp_path: Path) -> None:
    ds = get_dataset("shapes", "train", length=64)
    val = get_dataset("shapes", "val", length=8)
    cfg = tiny_cfg("vae", steps=3, train_images=32, val_images=8, scale_images=8)
    a = train_autoencoder(cfg, ds, tmp_path / "a", progress=False, val_dataset=val)
    b = train_autoencoder(cfg, ds, tmp_path / "b", progress=False, val_dataset=val)
    assert a.fingerprint() == b.fingerprint()


class Plain(torch.utils.data.Dataset):
    """Images without a config or split (like a user's own dataset)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "caption": ""}


def test_training_finds_val_split_or_holds_out_tail(tmp_path: Path) -> None:
    cfg = tiny_cfg("vae", steps=2, train_images=100, val_images=8, scale_images=8)
    plain = Plain(images(40, split="train"))
    ae = train_autoencoder(cfg, plain, tmp_path / "a", progress=False)
    assert ae.metrics["n_train_images"] == 32 and ae.metrics["n_val_images"] == 8
    assert "last 8 items" in ae.metrics["val_source"]
    # the first n examples of a dataset that has a val split: validate on that split
    subset = torch.utils.data.Subset(get_dataset("shapes", "train", length=100), range(40))
    ae = train_autoencoder(cfg, subset, tmp_path / "b", progress=False)
    assert ae.metrics["n_train_images"] == 40 and ae.metrics["val_source"] == "ShapesDataset(split='val')"


def test_training_rejects_wrong_image_size(tmp_path: Path) -> None:
    ds = get_dataset("shapes", "train", length=8, image_size=48)
    with pytest.raises(ValueError, match="image_size"):
        train_autoencoder(tiny_cfg("vae", steps=1), ds, tmp_path / "a", progress=False)


# ---------------------------------------------------------------- latent cache


class CountingEncodes:
    """Counts calls of ``encode`` / ``encode_codes`` on one autoencoder instance."""

    def __init__(self, ae: TrainedAutoencoder, monkeypatch) -> None:
        self.calls = 0
        for name in ("encode", "encode_codes"):
            original = getattr(ae, name)

            def wrapped(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(ae, name, wrapped)


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_cache_computes_once_then_loads(kind: str, tmp_path: Path, monkeypatch) -> None:
    ae = tiny_ae(kind, scaling=0.5 if kind == "vae" else 1.0)
    ds = get_dataset("shapes", "val", length=10)
    x = load_images(ds, range(10), 32)
    expected = ae.encode_codes(x) if kind == "vq" else ae.encode(x)
    counter = CountingEncodes(ae, monkeypatch)
    first = cached_latents(ae, ds, tmp_path, batch_size=4, progress=False)
    assert counter.calls == 3  # ceil(10 / 4) batches
    assert torch.equal(first, expected)
    assert first.dtype == (torch.long if kind == "vq" else torch.float32)
    assert first.shape == ((10, 8, 8) if kind == "vq" else (10, 4, 8, 8))
    second = cached_latents(ae, ds, tmp_path, batch_size=4, progress=False)
    assert counter.calls == 3 and torch.equal(second, first)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0] == cache_path(ae, ds, tmp_path)
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["key"] == cache_key(ae, ds) and meta["count"] == "10"
    assert json.loads(meta["shape"]) == list(first.shape[1:])


def test_cache_key_tracks_dataset_and_autoencoder() -> None:
    ae = tiny_ae("vae")
    ds = get_dataset("shapes", "val", length=10)
    key = cache_key(ae, ds)
    assert cache_key(ae, get_dataset("shapes", "val", length=10)) == key  # same content, same key
    assert cache_key(tiny_ae("vae"), ds) == key  # same weights, same key
    for other in (
        get_dataset("shapes", "val", length=11),
        get_dataset("shapes", "test", length=10),
        get_dataset("shapes", "val", length=10, seed=1),
        torch.utils.data.Subset(ds, range(10)),
    ):
        assert cache_key(ae, other) != key
    assert cache_key(tiny_ae("vae", seed=1), ds) != key
    assert cache_key(tiny_ae("vae", scaling=2.0), ds) != key
    assert cache_key(tiny_ae("vq"), ds) != key

    class Keyed(torch.utils.data.Dataset):
        def __init__(self, k: str) -> None:
            self.k = k

        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict:
            raise AssertionError("cache_key() must be used instead of reading pixels")

        def cache_key(self) -> str:
            return self.k

    assert cache_key(ae, Keyed("a")) == cache_key(ae, Keyed("a")) != cache_key(ae, Keyed("b"))


def _tamper(path: Path, how: str) -> None:
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    if how == "garbage":
        path.write_bytes(b"not a safetensors file")
        return
    with safe_open(str(path), framework="pt") as f:
        meta, t = dict(f.metadata()), f.get_tensor("latents")
    if how == "values":
        t = t.clone()
        t.view(-1)[0] += 1.0
    elif how == "count":  # a consistent file for a shorter dataset under this dataset's key
        t = t[:-1].clone()
        meta["count"] = str(t.shape[0])
        meta["sha256"] = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    elif how == "key":
        meta["key"] = "0" * 64
    save_file({"latents": t}, str(path), metadata=meta)


@pytest.mark.parametrize("how", ["truncated", "garbage", "values", "count", "key"])
def test_cache_detects_bad_file_and_rebuilds(how: str, tmp_path: Path, monkeypatch, caplog) -> None:
    ae = tiny_ae("vae")
    ds = get_dataset("shapes", "val", length=6)
    good = cached_latents(ae, ds, tmp_path, batch_size=8, progress=False)
    path = cache_path(ae, ds, tmp_path)
    _tamper(path, how)
    counter = CountingEncodes(ae, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="transfusion.autoencoders.cache"):
        again = cached_latents(ae, ds, tmp_path, batch_size=8, progress=False)
    assert counter.calls == 1, "the bad file must be rebuilt, not used"
    assert any("rebuilding" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert torch.equal(again, good)
    # the rebuilt file is valid again: the next call loads it without encoding
    assert torch.equal(cached_latents(ae, ds, tmp_path, batch_size=8, progress=False), good)
    assert counter.calls == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("field", "value", "extra"),
    [
        ("kind", "gan", {}),
        ("downsample", 3, {}),
        ("image_size", 30, {}),
        ("block_out_channels", (8, 8), {"norm_num_groups": 4}),
        ("block_out_channels", (8, 12, 8), {"norm_num_groups": 8}),
        ("steps", 0, {}),
        ("lr", -1.0, {}),
        ("recon_loss", "l3", {}),
        ("codebook_size", True, {}),
    ],
)
def test_bad_config_names_field_and_value(field: str, value, extra: dict) -> None:
    with pytest.raises(ValueError, match=field) as info:
        AutoencoderConfig(**{field: value, **extra})
    assert str(value) in str(info.value)


def test_config_round_trips_through_json() -> None:
    cfg = tiny_cfg("vq", vq_embed_dim=6)
    again = AutoencoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.latent_shape == (6, 8, 8)
    with pytest.raises(ValueError, match="bogus"):
        AutoencoderConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_autoencoder(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_autoencoder(tmp_path / "empty")

    ae = tiny_ae("vae")
    save_autoencoder(ae, tmp_path / "ae")
    weights = tmp_path / "ae" / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated weights
    with pytest.raises(ValueError, match=str(tmp_path / "ae")):
        load_autoencoder(tmp_path / "ae")

    save_autoencoder(ae, tmp_path / "ae")
    meta = json.loads((tmp_path / "ae" / META_NAME).read_text())
    meta["weights_sha256"] = "0" * 64  # weights no longer match the record
    (tmp_path / "ae" / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hash"):
        load_autoencoder(tmp_path / "ae")

    (tmp_path / "ae" / META_NAME).write_text("{ not json")
    with pytest.raises(ValueError, match=META_NAME):
        load_autoencoder(tmp_path / "ae")
