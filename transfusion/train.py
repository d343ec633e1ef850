"""Training: one loop for every model family, on one process or many (DDP under ``torchrun``).

``train(model_cfg, train_cfg, out_dir)`` runs ``train_cfg.steps`` optimizer steps and writes

    out_dir/config.json         the full resolved configuration (model, train, data) + provenance
    out_dir/metrics.jsonl       one JSON row per logging step (see ``METRIC_FIELDS``)
    out_dir/checkpoints/        step_XXXXXXXX.safetensors (weights) + step_XXXXXXXX.state.pt (optimizer,
                                scheduler, data stream position, RNG states, log accumulators) and
                                latest.json, each written atomically (temporary file + os.replace)
    out_dir/tokenizer.json      the text tokenizer used
    out_dir/autoencoder/        the image autoencoder used (when one is used)

Recipe (paper appendix A): AdamW (betas 0.9 / 0.95, eps 1e-8, weight decay 0.1 on weight matrices and
embeddings only), linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient clipping at 1.0,
bf16 autocast on CUDA, optional ``torch.compile`` of the transformer.

Exact resume. Everything random in a step is drawn from generators seeded by ``(seed, step)`` (the
diffusion noise and timesteps) or by the data stream's position (example order, caption dropout), so a
run resumed from the checkpoint of step k takes the same steps as one that never stopped: on CPU the
losses agree to float round-off (tests/test_train.py kills a run with SIGKILL and compares). On resume
``metrics.jsonl`` is cut back to the checkpoint's step, so it never holds a step twice.

Data parallel. Under ``torchrun`` every rank builds the same global batch of ``batch_rows`` rows and
trains on its ``batch_rows / world_size`` rows; noise and timesteps are drawn for the global batch and
sliced. Each rank scales its losses by its share of the global LM tokens / images, and DDP averages
gradients, so the gradient is exactly that of the global batch's mean losses: two processes match one
process at the same global batch up to float summation order (tests/test_ddp.py).

``train.parallel`` picks the wrapper under torchrun: "ddp" (default; ``DistributedDataParallel``),
"fsdp" (FSDP2: ``torch.distributed.fsdp.fully_shard`` on every transformer ``Block``, then on the root
model, the torchtitan pattern; parameters, gradients and optimizer state are sharded, and the gradient
reduce-scatter averages like DDP), "auto" (fsdp when the model has more than ``FSDP_AUTO_THRESHOLD``
parameters, else ddp) or "none" (one process only). The wrapping lives here, not in the model. FSDP
checkpoints are gathered to full state dicts on rank 0 (``get_model_state_dict`` /
``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``): the weights file is the
same as DDP's and loads in one process; the optimizer state is stored keyed by parameter name
(``optimizer_format = "fqn"``), and a run may resume under another ``train.parallel`` (either format loads
either way).

Model families. A ``ModelFamily`` (registry: ``register_family`` / ``get_family``) says how to prepare
the data, build the model, and compute the loss parts of a step; the loop only sees ``LossPart`` s. Two are
registered here, and ``train.family`` (the CLI's ``--model``) picks one; nothing else in a run's
configuration changes with it:

* "transfusion": ``Transfusion`` on VAE latents; loss parts ``lm`` + lambda * ``diffusion``.
* "discrete": the Chameleon-style baseline (``transfusion.baseline.DiscreteLM``) on VQ codes: a quick VQ
  autoencoder (same architecture and downsampling as the quick VAE, ``ae.codebook_size`` codes, default
  1024) is trained and cached like the VAE, or loaded from ``train.autoencoder = PATH``; its codebook size
  is written to ``model.codebook_size`` in config.json (``model_requested`` keeps what was asked for, 0 =
  take it from the autoencoder), so checkpoints rebuild. The data stream is ``DiscreteStream``: the same
  example order, caption-first / image-first split and caption-dropout draws as Transfusion's for the
  same seed. The one LM loss is the optimised ``lm`` part; ``diffusion_loss`` is logged as 0 so
  metrics.jsonl has the same columns, plus ``text_loss`` and ``image_loss`` (the LM loss on text targets /
  on code targets, logged only). FLOPs are measured by the same ``FlopCounterMode`` step and the analytic
  count is Transfusion's with the enlarged vocabulary. ``model.qk_norm`` stays an option (default off for
  both families, the shared transformer): the paper's Chameleon uses QK-norm for stability at scale, but
  turning it on for one family only would make switching families change the transformer as well.

A non-finite loss or gradient norm stops the run with ``NonFiniteLossError`` naming the step and the
last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from transfusion.config import ModelConfig
from transfusion.diffusion import sample_timesteps
from transfusion.flops import analytic_step_flops, measure_flops
from transfusion.packing import PackedBatch, SpecialTokens
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance
from transfusion.training_data import (
    MixedModalStream,
    StreamConfig,
    image_range,
    mix_seed,
    num_tokens,
    pool_latents,
    slice_rows,
)

_SALT_STEP = 0x57E9

METRIC_FIELDS = (
    "step",  # optimizer steps done
    "loss",  # mean total loss over the steps since the previous row (global batch)
    "lm_loss",  # same, LM part (per family: one "<part>_loss" per loss part)
    "diffusion_loss",  # same, diffusion part (unweighted; loss = lm_loss + lambda * diffusion_loss)
    "lr",  # learning rate used at this step
    "grad_norm",  # gradient norm at this step, before clipping
    "tokens_seen",  # non-padding positions trained on so far (text, <BOI>/<EOI>, image patches)
    "train_flops",  # measured FLOPs of step 1 (FlopCounterMode, all ranks) x step
    "wall_time",  # seconds spent in the training loop so far (over resumes)
)


PARALLEL_MODES = ("ddp", "fsdp", "auto", "none")
FSDP_AUTO_THRESHOLD = 300_000_000  # train.parallel = "auto": fsdp for models with more parameters


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the offending key."""


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or Inf; the message names the step and last checkpoint."""


# ====================================================================== configuration
def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape (``ModelConfig``)."""

    family: str = _opt(
        "transfusion", "model family: transfusion | discrete (the Chameleon-style baseline); CLI: --model"
    )
    steps: int = _opt(1000, "optimizer steps to train for")
    batch_rows: int = _opt(8, "rows of seq_len tokens per step, global (split across data-parallel ranks)")
    seq_len: int = _opt(256, "tokens per packed row (<= model.max_seq_len)")
    lr: float = _opt(1e-3, "peak learning rate (paper: 3e-4 at 0.16B-7B; toy models take more)")
    warmup_steps: int = _opt(50, "steps of linear warmup from 0 to lr")
    min_lr_ratio: float = _opt(0.05, "cosine decays to lr * this (paper: 1.5e-5 / 3e-4)")
    weight_decay: float = _opt(0.1, "AdamW decoupled weight decay, on weight matrices and embeddings only")
    betas: tuple[float, float] = _opt((0.9, 0.95), "AdamW betas, as b1,b2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "max gradient norm; 0 disables clipping")
    log_every: int = _opt(10, "steps between metrics rows (step 1 and the last step are always logged)")
    ckpt_every: int = _opt(100, "steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep")
    seed: int = _opt(0, "seeds model init, data order, caption dropout, noise and timesteps")
    device: str = _opt("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    compile: bool = _opt(False, "torch.compile the transformer")
    precision: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    attention: str = _opt(
        "auto", "attention backend (naive, sdpa, flex, ...); auto: flex on CUDA, else model.attention"
    )
    dataset: str = _opt("shapes", "dataset name: shapes | digits | folder (options as data.KEY=VALUE)")
    dataset_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "options for get_dataset; set them as data.KEY=VALUE"}
    )
    train_examples: int = _opt(4096, "distinct training pairs (first N of the train split); 0: all")
    tokenizer: str = _opt("byte", "byte | bpe (trained on the captions, model.vocab_size entries) | PATH")
    autoencoder: str = _opt(
        "auto",
        "auto (train a quick VAE, or VQ for family=discrete, or reuse the cached one) | pool (no training; "
        "smoke runs; transfusion only) | PATH",
    )
    autoencoder_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "AutoencoderConfig fields of the quick VAE / VQ; set as ae.KEY=VALUE"},
    )
    cache_dir: str = _opt(
        "", "autoencoder/latent cache; empty: $TRANSFUSION_CACHE or ~/.cache/transfusion-bench; none: off"
    )
    caption_first_prob: float = _opt(0.8, "probability that an example is caption-first (paper: 0.8)")
    progress: bool = _opt(True, "tqdm progress bar")
    threads: int = _opt(
        0, "CPU threads per process; 0: auto (OMP_NUM_THREADS if set, else the cores not busy, see docs)"
    )
    find_unused_parameters: bool = _opt(False, "DDP option (not needed: every row holds an image)")
    parallel: str = _opt(
        "ddp",
        "data parallel wrapper under torchrun: ddp | fsdp (FSDP2, fully_shard per transformer block, then "
        "the root) | auto (fsdp above 300M parameters, else ddp) | none (single process only)",
    )

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.dataset_options = dict(self.dataset_options)
        self.autoencoder_options = dict(self.autoencoder_options)
        _check_types(self, "train")

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"train.{name} = {getattr(self, name)!r} {why}")

        for name in ("steps", "batch_rows", "seq_len", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("warmup_steps", "ckpt_every", "seed", "train_examples", "threads"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a positive finite number")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "must be a finite number >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise bad("eps", "must be a positive finite number")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise bad("grad_clip", "must be a finite number >= 0 (0 disables clipping)")
        if not 0.0 <= self.caption_first_prob <= 1.0:
            raise bad("caption_first_prob", "must be in [0, 1]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise bad("precision", "must be one of 'auto', 'fp32', 'bf16'")
        if self.parallel not in PARALLEL_MODES:
            raise bad("parallel", "must be one of " + ", ".join(repr(m) for m in PARALLEL_MODES))
        try:
            if self.device != "auto":
                torch.device(self.device)
        except (RuntimeError, ValueError) as e:
            raise bad("device", f"is not a device ({e})") from None
        for name in ("family", "dataset", "tokenizer", "autoencoder", "attention"):
            if not getattr(self, name):
                raise bad(name, "must not be empty")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ConfigError(f"train.{key}: unknown key; valid train keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _check_types(obj: Any, prefix: str) -> None:
    """Raise ConfigError naming ``prefix.field`` for any field whose value has the wrong type."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            raise ConfigError(
                f"{prefix}.{f.name} = {value!r} has the wrong type; expected {_type_name(hints[f.name])}"
            )


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# ====================================================================== model families
@dataclass
class LossPart:
    """One loss term of a step on this rank.

    ``value`` is the mean over this rank's ``count`` items (tokens, images); the global batch has
    ``total`` of them. The step objective is ``sum(weight * global mean)``.
    """

    name: str
    value: torch.Tensor
    count: int
    total: int
    weight: float = 1.0


@dataclass
class TrainingData:
    """What a family's data preparation hands the loop."""

    stream: Any  # iterator of global batches with peek(), state_dict() and load_state_dict()
    model_cfg: ModelConfig  # possibly updated (e.g. latent shape from a loaded autoencoder)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in config.json["data"]


@dataclass
class RunContext:
    """Handed to a family's ``prepare_data``."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    out_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    resume: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class ModelFamily(ABC):
    """How one model family trains: its data, its model, its loss parts."""

    name: str = ""
    autoencoder_kind: str = "vae"  # the kind of quick autoencoder train.autoencoder = auto trains

    def check(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:  # noqa: B027
        """Cheap family-specific configuration checks (raise ConfigError); runs before any work."""

    @abstractmethod
    def prepare_data(self, ctx: RunContext) -> TrainingData: ...

    @abstractmethod
    def build_model(self, model_cfg: ModelConfig) -> nn.Module: ...

    @abstractmethod
    def loss_parts(
        self,
        model: nn.Module,
        batch: Any,
        rows: tuple[int, int],
        generator: torch.Generator,
        device: torch.device,
    ) -> list[LossPart]:
        """Forward pass on rows ``rows`` of the global ``batch``; random draws from ``generator`` must be
        made for the whole global batch (then sliced) so the result does not depend on the rank split."""

    def analytic_flops(self, model_cfg: ModelConfig, batch: Any) -> dict[str, float] | None:
        """Analytic FLOPs of one step on a global batch (recorded in config.json), if known."""
        return None


FAMILIES: dict[str, ModelFamily] = {}
# Families defined in other modules, imported on first use (their module calls ``register_family``).
# The two built-in families ("transfusion", "discrete") are registered in this module.
FAMILY_MODULES: dict[str, str] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if not family.name:
        raise ValueError("a model family needs a name")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES and name in FAMILY_MODULES:
        import importlib

        try:
            importlib.import_module(FAMILY_MODULES[name])
        except ImportError as e:
            raise ConfigError(f"train.family = {name!r}: cannot import {FAMILY_MODULES[name]} ({e})") from e
        if name not in FAMILIES:
            raise ConfigError(
                f"train.family = {name!r}: {FAMILY_MODULES[name]} registers no model family of that name "
                "(it must call transfusion.train.register_family)"
            )
    if name not in FAMILIES:
        raise ConfigError(
            f"train.family = {name!r} is not a registered model family; known: {sorted(FAMILIES)}"
        )
    return FAMILIES[name]


# ====================================================================== data preparation (shared)
def default_cache_dir() -> Path:
    return Path(os.environ.get("TRANSFUSION_CACHE") or Path.home() / ".cache" / "transfusion-bench")


def resolve_cache_dir(train_cfg: TrainConfig) -> Path | None:
    if train_cfg.cache_dir == "none":
        return None
    return Path(train_cfg.cache_dir) if train_cfg.cache_dir else default_cache_dir()


def build_dataset(train_cfg: TrainConfig, split: str = "train"):
    """The training dataset: the first ``train_examples`` items of ``split`` (errors name data.* keys)."""
    from torch.utils.data import Subset

    from transfusion.data import get_dataset

    opts = dict(train_cfg.dataset_options)
    n = train_cfg.train_examples
    if train_cfg.dataset == "shapes" and n and "length" not in opts:
        opts["length"] = n  # shapes is procedural: ask for exactly n items
    try:
        ds = get_dataset(train_cfg.dataset, split, **opts)
    except (ValueError, ImportError) as e:
        msg = str(e)
        key = msg.split(":", 1)[0]
        raise ConfigError(
            f"data.{msg}" if key.isidentifier() and key != "name" else f"train.dataset: {msg}"
        ) from e
    if n and len(ds) > n:
        ds = Subset(ds, range(n))
    return ds


def dataset_image_size(dataset) -> tuple[int, int]:
    img = dataset[0]["image"]
    return int(img.shape[-2]), int(img.shape[-1])


def read_captions_and_images(dataset, need_images: bool) -> tuple[list[str], torch.Tensor | None]:
    captions: list[str] = []
    images: list[torch.Tensor] = []
    for i in range(len(dataset)):
        item = dataset[i]
        captions.append(item["caption"])
        if need_images:
            images.append(item["image"])
    return captions, (torch.stack(images) if need_images else None)


def prepare_tokenizer(train_cfg: TrainConfig, model_cfg: ModelConfig, captions: list[str], ctx: RunContext):
    """The text tokenizer; saved to ``out/tokenizer.json`` (reloaded from there on resume)."""
    from transfusion.data import get_tokenizer, load_tokenizer

    saved = ctx.out_dir / "tokenizer.json"
    spec = train_cfg.tokenizer
    if ctx.resume and saved.exists():
        tok = load_tokenizer(saved)
    elif spec in ("byte", "bpe"):
        tok = get_tokenizer(spec, corpus=captions, vocab_size=model_cfg.vocab_size)
    else:
        tok = load_tokenizer(spec)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size = {model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tok.vocab_size}, train.tokenizer = {spec!r})"
        )
    if ctx.is_main and not (ctx.resume and saved.exists()):
        tmp = saved.with_name(".tokenizer.json.tmp")
        tok.save(tmp)
        os.replace(tmp, saved)
    return tok


def special_tokens(tok) -> SpecialTokens:
    return SpecialTokens(
        pad=tok.pad_id, bos=tok.bos_id, eos=tok.eos_id, boi=tok.boi_id, eoi=tok.eoi_id, image=tok.pad_id
    )


def quick_autoencoder_config(
    model_cfg: ModelConfig, image_size: int, options: dict[str, Any], kind: str = "vae"
):
    """The ``AutoencoderConfig`` of the quick autoencoder (``kind`` "vae" for Transfusion, "vq" for the
    discrete baseline): the autoencoder defaults, sized so that it maps ``image_size`` images to the model's
    latent shape, then the ``ae.*`` options. A VQ's codebook is ``model.codebook_size`` when that is set
    (``ae.codebook_size`` may repeat it, not contradict it), else ``ae.codebook_size`` or the default."""
    from transfusion.autoencoders import AutoencoderConfig

    names = {f.name for f in fields(AutoencoderConfig)}
    for key in options:
        if key not in names:
            raise ConfigError(f"ae.{key}: unknown autoencoder option; valid: {sorted(names)}")
    if options.get("kind", kind) != kind:
        raise ConfigError(
            f"ae.kind = {options['kind']!r}: this model family trains a {kind!r} autoencoder "
            "(the discrete family needs VQ codes, Transfusion continuous VAE latents)"
        )
    cfg = {
        "kind": kind,
        "image_size": image_size,
        "downsample": image_size // model_cfg.latent_size,
        "latent_channels": model_cfg.latent_channels,
        **options,
    }
    if kind == "vq" and model_cfg.codebook_size:
        if options.get("codebook_size", model_cfg.codebook_size) != model_cfg.codebook_size:
            raise ConfigError(
                f"ae.codebook_size = {options['codebook_size']!r} differs from model.codebook_size = "
                f"{model_cfg.codebook_size}; set one of them (model.codebook_size = 0 takes the VQ's)"
            )
        cfg["codebook_size"] = model_cfg.codebook_size
    try:
        return AutoencoderConfig(**cfg)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("AutoencoderConfig.", "ae.")
        raise ConfigError(msg if msg.startswith("ae.") else f"ae: {msg}") from None


def _ae_config_dict(ae_cfg) -> dict[str, Any]:
    if dataclasses.is_dataclass(ae_cfg):
        return json.loads(json.dumps(dataclasses.asdict(ae_cfg), default=str))
    return {"repr": repr(ae_cfg)}


def prepare_autoencoder(
    ctx: RunContext, dataset, image_size: int, kind: str = "vae"
) -> tuple[Path, dict[str, Any]]:
    """The folder of the run's autoencoder (``TrainConfig.autoencoder`` "auto" or a PATH) and its info.

    ``auto`` trains a quick autoencoder of ``kind`` into ``out/autoencoder`` (rank 0; others wait) or copies
    the one cached under ``cache_dir/autoencoders/<hash of its config and the data>``; ``PATH`` is used as
    given.
    """
    tc, mc = ctx.train_cfg, ctx.model_cfg
    spec = tc.autoencoder
    cache = resolve_cache_dir(tc)
    run_ae = ctx.out_dir / "autoencoder"
    if spec == "auto":
        from transfusion import autoencoders as aem

        ae_cfg = quick_autoencoder_config(mc, image_size, tc.autoencoder_options, kind=kind)
        key_src = {
            "autoencoder": _ae_config_dict(ae_cfg),
            "dataset": tc.dataset,
            "dataset_options": tc.dataset_options,
            "train_examples": tc.train_examples,
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
        cached = cache / "autoencoders" / key if cache else None
        if ctx.is_main and not run_ae.exists():
            if cached is not None and cached.exists():
                _copy_dir(cached, run_ae)
                print(f"[train] reusing the cached autoencoder {cached}", file=sys.stderr)
            else:
                print(f"[train] training a quick autoencoder ({kind}) into {run_ae}", file=sys.stderr)
                t0 = time.time()
                partial_dir = run_ae.with_name("autoencoder.partial")
                shutil.rmtree(partial_dir, ignore_errors=True)
                aem.train_autoencoder(ae_cfg, dataset, partial_dir, ctx.device, progress=tc.progress)
                os.replace(partial_dir, run_ae)
                print(f"[train] autoencoder trained in {time.time() - t0:.1f}s", file=sys.stderr)
                if cached is not None:
                    _copy_dir(run_ae, cached)
        ctx.barrier()
        ae_path = run_ae
        info: dict[str, Any] = {
            "source": "auto",
            "cache_key": key,
            "cached_at": str(cached) if cached else None,
        }
    else:
        ae_path = Path(spec)
        info = {"source": "path"}
    return ae_path, info


def _latent_cache_dir(ctx: RunContext) -> Path:
    cache = resolve_cache_dir(ctx.train_cfg)
    return (cache / "latents") if cache else (ctx.out_dir / "latents")


def prepare_latents(
    ctx: RunContext, dataset, images: torch.Tensor | None, image_size: int
) -> tuple[torch.Tensor, ModelConfig, dict[str, Any]]:
    """Diffusion-ready (scaled) latents of every example, from ``TrainConfig.autoencoder``.

    ``auto`` / ``PATH``: a VAE from ``prepare_autoencoder`` (with a PATH the model's latent shape is taken
    from it); ``pool`` uses ``pool_latents``.
    """
    tc, mc = ctx.train_cfg, ctx.model_cfg
    spec = tc.autoencoder
    if spec == "pool":
        assert images is not None
        lat = pool_latents(images, mc.latent_channels, mc.latent_size, seed=tc.seed)
        return lat, mc, {"source": "pool", "latent_shape": list(lat.shape[1:])}

    from transfusion import autoencoders as aem

    ae_path, info = prepare_autoencoder(ctx, dataset, image_size, kind="vae")
    ae = aem.load_autoencoder(ae_path)
    if ae.kind != "vae":
        raise ConfigError(
            f"train.autoencoder = {spec!r} is a {ae.kind!r} autoencoder; Transfusion needs a VAE's "
            "continuous latents (a VQ autoencoder is for --model discrete)"
        )
    C, h, w = (int(x) for x in ae.latent_shape)
    if h != w:
        raise ConfigError(f"train.autoencoder: latents are {h}x{w}; the model needs square latents")
    if (C, h) != (mc.latent_channels, mc.latent_size):
        if spec == "auto":
            raise ConfigError(
                f"train.autoencoder: the quick autoencoder gives latents {(C, h, w)}; the model expects "
                f"({mc.latent_channels}, {mc.latent_size}, {mc.latent_size}); check ae.* options"
            )
        try:
            mc = mc.replace(latent_channels=C, latent_size=h)
        except ValueError as e:
            raise ConfigError(f"{e} (latent shape {(C, h, w)} from train.autoencoder = {spec!r})") from e
    lat_dir = _latent_cache_dir(ctx)
    if not ctx.is_main:
        ctx.barrier()  # rank 0 computes (and caches) the latents first
    ae = ae.to(ctx.device)
    # ``encode`` (hence the cache) returns latents already multiplied by the VAE's scaling factor.
    lat = aem.cached_latents(ae, dataset, lat_dir, progress=tc.progress and ctx.is_main).float()
    if ctx.is_main:
        ctx.barrier()
    scale = float(getattr(ae, "scaling_factor", 1.0))
    info.update(path=str(ae_path), latent_shape=[C, h, w], scaling_factor=scale)
    return lat, mc, info


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy a directory so that ``dst`` appears complete or not at all."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    try:
        os.replace(tmp, dst)
    except OSError:  # someone else made it first
        shutil.rmtree(tmp, ignore_errors=True)


# ====================================================================== shared by the families
def stream_config(tc: TrainConfig, mc: ModelConfig, patch_size: int) -> StreamConfig:
    """The data recipe of a run (the same for every family; ``patch_size``: positions per image side)."""
    return StreamConfig(
        seq_len=tc.seq_len,
        batch_rows=tc.batch_rows,
        patch_size=patch_size,
        caption_first_prob=tc.caption_first_prob,
        caption_dropout=mc.caption_dropout,
        seed=tc.seed,
    )


def data_info(tc: TrainConfig, stream, image_size, tok, caption_ids, lat_info, t0: float) -> dict[str, Any]:
    """What config.json records under "data"."""
    return {
        "dataset": tc.dataset,
        "dataset_options": tc.dataset_options,
        "examples": len(stream),
        "image_size": list(image_size),
        "tokenizer": {"spec": tc.tokenizer, "vocab_size": tok.vocab_size, "path": "tokenizer.json"},
        "mean_caption_tokens": sum(map(len, caption_ids)) / len(caption_ids),
        "latents": lat_info,
        "prep_seconds": round(time.time() - t0, 2),
    }


def _check_seq_len(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    if train_cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"train.seq_len = {train_cfg.seq_len} exceeds model.max_seq_len = {model_cfg.max_seq_len}"
        )


# ====================================================================== the Transfusion family
class TransfusionFamily(ModelFamily):
    name = "transfusion"

    def check(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
        _check_seq_len(model_cfg, train_cfg)

    def prepare_data(self, ctx: RunContext) -> TrainingData:
        tc, mc = ctx.train_cfg, ctx.model_cfg
        dataset = build_dataset(tc)
        H, W = dataset_image_size(dataset)
        t0 = time.time()
        captions, images = read_captions_and_images(dataset, need_images=tc.autoencoder == "pool")
        tok = prepare_tokenizer(tc, mc, captions, ctx)
        caption_ids = [tok.encode(c) for c in captions]
        stream_cfg = stream_config(tc, mc, patch_size=mc.patch_size)
        # Check that documents fit the rows before any expensive work (latent shape from the config).
        n_patch = mc.patches_per_image
        longest = max(len(c) for c in caption_ids) + 4 + n_patch
        if longest > tc.seq_len:
            raise ConfigError(
                f"train.seq_len = {tc.seq_len} is shorter than the longest document ({longest} tokens: "
                f"caption + {n_patch} image patches + 4 special tokens)"
            )
        latents, mc, lat_info = prepare_latents(ctx, dataset, images, H)
        stream = MixedModalStream(caption_ids, latents, stream_cfg, special_tokens(tok), mc.vocab_size)
        info = data_info(tc, stream, (H, W), tok, caption_ids, lat_info, t0)
        return TrainingData(stream=stream, model_cfg=mc, info=info)

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        from transfusion.transfusion_model import Transfusion

        return Transfusion(model_cfg)

    def loss_parts(self, model, batch: PackedBatch, rows, generator, device) -> list[LossPart]:
        cfg: ModelConfig = _unwrap(model).cfg
        a, b = rows
        N = batch.num_images
        timesteps = sample_timesteps(
            N,
            image_first=batch.image_first,
            num_timesteps=cfg.num_train_timesteps,
            noise_limit_t=cfg.noise_limit_t,
            generator=generator,
        )
        noise = torch.randn(batch.latents.shape, generator=generator)
        i0, i1 = image_range(batch, a, b)
        local = batch if (a, b) == (0, batch.batch_size) else slice_rows(batch, a, b)
        out = model(local.to(device), noise=noise[i0:i1].to(device), timesteps=timesteps[i0:i1].to(device))
        return [
            LossPart("lm", out.lm_loss, out.n_lm_tokens, int(batch.lm_mask.sum()), 1.0),
            LossPart("diffusion", out.diffusion_loss, i1 - i0, N, float(cfg.diffusion_lambda)),
        ]

    def analytic_flops(self, model_cfg: ModelConfig, batch: PackedBatch) -> dict[str, float]:
        return analytic_step_flops(model_cfg, batch).as_dict()


register_family(TransfusionFamily())


# ====================================================================== the discrete (Chameleon) family
def prepare_codes(
    ctx: RunContext, dataset, image_size: int
) -> tuple[torch.Tensor, ModelConfig, dict[str, Any]]:
    """VQ codes (int64, (n, h, w)) of every example, from ``TrainConfig.autoencoder`` ("auto": a quick VQ
    trained and cached like the quick VAE; PATH: a saved VQ autoencoder). Returns the model config with
    ``codebook_size`` (and, for a PATH, ``latent_size`` = the code grid side) taken from the autoencoder."""
    from transfusion import autoencoders as aem

    tc, mc = ctx.train_cfg, ctx.model_cfg
    spec = tc.autoencoder
    ae_path, info = prepare_autoencoder(ctx, dataset, image_size, kind="vq")
    ae = aem.load_autoencoder(ae_path)
    if ae.kind != "vq":
        raise ConfigError(
            f"train.autoencoder = {spec!r} is a {ae.kind!r} autoencoder; the discrete family needs a VQ "
            "autoencoder (transfusion autoencoder train --kind vq)"
        )
    h, w = (int(x) for x in ae.code_shape)
    K = int(ae.codebook_size)
    if h != w:
        raise ConfigError(f"train.autoencoder: codes are {h}x{w}; the model needs square code grids")
    if mc.codebook_size and mc.codebook_size != K:
        raise ConfigError(
            f"model.codebook_size = {mc.codebook_size} but the VQ autoencoder ({spec!r}) has {K} codes; "
            "leave model.codebook_size = 0 to take the autoencoder's"
        )
    if h != mc.latent_size and spec == "auto":
        raise ConfigError(
            f"train.autoencoder: the quick VQ gives {h}x{w} codes; the model expects "
            f"{mc.latent_size}x{mc.latent_size}; check ae.* options"
        )
    try:
        mc = mc.replace(codebook_size=K, latent_size=h)
    except ValueError as e:
        raise ConfigError(f"{e} (a {h}x{w} code grid from train.autoencoder = {spec!r})") from e
    if not ctx.is_main:
        ctx.barrier()  # rank 0 computes (and caches) the codes first
    ae = ae.to(ctx.device)
    codes = aem.cached_latents(ae, dataset, _latent_cache_dir(ctx), progress=tc.progress and ctx.is_main)
    if ctx.is_main:
        ctx.barrier()
    info.update(path=str(ae_path), kind="vq", code_shape=[h, w], codebook_size=K)
    return codes.long(), mc, info


class DiscreteFamily(ModelFamily):
    """The Chameleon-style baseline: images as VQ codes in one causal LM (see the module docstring)."""

    name = "discrete"
    autoencoder_kind = "vq"

    def check(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
        _check_seq_len(model_cfg, train_cfg)
        spec = train_cfg.autoencoder
        if spec == "pool":
            raise ConfigError(
                "train.autoencoder = 'pool' gives continuous latents; the discrete family needs VQ codes "
                "(use 'auto' to train a quick VQ, or the PATH of a saved VQ autoencoder)"
            )
        if spec != "auto" and (Path(spec) / "autoencoder.json").is_file():
            try:
                from transfusion.autoencoders import read_metadata

                meta = read_metadata(spec)
            except (ImportError, OSError, ValueError):
                return  # reported when the autoencoder is loaded
            if meta.get("kind") != "vq":
                raise ConfigError(
                    f"train.autoencoder = {spec!r} is a {meta.get('kind')!r} autoencoder; the discrete "
                    "family needs a VQ autoencoder (transfusion autoencoder train --kind vq)"
                )
            K = meta.get("codebook_size")
            if model_cfg.codebook_size and K != model_cfg.codebook_size:
                raise ConfigError(
                    f"model.codebook_size = {model_cfg.codebook_size} but the VQ autoencoder {spec!r} has "
                    f"{K} codes; leave model.codebook_size = 0 to take the autoencoder's"
                )

    def prepare_data(self, ctx: RunContext) -> TrainingData:
        from transfusion.baseline import DiscreteStream, vocab_for

        tc, mc = ctx.train_cfg, ctx.model_cfg
        dataset = build_dataset(tc)
        H, W = dataset_image_size(dataset)
        t0 = time.time()
        captions, _ = read_captions_and_images(dataset, need_images=False)
        tok = prepare_tokenizer(tc, mc, captions, ctx)
        caption_ids = [tok.encode(c) for c in captions]
        if tc.autoencoder == "auto":  # before any expensive work (a PATH's code grid is known once loaded)
            _check_documents_fit(tc, caption_ids, mc.latent_size**2)
        codes, mc, lat_info = prepare_codes(ctx, dataset, H)
        _check_documents_fit(tc, caption_ids, int(codes.shape[1] * codes.shape[2]))
        stream = DiscreteStream(
            caption_ids, codes, stream_config(tc, mc, patch_size=1), vocab_for(mc), special_tokens(tok)
        )
        info = data_info(tc, stream, (H, W), tok, caption_ids, lat_info, t0)
        return TrainingData(stream=stream, model_cfg=mc, info=info)

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        from transfusion.baseline import DiscreteLM

        return DiscreteLM(model_cfg)

    def loss_parts(self, model, batch: PackedBatch, rows, generator, device) -> list[LossPart]:
        from transfusion.baseline import discrete_target_counts

        a, b = rows
        local = batch if (a, b) == (0, batch.batch_size) else slice_rows(batch, a, b)
        out = model(local.to(device))
        n_text, n_image = discrete_target_counts(batch, _unwrap(model).vocab)
        return [
            LossPart("lm", out.lm_loss, out.n_lm_tokens, int(batch.lm_mask.sum()), 1.0),
            # Logged only (weight 0): the same columns as Transfusion, and the LM loss split by target kind.
            LossPart("diffusion", out.diffusion_loss, 0, 0, 0.0),
            LossPart("text", out.text_loss, out.n_text_tokens, n_text, 0.0),
            LossPart("image", out.image_loss, out.n_image_tokens, n_image, 0.0),
        ]

    def analytic_flops(self, model_cfg: ModelConfig, batch: PackedBatch) -> dict[str, float]:
        from transfusion.baseline import discrete_analytic_step_flops

        return discrete_analytic_step_flops(model_cfg, batch).as_dict()


def _check_documents_fit(tc: TrainConfig, caption_ids: list[list[int]], codes_per_image: int) -> None:
    longest = max(len(c) for c in caption_ids) + 4 + codes_per_image
    if longest > tc.seq_len:
        raise ConfigError(
            f"train.seq_len = {tc.seq_len} is shorter than the longest document ({longest} tokens: caption + "
            f"{codes_per_image} image codes + 4 special tokens); raise train.seq_len (and model.max_seq_len) "
            "or use smaller code grids (model.latent_size)"
        )


register_family(DiscreteFamily())


# ====================================================================== checks before any work
def resolve_device(train_cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    if train_cfg.device == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        name = train_cfg.device
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {train_cfg.device!r} but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def resolve_attention(train_cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> ModelConfig:
    """The model config with the attention backend the run uses (checked to run here, with gradients)."""
    from transfusion.attention import registry

    dtype = torch.bfloat16 if _use_bf16(train_cfg, device) else torch.float32
    name = train_cfg.attention
    if name == "auto":
        name = model_cfg.attention
        if device.type == "cuda" and "flex" in registry.available_backends(
            device, dtype, True, model_cfg.head_dim
        ):
            name = "flex"
    key = "train.attention" if train_cfg.attention != "auto" else "model.attention"
    try:
        backend = registry.get_backend(name)
    except ValueError as e:
        raise ConfigError(f"{key} = {name!r}: {e}") from None
    why = backend.why_not(device.type, dtype, True, model_cfg.head_dim)
    if why is not None:
        ok = registry.available_backends(device, dtype, True, model_cfg.head_dim)
        raise ConfigError(f"{key} = {name!r} cannot train here: it {why}; usable: {ok}")
    return model_cfg if name == model_cfg.attention else model_cfg.replace(attention=name)


def _use_bf16(train_cfg: TrainConfig, device: torch.device) -> bool:
    return train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")


def check_config(model_cfg: ModelConfig, train_cfg: TrainConfig, world_size: int = 1) -> ModelConfig:
    """Every cheap check of a run's configuration; raises ConfigError naming the key. Returns the model
    config with the attention backend resolved for the device."""
    family = get_family(train_cfg.family)
    device = resolve_device(train_cfg)
    model_cfg = resolve_attention(train_cfg, model_cfg, device)
    if train_cfg.parallel == "none" and world_size > 1:
        raise ConfigError(
            f"train.parallel = 'none' trains one process, but {world_size} were launched; use 'ddp', "
            "'fsdp' or 'auto' under torchrun"
        )
    if train_cfg.batch_rows % world_size:
        raise ConfigError(
            f"train.batch_rows = {train_cfg.batch_rows} is not divisible by the number of data-parallel "
            f"ranks ({world_size})"
        )
    family.check(model_cfg, train_cfg)
    ds = build_dataset(train_cfg)
    H, W = dataset_image_size(ds)
    spec = train_cfg.autoencoder
    if spec in ("auto", "pool"):
        s = model_cfg.latent_size
        if H != W or H % s:
            raise ConfigError(
                f"model.latent_size = {s} does not divide the dataset's image size {H}x{W} "
                f"(train.autoencoder = {spec!r} maps images to latent_size x latent_size)"
            )
        if spec == "auto" and (H // s) & (H // s - 1):
            raise ConfigError(
                f"model.latent_size = {s}: image size {H} / latent size must be a power of two for the VAE"
            )
        if spec == "auto":
            try:
                import transfusion.autoencoders  # noqa: F401
            except ImportError as e:
                raise ConfigError(
                    f"train.autoencoder = 'auto' needs transfusion.autoencoders ({e}); use autoencoder=pool "
                    "or a PATH"
                ) from e
            quick_autoencoder_config(
                model_cfg, H, train_cfg.autoencoder_options, kind=family.autoencoder_kind
            )
    elif not Path(spec).exists():
        raise ConfigError(f"train.autoencoder = {spec!r}: no such file or directory (or use 'auto' / 'pool')")
    tok = train_cfg.tokenizer
    if tok == "byte":
        from transfusion.data import ByteTokenizer

        if ByteTokenizer().vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {model_cfg.vocab_size} is smaller than the byte tokenizer's "
                f"{ByteTokenizer().vocab_size}"
            )
    elif tok == "bpe":
        try:
            import tokenizers  # noqa: F401
        except ImportError as e:
            raise ConfigError("train.tokenizer = 'bpe' needs the 'tokenizers' package") from e
    elif not Path(tok).is_file():
        raise ConfigError(f"train.tokenizer = {tok!r}: not 'byte', 'bpe' or an existing tokenizer file")
    return model_cfg


# ====================================================================== CPU threads
def resolve_threads(requested: int = 0, procs_per_machine: int = 1) -> int:
    """CPU threads for this process.

    ``requested > 0`` is used as is. ``0`` (auto): torch's current setting when ``OMP_NUM_THREADS`` is set,
    else the cores not already busy (cores minus the 1-minute load average, rounded, at least 1) divided
    among this machine's processes. Why: OpenMP threads spin while they wait for each other, so asking
    for more threads than there are free cores makes small-tensor CPU training several times slower (on
    a shared 2-core machine we measured 10-20x), while using fewer costs at most the parallel speed-up.
    """
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    free = max(1, min(cores, round(cores - busy)))
    return max(1, free // max(1, procs_per_machine))


# ====================================================================== distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False


def init_distributed(train_cfg: TrainConfig) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        dev = resolve_device(train_cfg, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns)


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP (fully_shard wraps in place: nothing to unwrap)
    return getattr(model, "_orig_mod", model)  # torch.compile


def resolve_parallel(train_cfg: TrainConfig, world_size: int, n_params: int) -> str:
    """The wrapper a run uses: "none" on one process, else ``train.parallel`` with "auto" resolved by
    the parameter count (fsdp above ``FSDP_AUTO_THRESHOLD``)."""
    if world_size <= 1:
        return "none"
    if train_cfg.parallel == "auto":
        return "fsdp" if n_params > FSDP_AUTO_THRESHOLD else "ddp"
    return train_cfg.parallel


def apply_fsdp(model: nn.Module, device: torch.device, world_size: int) -> int:
    """FSDP2 in place: ``fully_shard`` each transformer ``Block`` (its own all-gather / reduce-scatter
    unit), then the root (embeddings, adapters, heads, final norm). Returns the number of blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from transfusion.model import Block

    # Block returns (x, new_kv); the KV tensors are views, unused in training and never modified in
    # place, so FSDP2's warning about in-place ops on a view output does not apply here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    mesh = init_device_mesh(device.type, (world_size,))
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _checkpoint_payload(model: nn.Module, opt: torch.optim.Optimizer, parallel: str):
    """(weights or None, optimizer state, optimizer format) to save. Under FSDP every rank must call this
    (the gathers are collective); rank 0 gets the full CPU tensors, the others empty dicts."""
    if parallel != "fsdp":
        return None, opt.state_dict(), "index"
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _full_state_options()
    weights = get_model_state_dict(model, options=opts)
    return weights, get_optimizer_state_dict(model, opt, options=opts), "fqn"


def _optimizer_state_by_name(model: nn.Module, state: dict[str, Any], cfg: TrainConfig, device) -> dict:
    """A checkpoint's optimizer state keyed by parameter name ("fqn" format), converting the index-keyed
    ``opt.state_dict()`` of a DDP / single-process run through a throwaway optimizer on the plain model."""
    if state.get("optimizer_format") == "fqn":
        return state["optimizer"]
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tmp = build_optimizer(model, cfg, device)
    tmp.load_state_dict(state["optimizer"])
    by_name = get_optimizer_state_dict(model, tmp)
    del tmp
    return by_name


def _load_optimizer_state(
    model: nn.Module, opt: torch.optim.Optimizer, optim_state: dict, fqn: bool, sharded: bool
) -> None:
    """Load index-keyed (``opt.state_dict()``) or name-keyed ("fqn") optimizer state; under FSDP
    (``sharded``) the full name-keyed state is split into this rank's shards."""
    if not fqn:
        opt.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True) if sharded else None
    set_optimizer_state_dict(model, opt, optim_state, options=options)


def _grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a (replicated) DTensor when the gradients are DTensors (FSDP2)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ====================================================================== optimizer and schedule
def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor for the step with 0-based index ``step``: linear warmup to 1 over ``warmup_steps``
    steps, then cosine decay reaching ``min_ratio`` after ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda" or None
    )


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(
        lr_multiplier, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps, min_ratio=cfg.min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


# ====================================================================== checkpoints and metrics
CKPT_DIR = "checkpoints"
LATEST = "latest.json"


def latest_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``latest.json`` record ({"step", "model", "state"}) of a run directory, or None."""
    path = Path(out_dir) / CKPT_DIR / LATEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint; ``weights`` (a full state dict, e.g. gathered from FSDP shards) replaces
    ``model.state_dict()`` when given."""
    from safetensors.torch import save_file

    ckpt = out_dir / CKPT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    if weights is None:
        weights = _unwrap(model).state_dict()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    tmp = ckpt / f".{name}.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, ckpt / f"{name}.safetensors")
    tmp = ckpt / f".{name}.state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt / f"{name}.state.pt")
    atomic_write_json(
        ckpt / LATEST, {"step": step, "model": f"{name}.safetensors", "state": f"{name}.state.pt"}
    )
    steps = sorted(int(p.name[5:13]) for p in ckpt.glob("step_*.safetensors"))
    for old in steps[:-keep]:
        if old != step:
            for suffix in (".safetensors", ".state.pt"):
                (ckpt / f"step_{old:08d}{suffix}").unlink(missing_ok=True)
    return ckpt / name


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a torn last line, from a killed run, is skipped)."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ====================================================================== the loop
@dataclass
class TrainResult:
    out_dir: Path
    step: int
    last_metrics: dict[str, Any]
    flops_per_step: float
    model: nn.Module


_RESUME_MAY_CHANGE = {
    "steps", "log_every", "ckpt_every", "keep_checkpoints", "device", "progress", "compile", "threads",
    "parallel",
}  # fmt: skip


def _compare_resumed(stored: dict[str, Any], model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    diffs = []
    for key, value in train_cfg.to_dict().items():
        if key not in _RESUME_MAY_CHANGE and stored["train"].get(key) != value:
            diffs.append(f"train.{key}: {stored['train'].get(key)!r} -> {value!r}")
    stored_model = stored.get("model_requested", stored["model"])
    for key, value in model_cfg.to_dict().items():
        if stored_model.get(key) != value:
            diffs.append(f"model.{key}: {stored_model.get(key)!r} -> {value!r}")
    if diffs:
        raise ConfigError(
            "--resume: the configuration differs from the run's config.json (" + "; ".join(diffs) + "); only "
            f"{sorted(_RESUME_MAY_CHANGE)} may change"
        )


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    preset: str | None = None,
    data: TrainingData | None = None,
    step_hook: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train and write ``out_dir`` (see the module docstring).

    Args:
        model_cfg, train_cfg: the run's configuration (checked again here).
        resume: continue from ``out_dir/checkpoints/latest.json`` (start fresh when there is none).
        preset: name recorded in config.json.
        data: prepared data to use instead of the family's ``prepare_data`` (tests, benchmarks).
        step_hook: called on every rank after each step's losses are known, with (step, losses).
    """
    out = Path(out_dir)
    dinfo = init_distributed(train_cfg)
    threads_before = torch.get_num_threads()
    try:
        return _train(model_cfg, train_cfg, out, resume, preset, data, step_hook, dinfo)
    finally:
        torch.set_num_threads(threads_before)
        if dinfo.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(model_cfg, train_cfg, out, resume, preset, data, step_hook, dinfo: DistInfo) -> TrainResult:
    rank, world = dinfo.rank, dinfo.world_size
    is_main = rank == 0
    family = get_family(train_cfg.family)
    device = resolve_device(train_cfg, dinfo.local_rank)
    model_cfg = check_config(model_cfg, train_cfg, world)

    latest = latest_checkpoint(out)
    if resume and latest is None:
        if is_main:
            print(f"[train] --resume: no checkpoint in {out}; starting from scratch", file=sys.stderr)
        resume = False
    if not resume and latest is not None:
        raise ConfigError(
            f"--out {out} already holds a run (checkpoint at step {latest['step']}); pass --resume to "
            "continue it, or choose another directory"
        )
    if resume and not (out / "config.json").exists():
        raise ConfigError(f"--resume: {out / 'config.json'} is missing; cannot check the run's configuration")
    stored = json.loads((out / "config.json").read_text()) if resume else None
    if stored is not None:
        _compare_resumed(stored, model_cfg, train_cfg)
    requested_model = model_cfg.to_dict()
    # CPU threads: a resumed run keeps the thread count of the run it continues (same summation order).
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    threads = resolve_threads(train_cfg.threads, local_procs)
    if stored is not None and not train_cfg.threads and not os.environ.get("OMP_NUM_THREADS"):
        threads = int(stored.get("threads") or threads)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()

    ctx = RunContext(model_cfg, train_cfg, out, device, rank, world, resume)
    if data is None:
        data = family.prepare_data(ctx)
    model_cfg = data.model_cfg
    stream = data.stream

    torch.manual_seed(train_cfg.seed)
    raw = family.build_model(model_cfg).to(device)
    parallel = resolve_parallel(train_cfg, world, sum(p.numel() for p in raw.parameters()))
    metrics_path = out / "metrics.jsonl"

    step = 0
    tokens_seen = 0
    wall_offset = 0.0
    flops_per_step: float | None = None
    accum: dict[str, float] = {}
    state: dict[str, Any] = {}
    optim_state, optim_fqn = None, False
    if resume:
        from safetensors.torch import load_file

        assert latest is not None
        ckdir = out / CKPT_DIR
        # Full weights into the plain model on every rank, before any sharding.
        raw.load_state_dict(load_file(str(ckdir / latest["model"]), device=str(device)))
        state = torch.load(ckdir / latest["state"], map_location="cpu", weights_only=False)
        optim_state, optim_fqn = state["optimizer"], state.get("optimizer_format") == "fqn"
        if parallel == "fsdp" and not optim_fqn:
            optim_state, optim_fqn = _optimizer_state_by_name(raw, state, train_cfg, device), True
    if parallel == "fsdp":
        apply_fsdp(raw, device, world)  # parameters become DTensor shards: build the optimizer after
    opt = build_optimizer(raw, train_cfg, device)
    sched = build_scheduler(opt, train_cfg)
    if resume:
        assert optim_state is not None
        _load_optimizer_state(raw, opt, optim_state, optim_fqn, sharded=parallel == "fsdp")
        del optim_state
        sched.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["stream"])
        _set_rng_state(state["rng"])
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        wall_offset, flops_per_step = float(state["wall_time"]), state["flops_per_step"]
        accum = dict(state["log_accum"])
        if is_main:
            _truncate_metrics(metrics_path, step)
            cfg_json = json.loads((out / "config.json").read_text())
            cfg_json.setdefault("resumes", []).append(
                {
                    "step": step,
                    "parallel": parallel,
                    "provenance": provenance(device, train_cfg.seed, world_size=world),
                }
            )
            atomic_write_json(out / "config.json", cfg_json)
            print(f"[train] resumed from step {step} ({ckdir / latest['model']})", file=sys.stderr)

    per_rank = train_cfg.batch_rows // world
    rows = (rank * per_rank, (rank + 1) * per_rank)

    def step_generator(s: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(train_cfg.seed, s, _SALT_STEP))

    if flops_per_step is None:
        # Measure step 1 (forward + backward on this rank's rows) before any update, on the plain model
        # (DDP wraps it later) or on the FSDP-sharded one (its collectives are not counted).
        first = stream.peek()

        def first_step() -> None:
            parts = family.loss_parts(raw, first, rows, step_generator(1), device)
            _objective(parts, world)[0].backward()

        analytic = family.analytic_flops(model_cfg, first)
        try:
            measured = float(measure_flops(first_step)[0])
            flops_source = "FlopCounterMode"
        except Exception as e:  # a backend the counter cannot trace: fall back to the analytic count
            if analytic is None:
                raise
            warnings.warn(f"FLOP measurement failed ({e!r}); using the analytic count", stacklevel=2)
            measured = analytic["total_dense_attention"] / world
            flops_source = "analytic (measurement failed)"
        raw.zero_grad(set_to_none=True)
        flops_per_step = float(_all_reduce_sum(torch.tensor([measured], dtype=torch.float64), world).item())
        if is_main:
            cfg_json = {
                "family": train_cfg.family,
                "preset": preset,
                "model": model_cfg.to_dict(),
                "model_requested": requested_model,
                "train": train_cfg.to_dict(),
                "data": data.info,
                "world_size": world,
                "parallel": parallel,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "params": raw.num_params() if hasattr(raw, "num_params") else None,
                "flops": {
                    "measured_step": flops_per_step,
                    "source": flops_source,
                    "analytic_first_step": analytic,
                },
                "provenance": provenance(device, train_cfg.seed, world_size=world),
            }
            atomic_write_json(out / "config.json", cfg_json)
            atomic_write_text(metrics_path, "")

    model: nn.Module = raw
    if train_cfg.compile:
        # The shared transformer is the hot, shape-stable part; the family's glue stays eager.
        getattr(raw, "transformer", raw).compile()
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(
            raw,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=train_cfg.find_unused_parameters,
        )
    model.train()
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if _use_bf16(train_cfg, device)
        else nullcontext()
    )
    params = [p for p in raw.parameters() if p.requires_grad]

    bar = None
    if is_main and train_cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=train_cfg.steps, initial=step, desc="train", dynamic_ncols=True, mininterval=0.5)
    last_ckpt = latest_checkpoint(out) if resume else None
    metrics_file = open(metrics_path, "a") if is_main else None  # noqa: SIM115
    last_row: dict[str, Any] = {}
    t_start = time.time()
    try:
        while step < train_cfg.steps:
            s = step + 1
            batch = next(stream)
            lr = sched.get_last_lr()[0]
            with autocast:
                parts = family.loss_parts(model, batch, rows, step_generator(s), device)
            objective, contrib = _objective(parts, world)
            # Global means of every part (one small all-reduce), then the loss the logs report.
            means = _all_reduce_sum(contrib.detach().double(), world).tolist()
            losses = {f"{p.name}_loss": m for p, m in zip(parts, means)}
            losses = {"loss": sum(p.weight * m for p, m in zip(parts, means)), **losses}
            if not all(math.isfinite(v) for v in losses.values()):
                raise NonFiniteLossError(_nonfinite_message("loss", s, losses, out, last_ckpt))
            objective.backward()
            if train_cfg.grad_clip > 0:
                gnorm = _grad_norm_value(torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip))
            else:
                gnorm = _grad_norm_value(torch.nn.utils.clip_grad_norm_(params, float("inf")))
            if not math.isfinite(gnorm):
                raise NonFiniteLossError(_nonfinite_message("gradient norm", s, losses, out, last_ckpt))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step = s
            tokens_seen += num_tokens(batch)
            if step_hook is not None:
                step_hook(step, losses)
            for k, v in losses.items():
                accum[k] = accum.get(k, 0.0) + v
            accum["_n"] = accum.get("_n", 0.0) + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    {k.replace("_loss", ""): f"{v:.4f}" for k, v in losses.items()}, refresh=False
                )
            if step == 1 or step % train_cfg.log_every == 0 or step == train_cfg.steps:
                n = accum.pop("_n")
                last_row = {
                    "step": step,
                    **{k: v / n for k, v in accum.items()},
                    "lr": lr,
                    "grad_norm": gnorm,
                    "tokens_seen": tokens_seen,
                    "train_flops": flops_per_step * step,
                    "wall_time": round(wall_offset + time.time() - t_start, 3),
                }
                accum = {}
                if metrics_file is not None:
                    metrics_file.write(json.dumps(last_row) + "\n")
                    metrics_file.flush()
            is_ckpt = train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0
            if is_ckpt or step == train_cfg.steps:
                weights, optim, optim_format = _checkpoint_payload(raw, opt, parallel)
                state = {
                    "step": step,
                    "optimizer": optim,
                    "optimizer_format": optim_format,
                    "scheduler": sched.state_dict(),
                    "stream": stream.state_dict(),
                    "rng": _rng_state(),
                    "tokens_seen": tokens_seen,
                    "wall_time": wall_offset + time.time() - t_start,
                    "flops_per_step": flops_per_step,
                    "log_accum": dict(accum),
                    "world_size": world,
                    "parallel": parallel,
                }
                if is_main:
                    _save_checkpoint(out, step, raw, state, train_cfg.keep_checkpoints, weights)
                last_ckpt = {"step": step, "model": f"step_{step:08d}.safetensors"}
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return TrainResult(out, step, last_row, flops_per_step, raw)


def _objective(parts: list[LossPart], world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's objective, this rank's contribution to each part's global mean).

    Each part's local mean is rescaled by count / total, so summing the contributions over ranks gives
    the global mean; the objective is multiplied by the world size because DDP averages gradients.
    """
    objective = None
    contrib = []
    for p in parts:
        c = p.value * (p.count / p.total) if p.total else p.value * 0.0
        contrib.append(c.float().reshape(()))
        term = p.weight * c * world
        objective = term if objective is None else objective + term
    assert objective is not None, "a family returned no loss parts"
    return objective, torch.stack(contrib)


def _nonfinite_message(what: str, step: int, losses: dict[str, float], out: Path, last: dict | None) -> str:
    vals = ", ".join(f"{k}={v:.6g}" for k, v in losses.items())
    if last is not None:
        where = f"last good checkpoint: {out / CKPT_DIR / last['model']} (step {last['step']})"
    else:
        where = "last good checkpoint: none (no checkpoint was written before this step)"
    return f"non-finite {what} at step {step} ({vals}); stopping. {where}"


# ====================================================================== helpers for callers
def load_run_config(out_dir: str | Path) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """(model config, train config, full config.json) of a run directory."""
    cfg = json.loads((Path(out_dir) / "config.json").read_text())
    return ModelConfig.from_dict(cfg["model"]), TrainConfig.from_dict(cfg["train"]), cfg


def load_checkpoint_model(out_dir: str | Path, step: int | None = None, device: str = "cpu") -> nn.Module:
    """The model of a run directory with the weights of checkpoint ``step`` (default: the latest)."""
    from safetensors.torch import load_file

    model_cfg, train_cfg, _ = load_run_config(out_dir)
    ckdir = Path(out_dir) / CKPT_DIR
    if step is None:
        latest = latest_checkpoint(out_dir)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {ckdir}")
        name = latest["model"]
    else:
        name = f"step_{step:08d}.safetensors"
    model = get_family(train_cfg.family).build_model(model_cfg)
    model.load_state_dict(load_file(str(ckdir / name), device=device))
    return model.to(device)


__all__ = [
    "FAMILIES",
    "FAMILY_MODULES",
    "METRIC_FIELDS",
    "ConfigError",
    "LossPart",
    "ModelFamily",
    "NonFiniteLossError",
    "RunContext",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "DiscreteFamily",
    "TransfusionFamily",
    "build_dataset",
    "build_optimizer",
    "build_scheduler",
    "check_config",
    "default_cache_dir",
    "get_family",
    "latest_checkpoint",
    "load_checkpoint_model",
    "load_run_config",
    "lr_multiplier",
    "read_metrics",
    "register_family",
    "resolve_parallel",
    "apply_fsdp",
    "PARALLEL_MODES",
    "FSDP_AUTO_THRESHOLD",
    "resolve_threads",
    "train",
]
