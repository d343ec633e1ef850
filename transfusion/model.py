"""The shared transformer: Llama-style blocks (RMSNorm, SwiGLU, RoPE, no biases, optional QK-norm).

It consumes already-embedded inputs ``x (B, L, dim)`` and an ``AttentionLayout`` and returns the final
normed hidden states; the two model families (Transfusion, the discrete baseline) own embeddings and
output heads. Every attention layer calls ``attend(q, k, v, layout, backend=cfg.attention)``, so the
layout alone decides who attends to whom.

Decoding: pass a ``KVCache``. Keys/values of earlier positions are read from it and the new ones are
appended (``commit=True``) or only used for this call (``commit=False``, e.g. the diffusion steps of an
image that reuse the text prefix's cache). The layout then covers the new queries only
(``layout.queries(start)``), with ``kv_len`` = cached length + new length.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.attention import attend
from transfusion.config import ModelConfig
from transfusion.layout import AttentionLayout


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 training does not lose the mean square.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.to(x.dtype) * self.weight


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, 1, L, head_dim/2) for integer positions (B, L)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.float()[..., None] * inv_freq  # (B, L, head_dim/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... of the head dim; x is (B, H, L, D)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class KVCache:
    """Per-layer keys and values of the positions decoded so far: (B, H, L_cached, D) each."""

    def __init__(self, n_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        k, v = self.k[layer], self.v[layer]
        return None if k is None else (k, v)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new positions' keys/values after the cached ones."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v

    def truncate(self, length: int) -> None:
        """Drop cached positions at and after ``length`` (e.g. to re-decode an image's positions)."""
        for i in range(len(self.k)):
            if self.k[i] is not None:
                self.k[i] = self.k[i][:, :, :length]
                self.v[i] = self.v[i][:, :, :length]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.backend = cfg.n_heads, cfg.head_dim, cfg.attention
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        layout: AttentionLayout,
        rope: tuple[torch.Tensor, torch.Tensor],
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, L, dim) -> (out (B, L, dim), (k, v) of these L positions, after RoPE).

        ``past`` holds earlier positions' (k, v); they are prepended before attending.
        """
        B, L, _ = x.shape
        q, k, v = (
            w(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new_kv = (k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = attend(q, k, v, layout, backend=self.backend)
        return self.wo(out.transpose(1, 2).reshape(B, L, -1)), new_kv


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.ffn_hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        layout: AttentionLayout,
        rope: tuple[torch.Tensor, torch.Tensor],
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        h, new_kv = self.attn(self.attn_norm(x), layout, rope, past)
        x = x + h
        return x + self.ffn(self.ffn_norm(x)), new_kv


class Transformer(nn.Module):
    """Stack of pre-norm blocks + final RMSNorm. Input and output: (B, L, dim)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2 style: residual output projections scaled down by depth.
                scale = (2 * self.cfg.n_layers) ** -0.5 if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(
        self,
        x: torch.Tensor,
        layout: AttentionLayout,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        commit: bool = True,
    ) -> torch.Tensor:
        """x (B, L, dim) embedded inputs -> (B, L, dim) normed hidden states.

        Args:
            layout: covers the L queries; ``layout.kv_len`` = (cached length) + L.
            positions: (B, L) or (L,) integer RoPE positions; default: the queries' absolute row
                positions ``layout.q_offset .. layout.kv_len - 1``.
            cache: optional KV cache holding the first ``layout.q_offset`` positions.
            commit: whether to append this call's keys/values to ``cache``.
        """
        B, L, _ = x.shape
        if layout.q_len != L or layout.batch_size != B:
            raise ValueError(
                f"layout has (batch, q_len) = ({layout.batch_size}, {layout.q_len}); x is {tuple(x.shape)}"
            )
        cached = 0 if cache is None else len(cache)
        if cached != layout.q_offset:
            raise ValueError(
                f"layout expects {layout.q_offset} earlier positions but the KV cache holds {cached}"
            )
        if positions is None:
            positions = torch.arange(layout.q_offset, layout.kv_len, device=x.device)
        if positions.dim() == 1:
            positions = positions[None].expand(B, L)
        if tuple(positions.shape) != (B, L):
            raise ValueError(f"positions has shape {tuple(positions.shape)}; expected ({B}, {L}) or ({L},)")
        rope = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta)
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, layout, rope, None if cache is None else cache.past(i))
            if cache is not None and commit:
                cache.append(i, k, v)
        return self.norm(x)


__all__ = [
    "Attention",
    "Block",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "Transformer",
    "apply_rope",
    "rope_angles",
]
