"""The ``study`` profile's grid: which models it trains and which rows its tables show.

A *training* is one model (family, size preset, ModelConfig overrides on top of the quick profile's); it is
trained once per seed and may serve several rows. A *row* is one line of one table: a training evaluated
with some evaluation settings (inference steps, guidance scale). The base Transfusion training (linear
2x2 patches, bidirectional attention inside images, noise limiting at t <= 500, lambda 5, caption dropout
0.1: the paper's recipe) appears in most groups; it is trained once. The paper's Tables 5 and 6 were
trained without noise limiting (their U-Net 2x2 row equals Table 8's "off"); our rows keep it on, so
only the noise_limit group isolates it.

Groups mirror the paper's ablations (Tables 5-8) at toy scale, plus the three settings the paper never
ablated (lambda, CFG dropout rate, inference steps) and the guidance scale, and a size ladder for the
Transfusion-vs-discrete scaling comparison (Table 3's parity FLOP ratios, read across sizes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# name -> (preset, ModelConfig overrides): the size ladder of the scaling group
SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny", {}),
    "small": ("tiny", {"dim": 192, "n_layers": 3, "ffn_multiple_of": 32}),
    "S": ("S", {}),
}

# the size ladder's learning rates: label -> training-name suffix (1e-3 is the quick recipe's)
LADDER_LRS: dict[str, str] = {"1e-3": "", "3e-4": "-lr3e-4", "3e-3": "-lr3e-3", "1e-2": "-lr1e-2"}


@dataclass(frozen=True)
class Training:
    family: str  # "transfusion" | "discrete"
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides
    recipe: dict[str, Any] = field(default_factory=dict)  # QuickConfig training overrides (e.g. lr)


@dataclass(frozen=True)
class Row:
    group: str
    label: str
    training: str  # key of TRAININGS
    eval: dict[str, Any] = field(default_factory=dict)  # QuickConfig evaluation overrides
    # the paper's figures for the matching row (Tables 5, 6, 8 at 0.76B; Table 7 per size), beside ours
    paper: dict[str, float] = field(default_factory=dict)
    # size-ladder groups: the line this row belongs to (plotted against training FLOPs); "" elsewhere
    series: str = ""


def _tf(**model: Any) -> Training:
    return Training("transfusion", model=model)


TRAININGS: dict[str, Training] = {
    "base": _tf(),
    "linear-causal": _tf(causal_only_images=True),
    "unet": _tf(adapter="unet"),
    "unet-causal": _tf(adapter="unet", causal_only_images=True),
    "linear-p1": _tf(patch_size=1),
    "linear-p4": _tf(patch_size=4),
    "linear-p8": _tf(patch_size=8),
    "unet-p4": _tf(adapter="unet", patch_size=4),
    "unet-p8": _tf(adapter="unet", patch_size=8),
    "unet-no-noise-limit": _tf(adapter="unet", noise_limit_t=None),
    "lambda-1": _tf(diffusion_lambda=1.0),
    "lambda-20": _tf(diffusion_lambda=20.0),
    "dropout-0": _tf(caption_dropout=0.0),
    "dropout-0.3": _tf(caption_dropout=0.3),
    "v-pred": _tf(prediction_type="v_prediction"),
    "v-pred-eps-equivalent": _tf(prediction_type="v_prediction", diffusion_loss_weighting="eps_equivalent"),
    "v-pred-min-snr": _tf(prediction_type="v_prediction", diffusion_loss_weighting="min_snr"),
    "eps-min-snr": _tf(diffusion_loss_weighting="min_snr"),
    "no-loss-after-drop": _tf(loss_after_dropped_caption=False),
    "dropout-0.3-no-loss-after-drop": _tf(caption_dropout=0.3, loss_after_dropped_caption=False),
    "discrete-no-loss-after-drop": Training("discrete", model={"loss_after_dropped_caption": False}),
    # Chameleon's stabilisers (QK-norm, the z-loss at its weight 1e-5), which our baseline leaves off
    "discrete-qk-norm": Training("discrete", model={"qk_norm": True}),
    "discrete-z-loss": Training("discrete", model={"z_loss": 1e-5}),
    "discrete-qk-norm-z-loss": Training("discrete", model={"qk_norm": True, "z_loss": 1e-5}),
    "qk-norm-z-loss": _tf(qk_norm=True, z_loss=1e-5),
    # the baseline's size ladder with QK-norm (its tiny one is discrete-qk-norm)
    **{
        f"discrete-{size}-qk-norm": Training("discrete", preset, {**model, "qk_norm": True})
        for size, (preset, model) in SIZES.items()
        if size != "tiny"
    },
    # the size ladder at the other learning rates of LADDER_LRS (every other training uses the quick
    # recipe's 1e-3)
    **{
        f"{family}-{size}{suffix}": Training(family, preset, dict(model), recipe={"lr": float(lr)})
        for lr, suffix in LADDER_LRS.items()
        if suffix
        for family in ("transfusion", "discrete")
        for size, (preset, model) in SIZES.items()
    },
    **{
        f"{family}-{size}": Training(family, preset, dict(model))
        for family in ("transfusion", "discrete")
        for size, (preset, model) in SIZES.items()
        if (family, size) != ("transfusion", "tiny")  # that one is "base"
    },
    **{
        f"unet-{size}": Training("transfusion", preset, {**model, "adapter": "unet"})
        for size, (preset, model) in SIZES.items()
        if size != "tiny"  # that one is "unet"
    },
}


def _paper(cider: float, fid: float, c4: float, clip: float) -> dict[str, float]:
    return {"paper_c4_ppl": c4, "paper_cider": cider, "paper_fid": fid, "paper_clip": clip}


def _ladder(line: str, size: str) -> str:
    """The training of a size-ladder row: family (transfusion, discrete) or adapter (linear, unet)."""
    if size == "tiny":
        return {"transfusion": "base", "linear": "base", "unet": "unet"}.get(line, f"{line}-{size}")
    return f"transfusion-{size}" if line == "linear" else f"{line}-{size}"


def ladder_training(family: str, size: str, lr_suffix: str = "") -> str:
    """The training of one family at one size of the ladder, at the learning rate of ``lr_suffix`` (see
    LADDER_LRS)."""
    return f"{family}-{size}{lr_suffix}" if lr_suffix else _ladder(family, size)


def _qk_norm(training: str) -> str:
    """The baseline ladder's training with QK-norm in place of ``training`` (discrete-<size>)."""
    size = training.removeprefix("discrete-")
    return "discrete-qk-norm" if size == "tiny" else f"discrete-{size}-qk-norm"


def _family_ladder(
    group: str,
    suffix: str,
    transfusion_eval: dict[str, Any],
    lr_suffix: str = "",
    discrete_eval: tuple[str, dict[str, Any]] = ("", {}),
) -> list[Row]:
    """Both families up the size ladder, Transfusion's images drawn with ``transfusion_eval``, the
    baseline's with ``discrete_eval`` ((label suffix, overrides); default: its default evaluation).
    ``lr_suffix`` picks the trainings at another learning rate (``"-lr3e-4"``); the labels then name it."""
    lr = f", lr {lr_suffix.removeprefix('-lr')}" if lr_suffix else ""
    return [
        *(
            Row(
                group,
                f"transfusion {size}, {suffix}{lr}",
                ladder_training("transfusion", size, lr_suffix),
                eval=transfusion_eval,
                series="transfusion",
            )  # fmt: skip
            for size in SIZES
        ),
        *(
            Row(
                group,
                f"discrete {size}{discrete_eval[0]}{lr}",
                ladder_training("discrete", size, lr_suffix),
                eval=discrete_eval[1],
                series="discrete",
            )  # fmt: skip
            for size in SIZES
        ),
    ]


_ADAPTER_NAMES = {"linear": "linear", "unet": "U-Net"}

# paper Table 7 (CIDEr, FID, C4 perplexity, CLIP score) at the sizes our ladder stands in for
_TABLE7 = {
    "linear": (
        ("0.16B", (6.2, 37.6, 14.8, 20.0)),
        ("0.37B", (11.1, 21.5, 12.0, 22.4)),
        ("1.4B", (19.1, 19.4, 9.5, 24.3)),
    ),
    "unet": (
        ("0.16B", (15.3, 18.8, 14.4, 23.9)),
        ("0.37B", (21.1, 18.1, 11.8, 24.9)),
        ("1.4B", (28.1, 16.6, 9.4, 25.7)),
    ),
}

# the stable sampler the sampler_clip group found: DDIM in 50 steps, each x_0 estimate clamped to [-3, 3]
DDIM_CLIP3: dict[str, Any] = {"scheduler": "ddim", "num_diffusion_steps": 50, "clip_sample_range": 3.0}
# each family's sampler as chosen on the val split (the sampler_choice_val group): Transfusion DDIM 50
# clamped at 3, the baseline guidance 1 (temperature 1)
VAL_SAMPLERS: dict[str, dict[str, Any]] = {"transfusion": DDIM_CLIP3, "discrete": {"guidance_scale": 1.0}}
# the learning-rate choice on val: per rate, the group of its val rows and its test ladder. The choice is
# reported under LR_CHOICE_GROUP; 3e-3's and 1e-2's groups are extra (outside the default grid: see
# EXTRA_GROUPS).
LR_CHOICE_GROUP = "lr_choice_val"
LR_CHOICE: dict[str, tuple[str, str]] = {
    "1e-3": (LR_CHOICE_GROUP, "scaling_val_samplers"),
    "3e-4": (LR_CHOICE_GROUP, "scaling_lr_3e-4"),
    "3e-3": ("lr_choice_val_3e-3", "scaling_lr_3e-3"),
    "1e-2": ("lr_choice_val_1e-2", "scaling_lr_1e-2"),
}

ROWS: tuple[Row, ...] = (
    # scaling: both families up the size ladder (parity FLOP ratios across sizes)
    *(
        Row("scaling", f"{family} {size}", _ladder(family, size), series=family)
        for family in ("transfusion", "discrete")
        for size in SIZES
    ),
    # the same models at 250 steps with every step's x_0 estimate clamped to [-10, 10] (the data latents
    # have unit std and stay within about 6): without the clamp their latents grow with the step count
    *_family_ladder("scaling_x0_clip", "x0 clip 10", {"clip_sample_range": 10.0}),
    # the same models with Transfusion's images drawn by DDIM in 50 steps, clamped at 3: the best sampler of
    # the sampler_clip group
    *_family_ladder("scaling_ddim_clip3", "DDIM 50, x0 clip 3", DDIM_CLIP3),
    # each family with the sampler its search chose on the val split (VAL_SAMPLERS)
    *_family_ladder(
        "scaling_val_samplers",
        "DDIM 50, x0 clip 3",
        VAL_SAMPLERS["transfusion"],
        discrete_eval=(", guidance 1", VAL_SAMPLERS["discrete"]),
    ),
    # the val-sampler ladder with the baseline trained with QK-norm (Chameleon's stabiliser; see the
    # stabilizers group): does the parity ratio hold against a stabilised baseline?
    *(
        dataclasses.replace(r, training=_qk_norm(r.training)) if r.series == "discrete" else r
        for r in _family_ladder(
            "scaling_qk_norm",
            "DDIM 50, x0 clip 3",
            VAL_SAMPLERS["transfusion"],
            discrete_eval=(", QK-norm, guidance 1", VAL_SAMPLERS["discrete"]),
        )
    ),
    # the same ladder trained at learning rate 3e-4 (the paper's rate), 3e-3 and 1e-2: is the parity ratio a
    # property of the families or of the one learning rate they share?
    *(
        row
        for lr, suffix in LADDER_LRS.items()
        if suffix
        for row in _family_ladder(
            LR_CHOICE[lr][1],
            "DDIM 50, x0 clip 3",
            VAL_SAMPLERS["transfusion"],
            lr_suffix=suffix,
            discrete_eval=(", guidance 1", VAL_SAMPLERS["discrete"]),
        )
    ),
    # every learning rate of every family and size scored on the val split, so that the learning rate can
    # be chosen per size without looking at test (bench.study.lr_choice reads the test ladders above at
    # the chosen rates)
    *(
        Row(
            LR_CHOICE[lr][0],
            f"{family} {size}, lr {lr} (val)",
            ladder_training(family, size, suffix),
            eval={**VAL_SAMPLERS[family], "eval_split": "val"},
        )
        for lr, suffix in LADDER_LRS.items()
        for family in ("transfusion", "discrete")
        for size in SIZES
    ),
    # Table 7: linear vs U-Net adapters up the ladder (the paper's rows are 0.16B, 0.37B and 1.4B)
    *(
        Row(
            "adapter_scaling",
            f"{_ADAPTER_NAMES[adapter]} {size} (paper {paper_size})",
            _ladder(adapter, size),
            paper=_paper(*figures),
            series=adapter,
        )  # fmt: skip
        for adapter, rows in _TABLE7.items()
        for size, (paper_size, figures) in zip(SIZES, rows)
    ),
    # Table 5: attention masking inside images, per adapter
    Row("masking", "linear causal", "linear-causal", paper=_paper(12.7, 61.3, 10.4, 23.0)),
    Row("masking", "linear bidirectional", "base", paper=_paper(16.0, 20.3, 10.4, 24.0)),
    Row("masking", "U-Net causal", "unet-causal", paper=_paper(23.3, 16.8, 10.3, 25.3)),
    Row("masking", "U-Net bidirectional", "unet", paper=_paper(25.4, 16.7, 10.3, 25.4)),
    # Table 6: latent patch size (the paper's 1x1 row has no adapter; ours is linear)
    Row("patch", "linear 1x1", "linear-p1", paper=_paper(12.0, 21.0, 10.3, 24.0)),
    Row("patch", "linear 2x2", "base", paper=_paper(16.0, 20.3, 10.4, 24.0)),
    Row("patch", "linear 4x4", "linear-p4", paper=_paper(14.3, 25.6, 10.9, 22.6)),
    Row("patch", "linear 8x8", "linear-p8", paper=_paper(11.3, 43.5, 11.7, 18.9)),
    Row("patch", "U-Net 2x2", "unet", paper=_paper(25.4, 16.7, 10.3, 25.4)),
    Row("patch", "U-Net 4x4", "unet-p4", paper=_paper(29.9, 16.0, 10.7, 25.7)),
    Row("patch", "U-Net 8x8", "unet-p8", paper=_paper(29.5, 16.1, 11.4, 25.2)),
    # Table 8: noise limiting t <= 500 for image-first pairs (U-Net 2x2)
    Row("noise_limit", "U-Net, off", "unet-no-noise-limit", paper=_paper(25.4, 16.7, 10.3, 25.4)),
    Row("noise_limit", "U-Net, on", "unet", paper=_paper(29.4, 16.5, 10.3, 25.4)),
    # never ablated in the paper
    Row("lambda", "lambda 1", "lambda-1"),
    Row("lambda", "lambda 5", "base"),
    Row("lambda", "lambda 20", "lambda-20"),
    Row("cfg_dropout", "caption dropout 0", "dropout-0"),
    Row("cfg_dropout", "caption dropout 0.1", "base"),
    Row("cfg_dropout", "caption dropout 0.3", "dropout-0.3"),
    Row("inference_steps", "25 DDPM steps", "base", eval={"num_diffusion_steps": 25}),
    Row("inference_steps", "50 DDPM steps", "base", eval={"num_diffusion_steps": 50}),
    Row("inference_steps", "100 DDPM steps", "base", eval={"num_diffusion_steps": 100}),
    Row("inference_steps", "250 DDPM steps", "base", eval={"num_diffusion_steps": 250}),
    Row("inference_steps", "500 DDPM steps", "base", eval={"num_diffusion_steps": 500}),
    *(
        Row("x0_clip", f"{steps} steps{label}", "base", eval={"num_diffusion_steps": steps, **clip})
        for steps in (50, 250, 500)
        for label, clip in (("", {}), (", x0 clip 10", {"clip_sample_range": 10.0}))
    ),
    # how tight a clamp each sampler wants: DDPM at 250 steps and DDIM at 50 (the `transfusion generate
    # --scheduler ddim` default), clamps from none to 3 (the data latents have unit std and reach about 6)
    *(
        Row("sampler_clip", f"{name}, {label}", "base", eval={**ev, **clip})
        for name, ev in (
            ("DDPM 250", {}),
            ("DDIM 50", {"scheduler": "ddim", "num_diffusion_steps": 50}),
        )
        for label, clip in (
            ("no clamp", {}),
            ("x0 clip 10", {"clip_sample_range": 10.0}),
            ("x0 clip 5", {"clip_sample_range": 5.0}),
            ("x0 clip 3", {"clip_sample_range": 3.0}),
        )
    ),
    # the same kind of search for the baseline's sampler: guidance scale and code temperature (tiny size;
    # guidance 3 and temperature 1, the defaults, share the default evaluation)
    *(
        Row(
            "baseline_sampling",
            f"discrete, guidance {g:g}, temperature {temp:g}",
            "discrete-tiny",
            eval={"guidance_scale": g, "image_temperature": temp},
        )
        for g in (1.0, 3.0, 5.0)
        for temp in (1.0, 0.7)
    ),
    # the empty-caption ambiguity: a dropped caption-first pair packs like an empty image-first caption;
    # without the loss on the token after its <EOI> it no longer teaches that. Captions decoded freely
    # (no one-token floor) show the share of empty ones, and with the floor as in the other groups.
    *(
        Row("dropped_caption_loss", f"{line}, {how}{floor}", training, eval=ev)
        for line, paper, switched in (
            ("dropout 0.1", "base", "no-loss-after-drop"),
            ("dropout 0.3", "dropout-0.3", "dropout-0.3-no-loss-after-drop"),
            ("discrete", "discrete-tiny", "discrete-no-loss-after-drop"),
        )
        for how, training in (("paper", paper), ("no loss after drop", switched))
        for floor, ev in ((", free captions", {"caption_min_tokens": 0}), ("", {}))
    ),
    # Chameleon's stabilisers on the baseline (and both on Transfusion, which the paper trained without
    # them), each family scored with its val-chosen sampler
    *(
        Row("stabilizers", label, training, eval=VAL_SAMPLERS[family])
        for label, training, family in (
            ("transfusion tiny", "base", "transfusion"),
            ("transfusion tiny, QK-norm + z-loss", "qk-norm-z-loss", "transfusion"),
            ("discrete tiny", "discrete-tiny", "discrete"),
            ("discrete tiny, QK-norm", "discrete-qk-norm", "discrete"),
            ("discrete tiny, z-loss 1e-5", "discrete-z-loss", "discrete"),
            ("discrete tiny, QK-norm + z-loss", "discrete-qk-norm-z-loss", "discrete"),
        )
    ),
    # what the image head predicts (the paper's eps, or v, whose x_0 estimate stays bounded near t = T) and
    # the diffusion loss's timestep weight: the unweighted v loss is the eps loss divided by abar_t
    *(
        Row("loss_weighting", f"{name}{label}", training, eval=clip)
        for name, training in (
            ("eps, unweighted (paper)", "base"),
            ("eps, min-SNR 5", "eps-min-snr"),
            ("v, unweighted", "v-pred"),
            ("v, eps-equivalent", "v-pred-eps-equivalent"),
            ("v, min-SNR 5", "v-pred-min-snr"),
        )
        for label, clip in (("", {}), (", x0 clip 10", {"clip_sample_range": 10.0}))
    ),
    Row("cfg_scale", "guidance 1 (off)", "base", eval={"guidance_scale": 1.0}),
    Row("cfg_scale", "guidance 3", "base", eval={"guidance_scale": 3.0}),
    Row("cfg_scale", "guidance 5", "base", eval={"guidance_scale": 5.0}),
)

# The paper's ablations (Tables 5-8) again with Transfusion's images drawn by the stable sampler of the
# sampler_clip group (DDIM, 50 steps, x_0 clamped at 3) instead of the paper's DDPM 250, whose latents
# blow up at this scale: which conclusions change with a healthy sampler? Evaluations only.
_ABLATION_TABLES = {"masking": "T5", "patch": "T6", "adapter_scaling": "T7", "noise_limit": "T8"}
ROWS += tuple(
    Row("ablations_ddim_clip3", f"{table} {r.label}", r.training, eval=DDIM_CLIP3, paper=r.paper)
    for group, table in _ABLATION_TABLES.items()
    for r in ROWS
    if r.group == group
)

# Both sampler searches again on the val split, so the choice of sampler need not look at the test split
# that every reported number comes from. Evaluations only.
ROWS += tuple(
    Row("sampler_choice_val", f"{r.label} (val)", r.training, eval={**r.eval, "eval_split": "val"})
    for group in ("sampler_clip", "baseline_sampling")
    for r in ROWS
    if r.group == group
)

GROUPS: tuple[str, ...] = tuple(dict.fromkeys(r.group for r in ROWS))
# groups outside the default grid, which fits the study's 90 minutes; `--groups all` adds them. The
# learning rates 3e-3 and 1e-2 bracket the val choice from above: six more trainings each (12 jobs at 2
# seeds), about 40 minutes of compute each; the stabilisers add four tiny trainings, and the ladder with a
# QK-norm baseline two more sizes.
EXTRA_GROUPS: tuple[str, ...] = (*LR_CHOICE["3e-3"], *LR_CHOICE["1e-2"], "stabilizers", "scaling_qk_norm")
DEFAULT_GROUPS: tuple[str, ...] = tuple(g for g in GROUPS if g not in EXTRA_GROUPS)
# groups whose rows are the two families up the size ladder: parity FLOP ratios are read across them
FAMILY_LADDERS: tuple[str, ...] = (
    "scaling",
    "scaling_x0_clip",
    "scaling_ddim_clip3",
    "scaling_val_samplers",
    "scaling_lr_3e-4",
    "scaling_lr_3e-3",
    "scaling_lr_1e-2",
    "scaling_qk_norm",
)

GROUP_TITLES: dict[str, str] = {
    "scaling": "Transfusion vs the discrete baseline across model sizes (paper Table 3, Figure 5)",
    "scaling_x0_clip": "The same comparison with Transfusion's x_0 estimates clamped to [-10, 10]",
    "scaling_ddim_clip3": "The same comparison with Transfusion's images by DDIM in 50 steps, clamped at 3",
    "scaling_val_samplers": "The comparison with each family's sampler chosen on the val split",
    "sampler_choice_val": "Both sampler searches (sampler_clip, baseline_sampling) on the val split",
    "ablations_ddim_clip3": "The paper's ablations (Tables 5-8) with images by DDIM 50, clamped at 3",
    "scaling_lr_3e-4": "The val-sampler comparison with both families trained at lr 3e-4 instead of 1e-3",
    "scaling_lr_3e-3": "The val-sampler comparison with both families trained at lr 3e-3 instead of 1e-3",
    "lr_choice_val": "The learning rate of each family and size, chosen on the val split per metric",
    "lr_choice_val_3e-3": "The learning rate 3e-3 on the val split, beside lr_choice_val's 1e-3 and 3e-4",
    "scaling_lr_1e-2": "The val-sampler comparison with both families trained at lr 1e-2 instead of 1e-3",
    "lr_choice_val_1e-2": "The learning rate 1e-2 on the val split, beside the other rates' val groups",
    "adapter_scaling": "Linear vs U-Net adapters across model sizes (paper Table 7)",
    "masking": "Attention masking inside images (paper Table 5)",
    "patch": "Latent patch size (paper Table 6)",
    "noise_limit": "Noise limiting t <= 500 for image-first pairs (paper Table 8)",
    "lambda": "Diffusion loss weight lambda (not ablated in the paper)",
    "cfg_dropout": "Caption dropout rate for classifier-free guidance (not ablated in the paper)",
    "inference_steps": "DDPM inference steps (not ablated in the paper)",
    "x0_clip": "DDPM steps with and without each step's x_0 estimate clamped to [-10, 10]",
    "sampler_clip": "The x_0 clamp's range for DDPM (250 steps) and DDIM (50 steps)",
    "baseline_sampling": "The discrete baseline's sampler: guidance scale and code temperature (tiny)",
    "dropped_caption_loss": "No LM loss after a caption-dropped image (the empty-caption ambiguity)",
    "loss_weighting": "The image head's target (eps, v) and the diffusion loss's timestep weighting",
    "cfg_scale": "Classifier-free guidance scale",
    "stabilizers": "Chameleon's stabilisers (QK-norm, z-loss 1e-5) on the baseline and on Transfusion",
    "scaling_qk_norm": "The val-sampler comparison with the baseline trained with QK-norm",
}


def eval_key(overrides: dict[str, Any]) -> str:
    """A readable folder name for a set of evaluation overrides ("default" for none)."""
    if not overrides:
        return "default"
    return "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def varied_recipe_fields(rows: list[Row]) -> set[str]:
    """QuickConfig training fields the trainings of ``rows`` set: a study-wide override would be ignored."""
    return {k for r in rows for k in TRAININGS[r.training].recipe}


def varied_model_fields(rows: list[Row]) -> set[str]:
    """ModelConfig fields the trainings of ``rows`` set (or whose preset sets): a study-wide override of
    one would make those rows' labels wrong."""
    from transfusion.config import PRESETS

    trainings = [TRAININGS[r.training] for r in rows]
    fields = {k for t in trainings for k in t.model}
    return fields.union(*(PRESETS[t.preset] for t in trainings if t.preset != "tiny"))


def rows_for(groups: tuple[str, ...] | list[str]) -> list[Row]:
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown study group(s) {unknown}; valid: {list(GROUPS)}")
    return [r for r in ROWS if r.group in groups]


__all__ = [
    "DDIM_CLIP3", "DEFAULT_GROUPS", "EXTRA_GROUPS", "FAMILY_LADDERS", "GROUPS", "GROUP_TITLES", "LADDER_LRS",
    "LR_CHOICE", "LR_CHOICE_GROUP", "ROWS", "SIZES", "TRAININGS", "VAL_SAMPLERS", "Row", "Training",
    "eval_key", "ladder_training", "rows_for", "varied_model_fields", "varied_recipe_fields",
]  # fmt: skip
