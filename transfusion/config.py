"""Model configuration: one dataclass (torchtitan-style model args) plus named size presets.

``ModelConfig`` holds everything needed to build a Transfusion model (and the shared transformer that
the discrete baseline reuses; ``codebook_size`` sizes that baseline's image-code vocabulary). It validates
itself on construction, naming the bad field and its value, and round-trips through plain JSON-able dicts
(``to_dict`` / ``from_dict``).

Presets:
    ``tiny`` / ``S`` / ``M`` / ``L``: a toy-scale ladder (about 0.5M .. 100M parameters) for CPU and
    single-GPU runs.
    ``0.16B`` / ``0.37B`` / ``0.76B`` / ``1.4B`` / ``7B``: the paper's layer/width/head shapes (Llama-2
    vocabulary, 8-channel 32x32 latents, 4096-token rows), used for FLOP accounting, not for training here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from transfusion.value_checks import is_finite_real, is_int

PATCH_SIZES = (1, 2, 4, 8)
ADAPTERS = ("linear", "unet")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOSS_WEIGHTINGS = ("none", "min_snr", "eps_equivalent")


@dataclass
class ModelConfig:
    # ---- text / transformer
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    # SwiGLU hidden size: int(8 * dim / 3 * ffn_dim_multiplier) rounded up to a multiple of ffn_multiple_of.
    ffn_multiple_of: int = 32
    ffn_dim_multiplier: float = 1.0
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention: str = "sdpa"  # attention backend name (see transfusion.attention)
    qk_norm: bool = False  # RMSNorm on per-head q and k (the discrete baseline's stabiliser)
    # weight of the z-loss, mean(logsumexp(LM logits)^2) over LM targets, added to the loss: Chameleon's
    # other stabiliser (it used 1e-5); 0 disables it
    z_loss: float = 0.0
    init_std: float = 0.02
    # ---- image latents and adapters
    latent_channels: int = 4
    latent_size: int = 8  # height = width of the latent grid
    patch_size: int = 2  # k: each k x k latent patch is one transformer position
    adapter: str = "linear"  # "linear" | "unet"
    unet_channels: tuple[int, ...] = (32, 64)  # per U-Net level; each level but the last downsamples 2x
    unet_layers_per_block: int = 1
    unet_groups: int = 8  # GroupNorm groups inside the U-Net resnets
    timestep_freq_dim: int = 128  # sinusoidal features fed to the timestep MLP
    # ---- diffusion and training recipe
    num_train_timesteps: int = 1000
    diffusion_lambda: float = 5.0  # L = L_LM + lambda * L_DDPM
    noise_limit_t: int | None = 500  # image-first images get t <= this; None disables noise limiting
    # what the image head predicts: "epsilon" (the paper: the noise) or "v_prediction" (Salimans & Ho's
    # v = sqrt(abar) eps - sqrt(1 - abar) x0, whose x_0 estimate stays bounded near t = T)
    prediction_type: str = "epsilon"
    # per-timestep weight of the diffusion MSE (transfusion.diffusion.loss_weights): "none" (the paper),
    # "min_snr" (Hang et al. 2023: the x_0-space weight min(SNR, min_snr_gamma)), or "eps_equivalent"
    # (v-prediction weighted so that its loss equals the eps loss; for eps it is "none")
    diffusion_loss_weighting: str = "none"
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1  # applied in data prep (transfusion.packing), recorded here
    # False: no LM loss on the token after a caption-dropped image's <EOI> (packing.pack_documents); the
    # dropped pair otherwise reads as an image-first pair with an empty caption
    loss_after_dropped_caption: bool = True
    causal_only_images: bool = False  # ablation: no bidirectional attention inside images
    # ---- discrete baseline
    # VQ codebook entries appended after the text vocabulary (discrete baseline only; 0 = none)
    codebook_size: int = 0

    def __post_init__(self) -> None:
        # Tuples arrive as lists from JSON; normalise before checking.
        self.unet_channels = tuple(int(c) for c in self.unet_channels)
        positive = (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "ffn_multiple_of",
            "max_seq_len",
            "latent_channels",
            "latent_size",
            "unet_layers_per_block",
            "unet_groups",
            "timestep_freq_dim",
            "num_train_timesteps",
        )
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"ModelConfig.{name} = {value!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps", "ffn_dim_multiplier", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ModelConfig.{name} = {value!r} must be a positive finite number")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim = {self.dim} is not divisible by n_heads = {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if self.timestep_freq_dim % 2:
            raise ValueError(f"ModelConfig.timestep_freq_dim = {self.timestep_freq_dim} must be even")
        if not isinstance(self.attention, str) or not self.attention:
            raise ValueError(f"ModelConfig.attention = {self.attention!r} must be a backend name")
        if self.patch_size not in PATCH_SIZES:
            raise ValueError(f"ModelConfig.patch_size = {self.patch_size!r} must be one of {PATCH_SIZES}")
        if self.latent_size % self.patch_size:
            raise ValueError(
                f"ModelConfig.patch_size = {self.patch_size} does not divide latent_size = {self.latent_size}"
            )
        if self.adapter not in ADAPTERS:
            raise ValueError(f"ModelConfig.adapter = {self.adapter!r} must be one of {ADAPTERS}")
        if not self.unet_channels or any(c <= 0 for c in self.unet_channels):
            raise ValueError(
                f"ModelConfig.unet_channels = {self.unet_channels!r} must be non-empty and positive"
            )
        bad = [c for c in self.unet_channels if c % self.unet_groups]
        if bad:
            raise ValueError(
                f"ModelConfig.unet_channels = {self.unet_channels} has {bad[0]} not divisible by "
                f"unet_groups = {self.unet_groups}"
            )
        if self.adapter == "unet" and self.patch_size % self.unet_downsample:
            raise ValueError(
                f"ModelConfig.unet_channels = {self.unet_channels} downsamples {self.unet_downsample}x, "
                f"which does not divide patch_size = {self.patch_size}; use fewer U-Net levels"
            )
        if not (isinstance(self.diffusion_lambda, (int, float)) and math.isfinite(self.diffusion_lambda)) or (
            self.diffusion_lambda < 0
        ):
            raise ValueError(
                f"ModelConfig.diffusion_lambda = {self.diffusion_lambda!r} must be finite and >= 0"
            )
        if self.noise_limit_t is not None and not (
            isinstance(self.noise_limit_t, int) and 0 <= self.noise_limit_t < self.num_train_timesteps
        ):
            raise ValueError(
                f"ModelConfig.noise_limit_t = {self.noise_limit_t!r} must be None or an integer in "
                f"[0, num_train_timesteps = {self.num_train_timesteps})"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"ModelConfig.prediction_type = {self.prediction_type!r} must be one of {PREDICTION_TYPES}"
            )
        if self.diffusion_loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"ModelConfig.diffusion_loss_weighting = {self.diffusion_loss_weighting!r} must be one of "
                f"{LOSS_WEIGHTINGS}"
            )
        if not (is_finite_real(self.min_snr_gamma) and self.min_snr_gamma > 0):
            raise ValueError(f"ModelConfig.min_snr_gamma = {self.min_snr_gamma!r} must be finite and > 0")
        if not (is_finite_real(self.z_loss) and self.z_loss >= 0):
            raise ValueError(f"ModelConfig.z_loss = {self.z_loss!r} must be finite and >= 0")
        for name in ("qk_norm", "causal_only_images", "loss_after_dropped_caption"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r} must be true or false")
        if not (isinstance(self.caption_dropout, (int, float)) and 0.0 <= self.caption_dropout <= 1.0):
            raise ValueError(f"ModelConfig.caption_dropout = {self.caption_dropout!r} must be in [0, 1]")
        if not is_int(self.codebook_size) or self.codebook_size < 0:
            raise ValueError(f"ModelConfig.codebook_size = {self.codebook_size!r} must be an integer >= 0")

    # ---------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(8 * self.dim / 3 * self.ffn_dim_multiplier)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    @property
    def patches_per_image(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """Length of one flattened latent patch: C * k * k."""
        return self.latent_channels * self.patch_size**2

    @property
    def unet_downsample(self) -> int:
        """Spatial reduction of the U-Net down path (each level but the last halves H and W)."""
        return 2 ** (len(self.unet_channels) - 1)

    def transformer_params(self) -> int:
        """Parameters of the shared transformer blocks + final norm (no embeddings, heads or adapters)."""
        d, f = self.dim, self.ffn_hidden_dim
        per_layer = 4 * d * d + 3 * d * f + 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        return self.n_layers * per_layer + d

    def text_params(self) -> int:
        """Token embedding + untied LM head."""
        return 2 * self.vocab_size * self.dim

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unet_channels"] = list(self.unet_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown ModelConfig key {key!r}; valid keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed (unknown names rejected)."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})


# The toy ladder: width/depth grow together; dims chosen so head_dim stays 32..64.
_LADDER: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=128, n_layers=2, n_heads=4, ffn_multiple_of=32),
    "S": dict(dim=256, n_layers=4, n_heads=4, ffn_multiple_of=64),
    "M": dict(dim=512, n_layers=8, n_heads=8, ffn_multiple_of=128),
    "L": dict(dim=768, n_layers=14, n_heads=12, ffn_multiple_of=256, max_seq_len=1024),
}

# The paper's shapes (layers / width / heads), Llama-2 vocabulary and the paper's image geometry.
_PAPER_COMMON: dict[str, Any] = dict(
    vocab_size=32000,
    ffn_multiple_of=256,
    max_seq_len=4096,
    latent_channels=8,
    latent_size=32,
    patch_size=2,
)
_PAPER: dict[str, dict[str, Any]] = {
    "0.16B": dict(n_layers=16, dim=768, n_heads=12),
    "0.37B": dict(n_layers=24, dim=1024, n_heads=16),
    "0.76B": dict(n_layers=24, dim=1536, n_heads=24),
    "1.4B": dict(n_layers=24, dim=2048, n_heads=16),
    "7B": dict(n_layers=32, dim=4096, n_heads=32),
}

PRESETS: dict[str, dict[str, Any]] = {**_LADDER, **{k: {**_PAPER_COMMON, **v} for k, v in _PAPER.items()}}
LADDER_PRESETS: tuple[str, ...] = tuple(_LADDER)
PAPER_PRESETS: tuple[str, ...] = tuple(_PAPER)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset as a fresh ``ModelConfig``, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {list(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})


__all__ = [
    "ADAPTERS",
    "LADDER_PRESETS",
    "PAPER_PRESETS",
    "PATCH_SIZES",
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "PRESETS",
    "ModelConfig",
    "get_preset",
]
