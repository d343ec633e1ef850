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

``train.parallel`` picks the wrapper under torchrun (ddp, fsdp, auto, none; see ``transfusion.parallel``);
FSDP runs save full checkpoints that load in one process (see ``transfusion.checkpoints``).

Model families ("transfusion", "discrete"; ``train.family``, the CLI's ``--model``) say how to prepare the
data, build the model, and compute the loss parts of a step; the loop only sees ``LossPart`` s (see
``transfusion.families``).

A non-finite loss or gradient norm stops the run with ``NonFiniteLossError`` naming the step and the
last good checkpoint.

This module holds the loop; the rest of a run lives in one module per job, and every public name is
re-exported here (``from transfusion.train import X`` keeps working):

    train_config    TrainConfig, ConfigError (the configuration and its own checks)
    config_checks   check_config (every cheap check before any work)
    devices         device, attention backend, precision, CPU threads
    families        the ModelFamily seam and registry, TransfusionFamily, DiscreteFamily
    run_data        dataset, tokenizer, quick autoencoder, latents / codes, caches
    parallel        process group, DDP / FSDP2 wrapping
    optimizer       AdamW and the warmup + cosine schedule
    checkpoints     save / load / latest, FSDP full state dicts, loading a trained model
    metrics_log     metrics.jsonl
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from transfusion.checkpoints import (
    CKPT_DIR,
    LATEST,
    _checkpoint_payload,
    _load_optimizer_state,
    _optimizer_state_by_name,
    _rng_state,
    _save_checkpoint,
    _set_rng_state,
    latest_checkpoint,
    load_checkpoint_model,
    load_run_config,
)
from transfusion.config import ModelConfig
from transfusion.config_checks import check_config
from transfusion.devices import _use_bf16, resolve_attention, resolve_device, resolve_threads
from transfusion.families import (
    FAMILIES,
    FAMILY_MODULES,
    DiscreteFamily,
    LossPart,
    ModelFamily,
    TrainingData,
    TransfusionFamily,
    get_family,
    register_family,
)
from transfusion.flops import measure_flops, measure_without_attention
from transfusion.metrics_log import METRIC_FIELDS, _truncate_metrics, read_metrics
from transfusion.optimizer import build_optimizer, build_scheduler, lr_multiplier
from transfusion.parallel import (
    FSDP_AUTO_THRESHOLD,
    DistInfo,
    _all_reduce_sum,
    _grad_norm_value,
    apply_fsdp,
    init_distributed,
    resolve_parallel,
)
from transfusion.provenance import atomic_write_json, atomic_write_text, provenance
from transfusion.run_data import (
    RunContext,
    build_dataset,
    data_info,
    dataset_image_size,
    default_cache_dir,
    prepare_autoencoder,
    prepare_codes,
    prepare_latents,
    prepare_tokenizer,
    quick_autoencoder_config,
    read_captions_and_images,
    resolve_cache_dir,
    special_tokens,
    stream_config,
)
from transfusion.train_config import (
    PARALLEL_MODES,
    ConfigError,
    TrainConfig,
    _type_ok,  # noqa: F401  (the CLI imports it from here)
)
from transfusion.training_data import mix_seed, num_tokens

_SALT_STEP = 0x57E9


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or Inf; the message names the step and last checkpoint."""


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
        result = _train(model_cfg, train_cfg, out, resume, preset, data, step_hook, dinfo)
        if dinfo.owns_group and dist.is_initialized():
            # Tear the group down only once every rank is done with it: a rank that destroys its gloo
            # group while a peer still finishes its last collective can abort at exit.
            dist.barrier()
        return result
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

        # The step's FLOPs: counted without attention (whatever the backend computes), plus attention on
        # the layout's allowed pairs only (DESIGN section 5); a family without an analytic count keeps the
        # counter's attention.
        analytic = family.analytic_flops(model_cfg, first)
        if analytic is None:  # counted once, attention as the backend computes it
            counted = rest = float(measure_flops(first_step)[0])
            flops_source = "FlopCounterMode (attention as the backend computes it: no analytic count)"
        else:
            try:
                counted, rest = measure_without_attention(first_step)
                flops_source = "FlopCounterMode without attention + analytic attention on allowed pairs"
            except Exception as e:  # a backend the counter cannot trace: fall back to the analytic count
                warnings.warn(f"FLOP measurement failed ({e!r}); using the analytic count", stacklevel=2)
                counted, rest = analytic["total_dense_attention"] / world, analytic["dense"] / world
                flops_source = "analytic (measurement failed)"
        raw.zero_grad(set_to_none=True)
        # per-rank counts summed over ranks (on the device: NCCL takes no CPU tensors); the allowed-pair
        # attention is of the global batch already
        both = torch.tensor([counted, rest], dtype=torch.float64, device=device)
        counted, rest = _all_reduce_sum(both, world).tolist()
        flops_per_step = counted if analytic is None else rest + analytic["attention_allowed"]
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
                    "counted_step": counted,
                    "counted_attention": counted - rest,
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
                    {k.replace("_loss", ""): f"{v + 0.0:.4f}" for k, v in losses.items()},
                    refresh=False,  # no "-0.0000"
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
    # also re-exported from the modules train.py was split into, so these imports keep working
    "CKPT_DIR",
    "LATEST",
    "DistInfo",
    "data_info",
    "dataset_image_size",
    "init_distributed",
    "prepare_autoencoder",
    "prepare_codes",
    "prepare_latents",
    "prepare_tokenizer",
    "quick_autoencoder_config",
    "read_captions_and_images",
    "resolve_attention",
    "resolve_cache_dir",
    "resolve_device",
    "special_tokens",
    "stream_config",
]
