"""The ``quick`` profile: every stage of the bench end to end on a CPU in minutes.

For each model family (Transfusion and the Chameleon-style discrete baseline) on the ``shapes`` dataset:

1. train: a tiny model for a few hundred steps (``transfusion.train.train``; the trainer trains or reuses
   the cached quick autoencoder: a VAE for Transfusion, a VQ model for the baseline);
2. eval: text-to-image for held-out test captions and image-to-text for held-out test images, both scored
   by the shapes judge; bits per byte of held-out captions under the model's LM;
3. curves: the evaluation's four metrics again at every kept checkpoint (``curve_points`` of them),
   against training FLOPs, and from them the parity FLOP ratio of each (``bench.quick_curves``;
   ``plots/metrics_vs_flops.png``);

plus reference rows (the judge on the ground-truth test images, on their autoencoder reconstructions, and
on shuffled pairs as a chance level), then ``OUT/quick.csv``, ``OUT/quick.json``,
``OUT/quick_provenance.json`` and ``OUT/plots/`` (loss vs training FLOPs, sample grids, judge accuracies).

Robustness: every stage runs in its own try block; a failure is recorded (``stages[name].error`` and the
family row's ``error``) and the other stages go on. Rerunning reuses what is finished: a run directory
whose checkpoint is at the target step (and whose configuration is unchanged) is not retrained, a shorter
one is resumed, and an evaluation whose inputs are unchanged is read back from ``OUT/eval/``.

Usage: ``python -m bench quick [--out results/quick] [--runs-dir runs/quick] [--steps N] [--fresh]
[--set KEY=JSON ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfusion.provenance import (
    atomic_file,
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    provenance,
)
from transfusion.value_checks import is_finite_real, is_int

FAMILIES: tuple[str, ...] = ("transfusion", "discrete")
EVAL_SPLITS: tuple[str, ...] = ("test", "val")  # shapes splits the evaluation may draw from

CSV_FIELDS: tuple[str, ...] = (
    "family", "status", "steps", "params", "final_loss", "final_lm_loss", "final_diffusion_loss",
    "final_text_loss", "final_image_loss", "train_flops", "train_wall_s", "ae_kind", "ae_psnr",
    "t2i_alignment", "t2i_exact", "caption_accuracy", "caption_exact", "caption_empty", "text_bpb",
    "recon_alignment",
    "fid", "kid", "recon_fid", "latent_std_ratio", "parity_text_bpb", "parity_caption_accuracy",
    "parity_t2i_alignment", "parity_fid",
    "n_t2i", "n_caption", "n_text", "eval_wall_s", "error",
)  # fmt: skip

# Transfusion seeds image row i with ``base + i`` (transfusion.generation.row_generators). Sampling seed k
# starts its rows at k * IMAGE_POOL_STRIDE, so two sampling seeds never share a noise: with base = k,
# training seeds 0, 1 and 2 drew nearly one pool of 64 noises, shifted by a prompt. Seed 0 keeps the
# row seeds it always had. (The baseline draws its row seeds from a generator seeded with k.)
IMAGE_POOL_STRIDE = 2**20
# torch's CPU generator keeps only a seed's low 32 bits, so pool k + 4096 would be pool k again
SAMPLING_SEED_LIMIT = 2**32 // IMAGE_POOL_STRIDE


@dataclass
class QuickConfig:
    """Everything the quick profile does; the defaults fit <= 10 min on 2 busy CPU cores."""

    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=lambda: {"max_seq_len": 256})
    steps: int = 400
    # checkpoints kept along training for the compute curves and parity FLOP ratios (bench.quick_curves)
    curve_points: int = 4
    batch_rows: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 20
    log_every: int = 10
    train_examples: int = 2048
    dataset_options: dict[str, Any] = field(default_factory=dict)
    autoencoder_options: dict[str, Any] = field(
        default_factory=lambda: {
            "steps": 300,
            "batch_size": 16,
            "train_images": 1024,
            "val_images": 64,
            "scale_images": 256,
        }
    )
    cache_dir: str = ""  # "" -> TRANSFUSION_CACHE or ~/.cache/transfusion-bench
    threads: int = 0  # 0: the free cores (transfusion.train.resolve_threads); 1 on a busy machine
    # evaluation
    # the data split the evaluation draws its prompts, images and texts from: "test" (the reported
    # numbers) or "val" (for choosing settings such as the sampler without looking at the test split)
    eval_split: str = "test"
    n_t2i: int = 64  # held-out test captions to draw images for
    n_caption: int = 64  # held-out test images to caption
    n_text: int = 500  # held-out test captions for bits per byte
    scheduler: str = "ddpm"  # the paper: 250 DDPM steps
    num_diffusion_steps: int = 250
    guidance_scale: float = 3.0  # Transfusion: CFG on eps; baseline: CFG on code logits (1 = off)
    # the baseline's own guidance scale (None: guidance_scale for both); each family's best differs
    # (results/study: the baseline's val-chosen scale is 1, Transfusion's 3)
    baseline_guidance_scale: float | None = None
    # Transfusion: clamp each denoising step's x_0 estimate to [-r, r] (None: no clamp, the paper's recipe);
    # see SamplingConfig.clip_sample_range and latent_std_ratio in the results
    clip_sample_range: float | None = None
    image_temperature: float = 1.0  # the baseline's code sampling temperature
    caption_max_tokens: int = 64
    # captions have at least this many tokens (greedy decoding may not end them at once): caption dropout
    # packs a dropped caption-first pair exactly like an empty image-first caption, so without it a share
    # of captions comes out empty and scores 0 (caption_empty measures that share)
    caption_min_tokens: int = 1
    # FID/KID of the generated images against the prompts' real images, in the suite's shapes-CNN
    # feature space (transfusion.eval.fid); fid_cnn overrides FeatureCNNConfig fields.
    fid: bool = True
    fid_cnn: dict[str, Any] = field(default_factory=dict)
    # a local file of torch-fidelity's Inception weights (pt_inception-2015-12-05; never downloaded): FID
    # and KID then use Inception's 2048 pool features instead of the shapes CNN. "": the shapes CNN.
    fid_inception_weights: str = ""
    # the evaluation's sampling seed (the images' noise, the KID subsets; captions are greedy and the
    # prompts stay those from eval_offset). None: ``seed``, the training's. bench.eval_noise varies it
    # alone, to tell the evaluation's sampling noise from the training seed's.
    eval_seed: int | None = None
    # the index of the first held-out item an evaluation reads (its prompts and their images, the images
    # it captions, the texts it scores): 0, the split's first items. Another offset scores the same models
    # on other items, the prompt set's luck that eval_seed leaves fixed.
    eval_offset: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        weights = self.fid_inception_weights
        if not isinstance(weights, str):
            raise ValueError(f"QuickConfig.fid_inception_weights = {weights!r} must be a path (a string)")
        if not is_int(self.eval_offset) or self.eval_offset < 0:
            raise ValueError(f"QuickConfig.eval_offset = {self.eval_offset!r} must be an integer >= 0")
        if self.eval_seed is not None and not is_int(self.eval_seed):
            raise ValueError(f"QuickConfig.eval_seed = {self.eval_seed!r} must be None or an integer")
        if not is_int(self.n_t2i) or not 1 <= self.n_t2i <= IMAGE_POOL_STRIDE:
            limit = IMAGE_POOL_STRIDE
            raise ValueError(f"QuickConfig.n_t2i = {self.n_t2i!r} must be an integer from 1 to {limit}")
        # the range of eval_seed (or of seed, when it samples) is checked here, once
        seed_field = "seed" if self.eval_seed is None else "eval_seed"
        if isinstance(self.sampling_seed, int) and not 0 <= self.sampling_seed < SAMPLING_SEED_LIMIT:
            raise ValueError(
                f"QuickConfig.{seed_field} = {self.sampling_seed} seeds the evaluation's images and must be "
                f"from 0 to {SAMPLING_SEED_LIMIT - 1}: torch keeps a seed's low 32 bits, so a larger one "
                "would draw the noise of a smaller one"
                + ("; set eval_seed to evaluate this training" if seed_field == "seed" else "")
            )
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"QuickConfig.eval_split = {self.eval_split!r} must be one of {EVAL_SPLITS}")
        for name in ("guidance_scale", "baseline_guidance_scale"):
            value = getattr(self, name)
            if value is None and name == "baseline_guidance_scale":
                continue
            if not is_finite_real(value):
                raise ValueError(f"QuickConfig.{name} = {value!r} must be a finite number (1: no guidance)")
        if self.clip_sample_range is not None:  # checked now, not after the trainings
            from transfusion.generation import SamplingConfig

            SamplingConfig(clip_sample_range=self.clip_sample_range)

    @property
    def sampling_seed(self) -> int:
        """The seed of the evaluation's sampling: ``eval_seed``, else the training's ``seed``."""
        return self.seed if self.eval_seed is None else self.eval_seed

    @property
    def image_row_seed(self) -> int:
        """Transfusion's first image row seed: row i of the evaluation is seeded with this + i."""
        return self.sampling_seed * IMAGE_POOL_STRIDE

    def guidance(self, family: str) -> float:
        """The guidance scale ``family`` samples images with."""
        if family != "transfusion" and self.baseline_guidance_scale is not None:
            return float(self.baseline_guidance_scale)
        return float(self.guidance_scale)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["families"] = list(self.families)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuickConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown quick config key(s) {unknown}; valid: {sorted(known)}")
        d = dict(d)
        if "families" in d:
            d["families"] = tuple(d["families"])
        return cls(**d)

    def replace(self, **changes: Any) -> QuickConfig:
        return QuickConfig.from_dict({**self.to_dict(), **changes})


# run-time knobs that do not change what a run measures
_NOT_SETTINGS = ("progress", "cache_dir", "threads")


def changed_settings(config: dict[str, Any] | None) -> str:
    """The fields a stored quick config (a quick run's, or a study's base) changed from the defaults,
    as "`key=value`, ..." for a report; "" for none."""
    if not config:
        return ""
    defaults = QuickConfig().to_dict()
    changed = {k: v for k, v in config.items() if k not in _NOT_SETTINGS and defaults.get(k, v) != v}
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(changed.items()))


# ---------------------------------------------------------------------- small helpers
def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[quick] {msg}", file=sys.stderr, flush=True)


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class _Stages:
    """Runs named stages, timing them and recording failures instead of raising."""

    def __init__(self, total: int, progress: bool) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="quick", unit="stage", dynamic_ncols=True, file=sys.stderr)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        _log(f"stage {name}: start")
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"status": "ok"}
        result = None
        try:
            result = fn()
            if isinstance(result, dict) and result.get("_reused"):
                rec["status"] = "reused"
        except Exception as e:  # a failed stage is recorded and the others go on
            rec["status"] = "failed"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=8)
            _log(f"stage {name}: FAILED: {rec['error']}")
        rec["wall_s"] = round(time.perf_counter() - t0, 2)
        self.records[name] = rec
        _log(f"stage {name}: {rec['status']} in {rec['wall_s']:.1f}s")
        if self.bar is not None:
            self.bar.update(1)
        return result

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------- configs
def model_and_train_config(cfg: QuickConfig, family: str, threads: int):
    from transfusion.config import get_preset
    from transfusion.train import TrainConfig

    model_cfg = get_preset(cfg.preset, **cfg.model_overrides)
    train_cfg = TrainConfig(
        family=family,
        steps=cfg.steps,
        batch_rows=cfg.batch_rows,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        log_every=cfg.log_every,
        ckpt_every=max(1, cfg.steps // cfg.curve_points) if cfg.curve_points > 1 else 0,
        keep_checkpoints=max(1, cfg.curve_points),
        seed=cfg.seed,
        device="cpu",
        dataset="shapes",
        dataset_options=dict(cfg.dataset_options),
        train_examples=cfg.train_examples,
        autoencoder="auto",
        autoencoder_options=dict(cfg.autoencoder_options),
        cache_dir=cfg.cache_dir,
        progress=cfg.progress,
        threads=threads,
    )
    return model_cfg, train_cfg


# What decides a family's trained weights (besides the step count): a run directory trained with the same
# values is reused or resumed. Built from QuickConfig (not TrainConfig.to_dict, whose fields may grow).
_RUN_KEYS = (
    "seed", "preset", "model_overrides", "batch_rows", "seq_len", "lr", "warmup_steps", "train_examples",
    "dataset_options", "autoencoder_options", "curve_points",
)  # fmt: skip


def _run_fingerprint(cfg: QuickConfig, family: str) -> str:
    d = cfg.to_dict()
    return _fingerprint({"family": family, **{k: d[k] for k in _RUN_KEYS}})


# ---------------------------------------------------------------------- stage: train
def train_family(cfg: QuickConfig, family: str, run_dir: Path, threads: int, fresh: bool) -> dict[str, Any]:
    """Train (or reuse / resume) one family's run; returns a summary of its metrics."""
    from transfusion.train import ConfigError, latest_checkpoint, read_metrics, train

    model_cfg, train_cfg = model_and_train_config(cfg, family, threads)
    fp = _run_fingerprint(cfg, family)
    fp_file = run_dir / "quick_fingerprint.json"
    reused = False
    if run_dir.exists():
        stored = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None
        latest = latest_checkpoint(run_dir)
        if fresh or stored != fp or latest is None:
            why = "--fresh" if fresh else ("configuration changed" if stored != fp else "no checkpoint")
            _log(f"{family}: discarding {run_dir} ({why})")
            shutil.rmtree(run_dir)
        elif int(latest["step"]) >= cfg.steps:
            _log(f"{family}: reusing {run_dir} (checkpoint at step {latest['step']})")
            reused = True
    if not reused:
        resume = run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(fp_file, {"fingerprint": fp})
        try:
            train(model_cfg, train_cfg, run_dir, resume=resume, preset=cfg.preset)
        except ConfigError as e:
            if not resume:
                raise
            _log(f"{family}: cannot resume {run_dir} ({e}); training from scratch")
            shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            atomic_write_json(fp_file, {"fingerprint": fp})
            train(model_cfg, train_cfg, run_dir, resume=False, preset=cfg.preset)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise RuntimeError(f"{run_dir}/metrics.jsonl is empty")
    summary = summarize_run(run_dir, rows)
    summary["_reused"] = reused
    return summary


def summarize_run(run_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    last = rows[-1]
    out: dict[str, Any] = {
        "steps": int(last["step"]),
        "final_loss": last.get("loss"),
        "final_lm_loss": last.get("lm_loss"),
        "final_diffusion_loss": last.get("diffusion_loss"),
        "final_text_loss": last.get("text_loss", last.get("lm_loss")),
        "final_image_loss": last.get("image_loss"),  # the baseline's LM loss on image codes
        "train_flops": last.get("train_flops"),
        "train_wall_s": last.get("wall_time"),
        "tokens_seen": last.get("tokens_seen"),
    }
    cfg_file = run_dir / "config.json"
    if cfg_file.is_file():
        conf = json.loads(cfg_file.read_text())
        out["params"] = _param_count(conf)
    ae_meta = run_dir / "autoencoder" / "autoencoder.json"
    if ae_meta.is_file():
        meta = json.loads(ae_meta.read_text())
        m = meta.get("metrics", {})
        out["ae_kind"] = meta.get("kind")
        out["ae_psnr"] = m.get("val_psnr", m.get("psnr"))
        out["ae_train_s"] = m.get("total_seconds")
    return out


def _param_count(conf: dict[str, Any]) -> int | None:
    for key in ("params", "num_params", "parameters"):
        v = conf.get(key)
        if isinstance(v, dict):
            v = v.get("total")
        if isinstance(v, (int, float)):
            return int(v)
    return None


# ---------------------------------------------------------------------- stage: eval
@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    autoencoder: Any
    step: int


def _load(family: str, run_dir: Path, step: int | None = None) -> _Loaded:
    """Model, tokenizer and autoencoder of a run, at checkpoint ``step`` (default: the latest)."""
    if family == "transfusion":
        from transfusion.generation import load_run

        run = load_run(run_dir, step=step, device="cpu")
        if run.autoencoder is None:
            raise FileNotFoundError(f"{run_dir}: no autoencoder to decode latents")
        return _Loaded(run.model, run.tokenizer, run.autoencoder, run.step)
    from transfusion.autoencoders import load_autoencoder
    from transfusion.data import load_tokenizer
    from transfusion.train import latest_checkpoint, load_checkpoint_model

    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint")
    model = load_checkpoint_model(run_dir, step=step).eval()
    tok = load_tokenizer(run_dir / "tokenizer.json")
    ae = load_autoencoder(run_dir / "autoencoder")
    return _Loaded(model, tok, ae, int(latest["step"]) if step is None else step)


def _refuse_offset_past_end(cfg: QuickConfig, n: int, size: int, why_n: str = "") -> None:
    """The one error for an ``eval_offset`` from which ``n`` items run past the split's ``size``;
    ``why_n`` follows the count in the message (where the count comes from)."""
    if cfg.eval_offset and cfg.eval_offset + n > size:
        raise ValueError(
            f"QuickConfig.eval_offset = {cfg.eval_offset} needs {n} items from there{why_n}, but the "
            f"{cfg.eval_split!r} split has {size}: the offset can be at most {max(0, size - n)}"
        )


def _test_items(cfg: QuickConfig, n: int) -> list[dict[str, Any]]:
    """``n`` items of the evaluation split (``cfg.eval_split``, normally "test") from ``cfg.eval_offset``.
    At offset 0, at most the split's length (as always); from a positive offset, an error past its end."""
    from transfusion.data import get_dataset

    ds = get_dataset("shapes", cfg.eval_split, **cfg.dataset_options)
    _refuse_offset_past_end(cfg, n, len(ds))
    return [ds[cfg.eval_offset + i] for i in range(min(n, len(ds)))]


def check_eval_items(cfg: QuickConfig) -> None:
    """Refuse, before anything trains, an ``eval_offset`` that would run an evaluation past its split's
    end (every evaluation reads max(n_t2i, n_caption, n_text) items from the offset), and Inception
    weights that are not there."""
    from transfusion.data import get_dataset

    n = max(cfg.n_t2i, cfg.n_caption, cfg.n_text)
    size = len(get_dataset("shapes", cfg.eval_split, **cfg.dataset_options))
    _refuse_offset_past_end(cfg, n, size, " (the largest of n_t2i, n_caption, n_text)")
    # checked here, not when the config is built: a stored config names a file of the machine it ran on
    weights = cfg.fid_inception_weights
    if cfg.fid and weights and not Path(weights).is_file():
        raise ValueError(
            f"QuickConfig.fid_inception_weights = {weights!r}: no such file (Inception weights are never "
            "downloaded: give torch-fidelity's pt_inception-2015-12-05 state dict)"
        )


def _generate_images(
    cfg: QuickConfig, family: str, lm: _Loaded, prompts: list[str], with_latents: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Decoded images for ``prompts``; with ``with_latents`` also Transfusion's latents (None: discrete)."""
    if family == "transfusion":
        from transfusion.generation import text_to_image

        guidance = None if cfg.guidance(family) == 1.0 else cfg.guidance(family)
        latents = text_to_image(
            lm.model,
            prompts,
            tokenizer=lm.tokenizer,
            generator=cfg.image_row_seed,
            scheduler=cfg.scheduler,
            num_steps=cfg.num_diffusion_steps,
            guidance_scale=guidance,
            clip_sample_range=cfg.clip_sample_range,
        )
        images = lm.autoencoder.decode(latents).cpu().float()
        return (images, latents) if with_latents else images
    from transfusion.baseline_sampling import generate_images
    from transfusion.train import special_tokens

    gen = torch.Generator().manual_seed(cfg.sampling_seed)
    samples = generate_images(
        lm.model,
        [lm.tokenizer.encode(p) for p in prompts],
        special=special_tokens(lm.tokenizer),
        cfg_scale=cfg.guidance(family),
        temperature=cfg.image_temperature,
        generator=gen,
    )
    images = lm.autoencoder.decode_codes(samples.codes).float().cpu()
    return (images, None) if with_latents else images


def _caption_images(cfg: QuickConfig, family: str, lm: _Loaded, images: torch.Tensor) -> list[str]:
    if family == "transfusion":
        from transfusion.generation import caption

        return list(
            caption(
                lm.model,
                images,
                autoencoder=lm.autoencoder,
                tokenizer=lm.tokenizer,
                max_new_tokens=cfg.caption_max_tokens,
                min_new_tokens=cfg.caption_min_tokens,
            )
        )
    from transfusion.baseline_sampling import caption_images
    from transfusion.train import special_tokens

    codes = lm.autoencoder.encode_codes(images)
    out = caption_images(
        lm.model,
        codes,
        special=special_tokens(lm.tokenizer),
        max_new_tokens=cfg.caption_max_tokens,
        min_new_tokens=cfg.caption_min_tokens,
        temperature=0.0,
        text_vocab=int(lm.tokenizer.vocab_size),
    )
    return [lm.tokenizer.decode(t) for t in out.tokens]


def _printable(text: str) -> str:
    """Generated text for a plot title: control characters shown as escapes."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def stored_run_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint a training run directory was made with (None if it has none)."""
    fp_file = run_dir / "quick_fingerprint.json"
    return json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None


# the QuickConfig fields that change an evaluation and not the training it reads
EVAL_FIELDS: tuple[str, ...] = (
    "eval_split", "n_t2i", "n_caption", "n_text", "scheduler", "num_diffusion_steps", "guidance_scale",
    "baseline_guidance_scale", "clip_sample_range", "image_temperature", "caption_max_tokens",
    "caption_min_tokens", "fid", "fid_cnn", "eval_seed", "eval_offset", "fid_inception_weights",
)  # fmt: skip


def eval_settings(cfg: QuickConfig) -> dict[str, Any]:
    """The QuickConfig fields an evaluation's results depend on (part of its cache fingerprint)."""
    d = cfg.to_dict()
    # these are named only when not the default, so caches from before they existed stay valid
    added_later = {"eval_split": "test", "baseline_guidance_scale": None, "eval_seed": None, "eval_offset": 0,
                   "fid_inception_weights": ""}  # fmt: skip
    fields_read = (*EVAL_FIELDS, "seed", "dataset_options")
    return {k: d[k] for k in fields_read if k not in added_later or d[k] != added_later[k]}


def image_noise_settings(cfg: QuickConfig, family: str) -> dict[str, Any]:
    """The image rows' seeding where it differs from the first rule (row i seeded sampling_seed + i):
    part of a Transfusion evaluation's fingerprint from sampling seed 1 on, so that those evaluations
    are drawn again and seed 0's, and every baseline's, stay valid."""
    if family != "transfusion" or cfg.image_row_seed == cfg.sampling_seed:
        return {}
    return {"image_row_seed": cfg.image_row_seed}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "absent"


def weights_digests(cfg: QuickConfig, run_dir: Path, steps: list[int]) -> dict[str, str]:
    """Digests of the weights an evaluation of ``run_dir`` at ``steps`` reads: the model checkpoints, the
    run's autoencoder and, with FID on, the feature CNN (trained first if absent, as the evaluation would).
    Part of every evaluation's cache fingerprint: a stored evaluation is reused for the very same weights,
    not merely the same configuration (a fresh clone trains its own models, and thread counts change
    them)."""
    from transfusion.autoencoders.model import WEIGHTS_NAME

    ckpt = run_dir / "checkpoints"
    digests = {f"step_{s}": _file_digest(ckpt / f"step_{s:08d}.safetensors") for s in steps}
    digests["autoencoder"] = _file_digest(run_dir / "autoencoder" / WEIGHTS_NAME)
    if cfg.fid and cfg.fid_inception_weights:
        digests["fid_inception"] = _file_digest(Path(cfg.fid_inception_weights))
    elif cfg.fid:
        from transfusion.eval.features import FeatureCNNConfig, get_feature_cnn

        digests["fid_cnn"] = _file_digest(get_feature_cnn(FeatureCNNConfig(**cfg.fid_cnn), _fid_cache(cfg)))
    return digests


def eval_family(cfg: QuickConfig, family: str, run_dir: Path, eval_dir: Path, fresh: bool) -> dict[str, Any]:
    """Text-to-image alignment, captioning accuracy and bits per byte of one trained family."""
    from transfusion.eval import (
        bits_per_byte_of_texts,
        caption_accuracy,
        model_logits_fn,
        text_to_image_alignment,
    )
    from transfusion.train import latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{run_dir}: no trained checkpoint (did the train stage fail?)")
    step = int(latest["step"])
    fp_src = {
        "run": stored_run_fingerprint(run_dir),
        "step": step,
        "eval": eval_settings(cfg),
        "weights": weights_digests(cfg, run_dir, [step]),
        **image_noise_settings(cfg, family),
    }
    fp = _fingerprint(fp_src)
    out_json = eval_dir / f"{family}.json"
    samples_file = eval_dir / f"{family}_samples.npz"
    if not fresh and out_json.is_file() and samples_file.is_file():
        stored = json.loads(out_json.read_text())
        if stored.get("fingerprint") == fp:
            _log(f"{family}: reusing the evaluation in {out_json}")
            return {**stored, "_reused": True}

    t0 = time.perf_counter()
    torch.manual_seed(cfg.sampling_seed)
    lm = _load(family, run_dir)
    n_img = max(cfg.n_t2i, cfg.n_caption)
    items = _test_items(cfg, max(n_img, cfg.n_text))
    prompts = [it["caption"] for it in items[: cfg.n_t2i]]
    cap_items = items[: cfg.n_caption]
    cap_images = torch.stack([it["image"] for it in cap_items])
    timings: dict[str, float] = {}
    latent_stats = None

    with torch.no_grad():
        t = time.perf_counter()
        gen_images, gen_latents = _generate_images(cfg, family, lm, prompts, with_latents=True)
        timings["t2i_s"] = time.perf_counter() - t
        t2i = text_to_image_alignment(gen_images, prompts)

        t = time.perf_counter()
        captions = _caption_images(cfg, family, lm, cap_images)
        timings["caption_s"] = time.perf_counter() - t
        cap = caption_accuracy(captions, [it["objects"] for it in cap_items])

        t = time.perf_counter()
        texts = [it["caption"] for it in items[: cfg.n_text]]
        bpb = bits_per_byte_of_texts(model_logits_fn(lm.model), lm.tokenizer, texts)
        timings["text_s"] = time.perf_counter() - t

        # the autoencoder's ceiling: reconstructions of the prompts' own ground-truth images
        t = time.perf_counter()
        truth = torch.stack([it["image"] for it in items[: cfg.n_t2i]])
        if family == "transfusion":
            true_latents = lm.autoencoder.encode(truth)
            recon = lm.autoencoder.decode(true_latents)
            latent_stats = latent_std_stats(gen_latents, true_latents)
        else:
            recon = lm.autoencoder.decode_codes(lm.autoencoder.encode_codes(truth))
        recon_align = text_to_image_alignment(recon.float().cpu(), prompts)
        timings["recon_s"] = time.perf_counter() - t

        t = time.perf_counter()
        fid = _fid_scores(cfg, truth, gen_images, recon.float().cpu()) if cfg.fid else None
        timings["fid_s"] = time.perf_counter() - t

    result = {
        "fingerprint": fp,
        "family": family,
        "step": lm.step,
        "t2i": t2i.as_dict(with_scores=True),
        "caption": cap.as_dict(with_scores=True),
        "text": bpb.as_dict(),
        "recon_alignment": recon_align.as_dict(),
        "fid": fid,
        "t2i_latents": latent_stats,
        "prompts": prompts,
        "generated_captions": captions,
        "true_captions": [it["caption"] for it in cap_items],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "eval_wall_s": round(time.perf_counter() - t0, 2),
    }
    eval_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(samples_file, suffix=".npz") as tmp:  # (np.savez adds .npz to any other name)
        np.savez_compressed(tmp, generated=_to_uint8(gen_images), caption_inputs=_to_uint8(cap_images))
    atomic_write_json(out_json, result)
    return result


def fid_against(cfg: QuickConfig, real: torch.Tensor, generated: torch.Tensor) -> dict[str, Any]:
    """``fid_kid`` of generated against real images in the suite's feature space, as configured."""
    from transfusion.eval.features import FeatureCNNConfig
    from transfusion.eval.fid import fid_kid

    if cfg.fid_inception_weights:
        return fid_kid(
            real, generated, "inception", weights_path=cfg.fid_inception_weights, seed=cfg.sampling_seed
        )
    return fid_kid(
        real,
        generated,
        cnn_config=FeatureCNNConfig(**cfg.fid_cnn),
        cache_dir=_fid_cache(cfg),
        seed=cfg.sampling_seed,
    )


def _fid_cache(cfg: QuickConfig) -> Path | None:
    """Where the FID feature CNN is cached (None: transfusion.eval's default)."""
    return Path(cfg.cache_dir) / "fid" if cfg.cache_dir else None


def _fid_scores(cfg: QuickConfig, real: torch.Tensor, generated: torch.Tensor, recon: torch.Tensor) -> dict:
    """FID/KID of the generated images and (the autoencoder's floor) of the reconstructions, against the
    prompts' real images. A failure is recorded, not raised: the other metrics stand on their own."""
    try:
        gen = fid_against(cfg, real, generated)
        rec = fid_against(cfg, real, recon)
    except Exception as e:  # recorded in the results; the row keeps its other metrics
        return {"error": f"{type(e).__name__}: {e}"}
    return {"fid": gen["fid"], "kid": gen["kid_mean"], "recon_fid": rec["fid"], "recon_kid": rec["kid_mean"],
            "n": gen["n_fake"], "extractor": gen["extractor"]}  # fmt: skip


def reference_scores(cfg: QuickConfig) -> dict[str, Any]:
    """The judge on ground truth (its ceiling) and on shuffled pairs (chance level)."""
    from transfusion.eval import caption_accuracy, text_to_image_alignment

    # each metric over as many items as it scores (at least 64, for a steady chance level); shuffled:
    # each item's caption moved to the next item, cyclically
    n_align, n_cap = max(cfg.n_t2i, 64), max(cfg.n_caption, 64)
    items = _test_items(cfg, max(n_align, n_cap))
    a, c = min(n_align, len(items)), min(n_cap, len(items))
    images = torch.stack([it["image"] for it in items[:a]])
    caps = [it["caption"] for it in items]
    objs = [it["objects"] for it in items[:c]]
    return {
        "n": a,
        "n_caption": c,
        "ground_truth_t2i_alignment": text_to_image_alignment(images, caps[:a]).score,
        "ground_truth_caption_accuracy": caption_accuracy(caps[:c], objs).score,
        "shuffled_t2i_alignment": text_to_image_alignment(images, caps[1:a] + caps[:1]).score,
        "shuffled_caption_accuracy": caption_accuracy(caps[1:c] + caps[:1], objs).score,
    }


# ---------------------------------------------------------------------- rows and files
def empty_caption_share(captions: list[str] | None) -> float | None:
    """Share of generated captions with no text (the model ended the caption at once): a caption score
    below the shuffled-pair chance level usually comes from these."""
    if not captions:
        return None
    return sum(not c.strip() for c in captions) / len(captions)


def latent_std_stats(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """Std of the generated latents against that of the prompts' real images' latents: near 1 for a sound
    sampler; well above 1 when the denoising loop drives latents off the data's scale."""
    gen_std, real_std = float(generated.float().std()), float(real.float().std())
    return {"std": gen_std, "real_std": real_std, "ratio": gen_std / real_std}


def eval_metrics(ev: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one stored evaluation (``eval_family``'s result), as table columns."""
    fid = ev.get("fid") or {}
    return {
        "t2i_alignment": ev["t2i"]["score"],
        "caption_accuracy": ev["caption"]["score"],
        "caption_empty": empty_caption_share(ev.get("generated_captions")),
        "text_bpb": ev["text"]["bits_per_byte"],
        "fid": fid.get("fid"),
        "kid": fid.get("kid"),
        "recon_fid": fid.get("recon_fid"),
        "latent_std_ratio": (ev.get("t2i_latents") or {}).get("ratio"),
        "eval_wall_s": ev.get("eval_wall_s"),
    }


def family_row(family: str, train_sum: dict | None, ev: dict | None, errors: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in CSV_FIELDS}
    row["family"] = family
    for k, v in (train_sum or {}).items():
        if k in row:
            row[k] = v
    if ev:
        row.update(eval_metrics(ev))
        row["t2i_exact"] = ev["t2i"]["exact"]
        row["caption_exact"] = ev["caption"]["exact"]
        row["recon_alignment"] = ev["recon_alignment"]["score"]
        row["n_t2i"] = ev["t2i"]["n"]
        row["n_caption"] = ev["caption"]["n"]
        row["n_text"] = ev["text"]["n_texts"]
    row["status"] = "ok" if not errors else ("partial" if train_sum or ev else "failed")
    row["error"] = "; ".join(errors) if errors else None
    return {k: _finite(v) for k, v in row.items()}


def to_csv(rows: list[dict[str, Any]], fields: tuple[str, ...] | list[str] = CSV_FIELDS) -> str:
    """CSV text of ``rows`` with columns ``fields`` (None -> empty cell)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


# ---------------------------------------------------------------------- plots
def make_plots(out_dir: Path, families: list[str], run_dirs: dict[str, Path], result: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transfusion.train import read_metrics

    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    errors: list[str] = []

    # 1. loss curves vs training FLOPs, both families on one figure
    try:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        drawn = 0
        for fam in families:
            mfile = run_dirs[fam] / "metrics.jsonl"
            if not mfile.is_file():
                continue
            rows = [r for r in read_metrics(mfile) if r.get("train_flops")]
            if not rows:
                continue
            x = [r["train_flops"] for r in rows]
            text_key = "text_loss" if "text_loss" in rows[0] else "lm_loss"
            axes[0].plot(x, [r.get(text_key) for r in rows], label=f"{fam} ({text_key})")
            label = "loss = lm + λ·diffusion" if fam == "transfusion" else "loss = lm (text + image codes)"
            axes[1].plot(x, [r.get("loss") for r in rows], label=f"{fam}: {label}")
            drawn += 1
        if not drawn:
            raise RuntimeError("no metrics to plot")
        axes[0].set_title("text next-token loss on training data")
        axes[0].set_ylabel("nats / text token")
        axes[1].set_title("training objective")
        axes[1].set_ylabel("loss")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("training FLOPs")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("quick profile: loss vs training FLOPs (tiny models, shapes)")
        fig.tight_layout()
        p = plots / "loss_vs_flops.png"
        atomic_savefig(fig, p, dpi=110)
        plt.close(fig)
        written.append(p)
    except Exception as e:
        plt.close("all")
        errors.append(f"loss_vs_flops: {type(e).__name__}: {e}")

    # 2. sample grids per family: text-to-image (prompt above) and captioning (generated caption above)
    for fam in families:
        try:
            ev_file = out_dir / "eval" / f"{fam}.json"
            npz = out_dir / "eval" / f"{fam}_samples.npz"
            if not (ev_file.is_file() and npz.is_file()):
                continue
            ev = json.loads(ev_file.read_text())
            data = np.load(npz)
            gen, inputs = data["generated"], data["caption_inputs"]
            ncol = 4
            n_gen = min(len(gen), 8)
            n_cap = min(len(inputs), 8)
            nrow = math.ceil(n_gen / ncol) + math.ceil(n_cap / ncol)
            fig, axes = plt.subplots(nrow, ncol, figsize=(ncol * 2.6, nrow * 2.9), squeeze=False)
            for ax in axes.flat:
                ax.axis("off")
            t2i_scores = ev["t2i"].get("scores", [])
            for i in range(n_gen):
                ax = axes[i // ncol][i % ncol]
                ax.imshow(gen[i], interpolation="nearest")
                s = f" [{t2i_scores[i]:.2f}]" if i < len(t2i_scores) else ""
                ax.set_title(textwrap.fill("prompt: " + ev["prompts"][i] + s, 30), fontsize=6.5)
            off = math.ceil(n_gen / ncol)
            cap_scores = ev["caption"].get("scores", [])
            for i in range(n_cap):
                ax = axes[off + i // ncol][i % ncol]
                ax.imshow(inputs[i], interpolation="nearest")
                s = f" [{cap_scores[i]:.2f}]" if i < len(cap_scores) else ""
                gen_cap = _printable(ev["generated_captions"][i]) or "(empty)"
                ax.set_title(textwrap.fill("caption: " + gen_cap[:90] + s, 30), fontsize=6.5)
            fig.suptitle(
                f"{fam} (step {ev.get('step')}): top: text-to-image samples with their prompts; "
                "bottom: test images with generated captions. [judge score]",
                fontsize=8,
            )
            fig.tight_layout(rect=(0, 0, 1, 0.97))
            p = plots / f"samples_{fam}.png"
            atomic_savefig(fig, p, dpi=110)
            plt.close(fig)
            written.append(p)
        except Exception as e:
            plt.close("all")
            errors.append(f"samples_{fam}: {type(e).__name__}: {e}")

    # 3. judge accuracies
    try:
        labels, t2i, cap = [], [], []
        for row in result.get("families", []):
            if row.get("t2i_alignment") is None and row.get("caption_accuracy") is None:
                continue
            labels.append(row["family"])
            t2i.append(row.get("t2i_alignment") or 0.0)
            cap.append(row.get("caption_accuracy") or 0.0)
            if row.get("recon_alignment") is not None:
                labels.append(f"{row['family']} AE recon\n(ceiling)")
                t2i.append(row["recon_alignment"])
                cap.append(float("nan"))
        ref = result.get("references") or {}
        if ref:
            labels += ["ground truth", "shuffled\n(chance)"]
            t2i += [ref["ground_truth_t2i_alignment"], ref["shuffled_t2i_alignment"]]
            cap += [ref["ground_truth_caption_accuracy"], ref["shuffled_caption_accuracy"]]
        if not labels:
            raise RuntimeError("no accuracies to plot")
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
        ax.bar(x - 0.2, t2i, 0.4, label="text-to-image alignment (judge)")
        ax.bar(x + 0.2, np.nan_to_num(cap, nan=0.0), 0.4, label="caption attribute accuracy")
        for i, (a, b) in enumerate(zip(t2i, cap, strict=True)):
            ax.text(i - 0.2, a + 0.01, f"{a:.2f}", ha="center", fontsize=7)
            if not math.isnan(b):
                ax.text(i + 0.2, b + 0.01, f"{b:.2f}", ha="center", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("judge accuracy")
        ax.set_title("quick profile: shapes judge accuracy (held-out test prompts / images)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = plots / "judge_accuracy.png"
        atomic_savefig(fig, p, dpi=110)
        plt.close(fig)
        written.append(p)
    except Exception as e:
        plt.close("all")
        errors.append(f"judge_accuracy: {type(e).__name__}: {e}")
    if errors:
        raise RuntimeError("; ".join(errors) + f" (written: {[p.name for p in written]})")
    return written


# ---------------------------------------------------------------------- the pipeline
def run_quick(
    out_dir: str | Path,
    config: QuickConfig | None = None,
    fresh: bool = False,
    runs_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run every stage into ``out_dir`` and return what ``quick.json`` holds.

    ``runs_dir``: where the training run directories (checkpoints, autoencoders) go, one per family;
    default ``out_dir/runs``. ``fresh``: retrain and re-evaluate instead of reusing finished stages.
    """
    from transfusion.train import resolve_threads

    cfg = config or QuickConfig()
    check_eval_items(cfg)  # before anything trains
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    threads = cfg.threads or resolve_threads(0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    families = list(cfg.families)
    runs = Path(runs_dir) if runs_dir is not None else out / "runs"
    run_dirs = {f: runs / f for f in families}
    stages = _Stages(total=3 * len(families) + 4, progress=cfg.progress)
    train_sums: dict[str, dict | None] = {}
    evals: dict[str, dict | None] = {}
    result: dict[str, Any] = {}
    try:
        for fam in families:
            train_sums[fam] = stages.run(
                f"train_{fam}", lambda fam=fam: train_family(cfg, fam, run_dirs[fam], threads, fresh)
            )
        for fam in families:
            evals[fam] = stages.run(
                f"eval_{fam}", lambda fam=fam: eval_family(cfg, fam, run_dirs[fam], out / "eval", fresh)
            )
        from bench.quick_curves import curve_family, parity_ratios, plot_curves

        curves: dict[str, dict | None] = {}
        for fam in families:
            curves[fam] = stages.run(
                f"curve_{fam}", lambda fam=fam: curve_family(cfg, fam, run_dirs[fam], out / "eval", fresh)
            )
        parity = stages.run("parity", lambda: parity_ratios(curves)) or {}
        refs = stages.run("references", lambda: reference_scores(cfg))
        rows = []
        for fam in families:
            errs = [
                f"{name}: {stages.records[name]['error']}"
                for name in (f"train_{fam}", f"eval_{fam}")
                if stages.records[name]["status"] == "failed"
            ]
            ts = {k: v for k, v in (train_sums[fam] or {}).items() if not k.startswith("_")} or None
            ev = {k: v for k, v in (evals[fam] or {}).items() if not k.startswith("_")} or None
            train_sums[fam], evals[fam] = ts, ev
            rows.append(family_row(fam, ts, ev, errs))
            if fam == "transfusion":
                for metric, par in parity.items():
                    rows[-1][f"parity_{metric}"] = par["display"] if par else None
        result = {
            "profile": "quick",
            "run_dirs": {f: str(d) for f, d in run_dirs.items()},
            "config": cfg.to_dict(),
            "threads": threads,
            "families": rows,
            "references": refs,
            "train": train_sums,
            "eval": {f: _drop_lists(e) for f, e in evals.items()},
            "curves": {f: (c or {}).get("points") for f, c in curves.items()},
            "parity": parity,
            "stages": stages.records,
        }
        stages.run("plots", lambda: [str(p) for p in make_plots(out, families, run_dirs, result)])
        chance = {
            "caption_accuracy": (refs or {}).get("shuffled_caption_accuracy"),
            "t2i_alignment": (refs or {}).get("shuffled_t2i_alignment"),
        }
        stages.run("curve_plot", lambda: str(plot_curves(out, curves, parity, chance)))
    finally:
        stages.close()
        torch.set_num_threads(threads_before)
    _write_outputs(out, cfg, result, stages, t_start, threads)
    return result


def _drop_lists(ev: dict | None) -> dict | None:
    if ev is None:
        return None
    out = dict(ev)
    for part in ("t2i", "caption"):
        if isinstance(out.get(part), dict):
            out[part] = {k: v for k, v in out[part].items() if k != "scores"}
    return out


def _write_outputs(out: Path, cfg: QuickConfig, result: dict, stages: _Stages, t_start: float, threads: int):
    result["stages"] = stages.records
    result["total_wall_s"] = round(time.perf_counter() - t_start, 2)
    atomic_write_json(out / "quick.json", result)
    atomic_write_text(out / "quick.csv", to_csv(result.get("families", [])))
    prov = provenance(
        "cpu",
        cfg.seed,
        profile="quick",
        threads=threads,
        config=cfg.to_dict(),
        stage_wall_s={k: v["wall_s"] for k, v in stages.records.items()},
        total_wall_s=result["total_wall_s"],
        files=["quick.json", "quick.csv", "plots/"],
    )
    atomic_write_json(out / "quick_provenance.json", prov)


def _summary_table(result: dict[str, Any]) -> str:
    cols = ("family", "status", "steps", "final_loss", "t2i_alignment", "caption_accuracy", "text_bpb")
    lines = ["  ".join(f"{c:>16}" for c in cols)]
    for r in result.get("families", []):
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>16.4g}" if isinstance(v, float) else f"{'' if v is None else v!s:>16}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def parse_set_options(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--set KEY=VALUE`` options -> {KEY: VALUE}, VALUE read as JSON when it parses, else as a string."""
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            changes[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            changes[key.strip()] = value
    return changes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench quick",
        description="Quick CPU profile: tiny Transfusion vs discrete baseline, trained, sampled, judged.",
    )
    p.add_argument("--out", type=Path, default=Path("results") / "quick", help="results folder")
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs") / "quick",
        help="training run directories (checkpoints, autoencoders; reused on reruns)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per family")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (0: free cores)")
    p.add_argument("--families", default=None, help="comma-separated subset of " + ",".join(FAMILIES))
    p.add_argument("--cache-dir", default=None, help="autoencoder/latent cache (default: TRANSFUSION_CACHE)")
    p.add_argument("--fresh", action="store_true", help="retrain and re-evaluate instead of reusing")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override any QuickConfig field, e.g. --set n_t2i=8 --set 'autoencoder_options={\"steps\": 50}'",
    )
    args = p.parse_args(argv)
    changes: dict[str, Any] = {}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.threads is not None:
        changes["threads"] = args.threads
    if args.families:
        fams = tuple(f.strip() for f in args.families.split(",") if f.strip())
        bad = sorted(set(fams) - set(FAMILIES))
        if bad:
            p.error(f"--families: unknown {bad}; valid: {list(FAMILIES)}")
        changes["families"] = fams
    if args.cache_dir is not None:
        changes["cache_dir"] = args.cache_dir
    if args.no_progress:
        changes["progress"] = False
    changes.update(parse_set_options(args.set, p))
    try:
        cfg = QuickConfig().replace(**changes)
        check_eval_items(cfg)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    result = run_quick(args.out, cfg, fresh=args.fresh, runs_dir=args.runs_dir)
    print(_summary_table(result))
    for name, rec in result["stages"].items():
        print(f"  stage {name:<20} {rec['status']:<7} {rec['wall_s']:>8.1f}s  {rec.get('error', '')}")
    print(f"total {result['total_wall_s']:.1f}s; wrote {args.out}/quick.csv, quick.json, plots/")
    from bench.report import build_report

    print(f"wrote {build_report(Path(args.out).parent)}")
    failed = [n for n, r in result["stages"].items() if r["status"] == "failed"]
    return 1 if failed else 0


__all__ = ["FAMILIES", "QuickConfig", "main", "run_quick"]


if __name__ == "__main__":
    sys.exit(main())
