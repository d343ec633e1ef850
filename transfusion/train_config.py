"""A training run's configuration: ``TrainConfig`` (everything except the model's shape, which is
``transfusion.config.ModelConfig``) and ``ConfigError``.

Each field carries its help text (the CLI lists it); ``__post_init__`` checks types and ranges and raises
``ConfigError`` naming the ``train.KEY``. Checks that need the model, the data or the device live in
``transfusion.config_checks``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from transfusion.value_checks import is_int, is_real

PARALLEL_MODES = ("ddp", "fsdp", "auto", "none")


class ConfigError(ValueError):
    """Invalid configuration; the message starts with the offending key."""


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
        return is_int(value)
    if hint is float:
        return is_real(value)
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
