"""``train_autoencoder``: fit a small VAE or VQ model on a dataset's images and save it.

Recipe (one function, readable top to bottom):

1. Decode ``cfg.train_images`` training images into memory once and sample batches from them; pick the
   held-out images (``val_dataset``; else the dataset's own ``"val"`` split when it can build one; else the
   last items of ``dataset``, which are then left out of training).
2. Adam with linear warm-up and cosine decay; loss = reconstruction (``l1`` / ``mse`` / ``l1+mse``)
   + ``kl_weight`` x KL (VAE, KL summed over latent elements and divided by pixels per image, the Stable
   Diffusion convention rescaled to a per-pixel reconstruction loss) or + ``vq_loss_weight`` x diffusers'
   VQ loss (codebook + commitment, from ``VQModel.decode``).
   VQ training also seeds the codebook with encoder outputs of the first batch and re-seeds codes that went
   unused for ``dead_code_restart`` steps, so that short runs use a good part of the codebook.
3. VAE scaling factor = 1 / std of the posterior means of ``cfg.scale_images`` training images (as Stable
   Diffusion does), so ``encode`` gives latents of std ~1. VQ: 1.
4. Reconstruction PSNR on the held-out images before and after training, VQ codebook usage, timings.
5. ``save_autoencoder``: weights (safetensors) + ``autoencoder.json`` with config, scaling factor,
   metrics and provenance, written atomically.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from transfusion.autoencoders.cache import dataset_identity
from transfusion.autoencoders.config import AutoencoderConfig
from transfusion.autoencoders.model import TrainedAutoencoder, build_autoencoder, psnr, save_autoencoder
from transfusion.provenance import provenance


def load_images(
    dataset: Dataset, indices: range | list[int], image_size: int, channels: int = 3
) -> torch.Tensor:
    """Stack ``dataset[i]["image"]`` for ``indices`` into ``(N, C, H, W)``, checking the size."""
    images = []
    for i in indices:
        item = dataset[i]
        x = item["image"] if isinstance(item, dict) else item
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != (channels, image_size, image_size):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"dataset: item {i} image has shape {shape}, expected "
                f"({channels}, {image_size}, {image_size}) (AutoencoderConfig.image_size = {image_size})"
            )
        images.append(x.float())
    if not images:
        return torch.zeros((0, channels, image_size, image_size))
    return torch.stack(images)


def _val_split(
    dataset: Dataset, val_dataset: Dataset | None, cfg: AutoencoderConfig
) -> tuple[Dataset, str, int]:
    """(held-out dataset, description, number of leading items of ``dataset`` usable for training)."""
    n = len(dataset)
    if val_dataset is not None:
        return val_dataset, "val_dataset", n
    base = dataset
    while isinstance(base, Subset):  # the first n training examples of a dataset with a val split
        base = base.dataset
    config, split = getattr(base, "config", None), getattr(base, "split", None)
    if config is not None and isinstance(split, str) and split not in ("val", "all"):
        try:
            sibling = type(base)(config, "val")
            if len(sibling) > 0:
                return sibling, f"{type(base).__name__}(split='val')", n
        except Exception:  # noqa: BLE001 - any failure just means "no sibling val split"
            pass
    n_val = min(cfg.val_images, n // 5)
    if n_val == 0:
        raise ValueError(f"dataset: {n} items are too few to hold out validation images; pass val_dataset")
    return (
        Subset(dataset, range(n - n_val, n)),
        f"last {n_val} items of the dataset",
        n - n_val,
    )


def _recon_loss(kind: str, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(rec, x)
    if kind == "mse":
        return F.mse_loss(rec, x)
    return F.l1_loss(rec, x) + F.mse_loss(rec, x)


@torch.no_grad()
def _val_psnr(ae: TrainedAutoencoder, images: torch.Tensor, batch_size: int = 128) -> float:
    values = [
        psnr(ae.reconstruct(images[i : i + batch_size]).cpu(), images[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]
    return float(torch.cat(values).mean())


@torch.no_grad()
def _codebook_stats(ae: TrainedAutoencoder, images: torch.Tensor) -> dict[str, float]:
    codes = torch.cat(
        [ae.encode_codes(images[i : i + 128]).flatten().cpu() for i in range(0, len(images), 128)]
    )
    counts = torch.bincount(codes, minlength=ae.config.codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "codebook_usage": float((counts > 0).double().mean()),
        "codebook_perplexity": float(entropy.exp()),
    }


def _flat_latents(h: torch.Tensor) -> torch.Tensor:
    return h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])


@torch.no_grad()
def _reseed_codes(
    embedding: torch.nn.Embedding, vectors: torch.Tensor, which: torch.Tensor, gen: torch.Generator
) -> None:
    """Overwrite codebook rows ``which`` with randomly chosen encoder outputs plus a little noise."""
    if which.numel() == 0 or vectors.shape[0] == 0:
        return
    pick = torch.randint(0, vectors.shape[0], (which.numel(),), generator=gen)
    new = vectors[pick.to(vectors.device)]
    noise = torch.randn(new.shape, generator=gen).to(new.device) * (new.std() * 0.01 + 1e-6)
    embedding.weight[which.to(embedding.weight.device)] = new + noise


def train_autoencoder(
    cfg: AutoencoderConfig,
    dataset: Dataset,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
    val_dataset: Dataset | None = None,
) -> TrainedAutoencoder:
    """Train ``cfg`` on ``dataset`` (items ``{"image": (3, H, W) in [-1, 1], ...}``), save to ``out_dir``.

    Returns the trained autoencoder (on ``device``, ``path`` set to ``out_dir``). ``autoencoder.json``
    records ``metrics`` (``val_psnr``, ``val_psnr_init``, losses, timings, VQ codebook usage).
    The caller's global RNG state is left untouched; everything random is seeded by ``cfg.seed``.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    device = torch.device(device)
    val_ds, val_source, n_trainable = _val_split(dataset, val_dataset, cfg)
    n_train = min(cfg.train_images, n_trainable)
    n_val = min(cfg.val_images, len(val_ds))
    if n_train == 0 or n_val == 0:
        raise ValueError(f"dataset: need training and validation images, got {n_train} and {n_val}")
    train_x = load_images(dataset, range(n_train), cfg.image_size, cfg.in_channels)
    val_x = load_images(val_ds, range(n_val), cfg.image_size, cfg.in_channels)
    t_data = time.perf_counter() - t_start

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model = build_autoencoder(cfg).to(device)
        ae = TrainedAutoencoder(model, cfg)
        psnr_init = _val_psnr(ae, val_x)

        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        warm = min(cfg.warmup_steps, cfg.steps // 2)

        def lr_factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            f = (step - warm) / max(1, cfg.steps - warm)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * f))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        pixels = cfg.in_channels * cfg.image_size**2
        usage = torch.zeros(cfg.codebook_size, dtype=torch.long) if cfg.kind == "vq" else None
        restarts = 0
        losses: list[float] = []
        psnr_sum, psnr_n = 0.0, 0
        model.train()
        t_loop = time.perf_counter()
        bar = tqdm(
            total=cfg.steps,
            desc=f"train {cfg.kind}",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        with bar:
            for step in range(cfg.steps):
                idx = torch.randint(0, n_train, (cfg.batch_size,), generator=gen)
                x = train_x[idx].to(device)
                if cfg.kind == "vae":
                    post = model.encode(x).latent_dist
                    rec = model.decode(post.sample()).sample
                    kl = post.kl().mean() / pixels
                    loss = _recon_loss(cfg.recon_loss, rec, x) + cfg.kl_weight * kl
                else:
                    h = model.encode(x).latents
                    flat = _flat_latents(h)
                    if step == 0 and cfg.codebook_init:
                        _reseed_codes(model.quantize.embedding, flat, torch.arange(cfg.codebook_size), gen)
                    out = model.decode(h)
                    rec = out.sample
                    loss = _recon_loss(cfg.recon_loss, rec, x) + cfg.vq_loss_weight * out.commit_loss.mean()
                    with torch.no_grad():
                        codes = torch.cdist(flat, model.quantize.embedding.weight).argmin(1)
                        usage += torch.bincount(codes.cpu(), minlength=cfg.codebook_size)
                    if (
                        cfg.dead_code_restart
                        and (step + 1) % cfg.dead_code_restart == 0
                        and step + 1 < 0.9 * cfg.steps
                    ):
                        dead = (usage == 0).nonzero().flatten()
                        _reseed_codes(model.quantize.embedding, flat, dead, gen)
                        restarts += int(dead.numel())
                        usage.zero_()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
                if step >= cfg.steps - 20:  # running PSNR of the last training batches
                    psnr_sum += float(psnr(rec, x).sum())
                    psnr_n += x.shape[0]
                bar.update(1)
                if step % 10 == 0 or step == cfg.steps - 1:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        train_seconds = time.perf_counter() - t_loop
        model.eval()

    metrics: dict[str, Any] = {
        "val_psnr_init": psnr_init,
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "train_psnr_last": psnr_sum / max(psnr_n, 1),
        "steps": cfg.steps,
        "train_seconds": train_seconds,
        "data_seconds": t_data,
        "n_train_images": n_train,
        "n_val_images": n_val,
        "val_source": val_source,
        "device": str(device),
    }
    scaling = 1.0
    if cfg.kind == "vae":
        with torch.no_grad():
            sample = train_x[: cfg.scale_images]
            means = torch.cat(
                [
                    model.encode(sample[i : i + 128].to(device)).latent_dist.mean.cpu()
                    for i in range(0, len(sample), 128)
                ]
            )
        std = float(means.std())
        if not math.isfinite(std) or std <= 0:
            raise RuntimeError(
                f"latent std over {len(sample)} images is {std}; cannot set the scaling factor"
            )
        scaling = 1.0 / std
        metrics.update(
            latent_std_raw=std,
            latent_mean_raw=float(means.mean()),
            latent_std_scaled=float((means * scaling).std()),
            scale_images=len(sample),
        )
    else:
        metrics["dead_codes_restarted"] = restarts
    ae = TrainedAutoencoder(model, cfg, scaling_factor=scaling)
    metrics["val_psnr"] = _val_psnr(ae, val_x)
    if cfg.kind == "vq":
        metrics.update(_codebook_stats(ae, val_x))
    metrics["total_seconds"] = time.perf_counter() - t_start
    ae.metrics = metrics
    extra = {
        "dataset": dataset_identity(dataset),
        "val_source": val_source,
        "provenance": provenance(device, seed=cfg.seed),
    }
    save_autoencoder(ae, out_dir, extra=extra)
    return ae
