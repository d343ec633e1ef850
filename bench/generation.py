"""Generation benchmark: text-to-image wall time with and without reusing the prefix's KV cache.

Every denoising step of an image runs the image's n patch positions as queries. With the KV cache
(``use_cache=True``) the caption prefix is run once and its keys/values are reused by every step, so a
step costs n queries against P + n keys. Without it (``use_cache=False``) every step recomputes the
whole row, P + n queries, as a decoder without a cache would. The ratio grows with the prefix length P.

For each prefix length the same prompts, seeds and sampler run both ways on a randomly initialised model
(timings do not depend on the weights); the CSV also records the largest difference between the two
results' latents, which must be float round-off. Medians over ``repeats`` runs after ``warmup`` runs.

Outputs in ``out_dir``: ``generation.csv`` (one row per prefix length) and
``generation_provenance.json`` (device, versions, seed, settings). Not a test: numbers depend on the
machine; tests only check the plumbing.

    python -m bench generation --out results/cpu [--device cpu] [--prefix-lengths 16,64,256]
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from transfusion.config import get_preset
from transfusion.devices import check_device
from transfusion.generation import text_to_image
from transfusion.packing import SpecialTokens
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance
from transfusion.transfusion_model import Transfusion

FIELDS = (
    "prefix_tokens",  # caption tokens before <BOI>, <BOS> included
    "image_tokens",  # patches per image (queries of one denoising step with the cache)
    "batch_size",
    "scheduler",
    "num_steps",
    "guidance_scale",
    "cached_s",  # median wall time of one text_to_image call, prefix KV reused
    "recompute_s",  # same, every forward pass recomputes the whole row
    "speedup",  # recompute_s / cached_s
    "cached_ms_per_step",
    "recompute_ms_per_step",
    "max_latent_diff",  # max |latents(cached) - latents(recompute)|: float round-off only
    "device",
    "dtype",
    "model_params",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, Any]:
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def run_generation_bench(
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    prefix_lengths: tuple[int, ...] = (16, 64, 256),
    *,
    preset: str = "tiny",
    model_overrides: dict[str, Any] | None = None,
    batch_size: int = 4,
    scheduler: str = "ddim",
    num_steps: int = 10,
    guidance_scale: float | None = 3.0,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    attention: str = "sdpa",
) -> list[dict]:
    """Measure text-to-image with and without prefix KV reuse; write CSV + provenance; return the rows.

    The model is ``preset`` (default the toy ``tiny``: dim 128, 2 layers, 8x8x4 latents in 2x2 patches =
    16 image positions) with ``max_seq_len`` raised to fit the longest prefix and the image.
    """
    if not prefix_lengths or any(int(p) < 1 for p in prefix_lengths):
        raise ValueError(f"prefix_lengths = {prefix_lengths!r} must be positive integers")
    for name, value in (("batch_size", batch_size), ("num_steps", num_steps), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} = {value} must be >= 1")
    out_dir = Path(out_dir)
    dev = check_device(device)
    torch_dtype = getattr(torch, dtype)
    overrides = dict(model_overrides or {})
    base = get_preset(preset, **overrides)
    need = max(prefix_lengths) + base.patches_per_image + 2
    cfg = base.replace(max_seq_len=max(base.max_seq_len, need), attention=attention)
    torch.manual_seed(seed)
    model = Transfusion(cfg).to(dev, torch_dtype).eval()
    params = model.num_params()["total"]
    special = SpecialTokens()
    first_content = max(special.ids()) + 1
    settings = dict(
        preset=preset,
        model=cfg.to_dict(),
        prefix_lengths=list(prefix_lengths),
        batch_size=batch_size,
        scheduler=scheduler,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        repeats=repeats,
        warmup=warmup,
        dtype=dtype,
    )
    atomic_write_json(
        out_dir / "generation_provenance.json", provenance(dev, seed=seed, benchmark="generation", **settings)
    )

    rows: list[dict] = []
    g = torch.Generator().manual_seed(seed)
    for p in prefix_lengths:
        content = torch.randint(first_content, cfg.vocab_size, (batch_size, int(p) - 1), generator=g)
        prompts = [[special.bos, *row.tolist()] for row in content]

        def call(use_cache: bool, prompts=prompts):
            return text_to_image(
                model,
                prompts,
                generator=seed,
                scheduler=scheduler,
                num_steps=num_steps,
                guidance_scale=guidance_scale,
                use_cache=use_cache,
            )

        cached_s, lat_c = _time(lambda: call(True), dev, warmup, repeats)
        recompute_s, lat_r = _time(lambda: call(False), dev, warmup, repeats)
        rows.append(
            {
                "prefix_tokens": int(p),
                "image_tokens": cfg.patches_per_image,
                "batch_size": batch_size,
                "scheduler": scheduler,
                "num_steps": num_steps,
                "guidance_scale": guidance_scale,
                "cached_s": round(cached_s, 6),
                "recompute_s": round(recompute_s, 6),
                "speedup": round(recompute_s / cached_s, 4),
                "cached_ms_per_step": round(cached_s / num_steps * 1e3, 4),
                "recompute_ms_per_step": round(recompute_s / num_steps * 1e3, 4),
                "max_latent_diff": float((lat_c.float() - lat_r.float()).abs().max()),
                "device": str(dev),
                "dtype": dtype,
                "model_params": params,
            }
        )
        atomic_write_text(out_dir / "generation.csv", _csv(rows))  # partial results survive interruption
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench generation", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=Path("results/cpu"), help="results folder (default: %(default)s)"
    )
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    ap.add_argument(
        "--prefix-lengths",
        default="16,64,256",
        help="comma-separated caption prefix lengths in tokens, <BOS> included (default: %(default)s)",
    )
    ap.add_argument("--batch-size", type=int, default=4, help="images per call (default: %(default)s)")
    ap.add_argument(
        "--scheduler",
        choices=("ddpm", "ddim"),
        default="ddim",
        help="diffusion sampler (default: %(default)s)",
    )
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per image (default: %(default)s)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per setting, median reported (default: %(default)s)",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="model, prompt and sampling seed (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    try:
        prefix_lengths = tuple(int(x) for x in args.prefix_lengths.split(","))
    except ValueError:
        ap.error(
            f"--prefix-lengths {args.prefix_lengths!r}: expected comma-separated integers, e.g. 16,64,256"
        )
    if min(prefix_lengths) < 1:
        ap.error(f"--prefix-lengths {args.prefix_lengths!r}: every length must be >= 1")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--steps", args.steps),
        ("--repeats", args.repeats),
    ):
        if value < 1:
            ap.error(f"{flag} {value}: must be >= 1")
    try:
        check_device(args.device)
    except ValueError as e:
        ap.error(f"--device {e}")
    rows = run_generation_bench(
        args.out,
        args.device,
        prefix_lengths,
        batch_size=args.batch_size,
        scheduler=args.scheduler,
        num_steps=args.steps,
        repeats=args.repeats,
        seed=args.seed,
    )
    for r in rows:
        print(
            f"prefix {r['prefix_tokens']:4d}: cached {r['cached_s']:.3f}s, "
            f"recompute {r['recompute_s']:.3f}s, speedup {r['speedup']:.2f}x "
            f"(max latent diff {r['max_latent_diff']:.1e})"
        )
    print(f"wrote {args.out / 'generation.csv'}")
    return 0


__all__ = ["FIELDS", "main", "run_generation_bench"]

if __name__ == "__main__":
    sys.exit(main())
