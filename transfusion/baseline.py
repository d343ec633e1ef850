"""The discrete-token baseline ("Chameleon", paper section 4.1): images as VQ codes in one causal LM.

Vocabulary. The text vocabulary (``ModelConfig.vocab_size`` ids, special tokens included) is followed by
the VQ codebook: image code ``c`` is token ``text_vocab + c``. ``DiscreteVocab`` holds the two sizes and
the mapping; the model's embedding table and LM head have ``text_vocab + codebook_size`` rows, so the
same size presets (and the same text tokenizer) serve both families.

Documents. An image is ``<BOI> code_1 .. code_{h*w} <EOI>`` with the codes in raster order, so a
caption-first pair reads ``<BOS> caption <BOI> codes <EOI> <EOS>`` and an image-first one
``<BOS> <BOI> codes <EOI> caption <EOS>``, exactly Transfusion's layout with codes where Transfusion has
latent patches. ``pack_discrete_documents`` takes documents whose image segments are integer code grids
``(h, w)`` and packs them with ``transfusion.packing.pack_documents`` (images become token segments), after
applying caption dropout with ``packing.apply_caption_dropout`` (same rule, same random draws as
Transfusion's packing). ``DiscreteStream`` is ``training_data.MixedModalStream`` over (caption, codes) pairs:
same example order, same caption-first / image-first draws (80% / 20%), same caption dropout draws as a
Transfusion stream with the same seed.

Attention is causal everywhere (no image spans in the layout; documents still do not see each other).

Targets (one causal LM loss, mean over target tokens): every position predicts the next token of its
document, except that ``<EOI>`` is not a target (it is forced after the ``h*w``-th code at sampling time),
mirroring Transfusion's LM targets. The loss is split for logging into ``text_loss`` (targets outside the
codebook: text, ``<BOI>``, ``<EOS>``, the token after ``<EOI>``; the same targets as Transfusion's
``lm_loss``) and ``image_loss`` (code targets). ``lm_loss`` is ``loss`` and ``diffusion_loss`` is 0, so
metrics files have Transfusion's columns.

FLOPs: the same accounting as Transfusion (``transfusion.flops``) with the enlarged vocabulary: only
positions with a target go through the LM head, and ``discrete_analytic_step_flops`` is
``analytic_step_flops`` on a config whose ``vocab_size`` is the full vocabulary. ``FlopCounterMode``
measures ``model(batch).loss.backward()`` as for Transfusion.

Sampling (text to image with classifier-free guidance, image to text) is in
``transfusion.baseline_sampling``; ``transfusion.generation``'s ``text_to_image`` / ``caption`` and
``transfusion generate`` dispatch to it for a ``DiscreteLM``.

Training is ``transfusion.train``'s "discrete" family (``transfusion train --model discrete``): a quick VQ
autoencoder (or a saved one) gives the codes, its codebook size becomes ``ModelConfig.codebook_size``, and
the loop, optimizer, checkpoints, metrics and FLOPs accounting are Transfusion's. Chameleon's
stabilisers, QK-norm (``ModelConfig.qk_norm``) and the z-loss (``ModelConfig.z_loss``,
``transfusion.z_loss``), are supported but off by default, as for Transfusion, so that switching the
family changes nothing else in a run's configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from transfusion.config import ModelConfig
from transfusion.flops import FlopEstimate, analytic_step_flops
from transfusion.layout import AttentionLayout
from transfusion.model import KVCache, Transformer
from transfusion.packing import (
    IGNORE_INDEX,
    PackedBatch,
    SpecialTokens,
    apply_caption_dropout,
    pack_documents,
    text_ids,
)
from transfusion.training_data import MixedModalStream, StreamConfig, document_for
from transfusion.value_checks import is_int
from transfusion.z_loss import z_loss


# ====================================================================== vocabulary
@dataclass(frozen=True)
class DiscreteVocab:
    """Text ids ``[0, text_vocab)`` followed by the codebook ``[text_vocab, text_vocab + codebook_size)``."""

    text_vocab: int
    codebook_size: int

    def __post_init__(self) -> None:
        for name in ("text_vocab", "codebook_size"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} = {value!r} must be a positive integer")

    @property
    def size(self) -> int:
        """Total vocabulary: rows of the embedding table and of the LM head."""
        return self.text_vocab + self.codebook_size

    @property
    def code_start(self) -> int:
        return self.text_vocab

    @property
    def code_end(self) -> int:
        """One past the last code token."""
        return self.text_vocab + self.codebook_size

    def check_codes(self, codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
        """``codes`` as int64, checked to be integers inside the codebook (ValueError names ``name``)."""
        if not isinstance(codes, torch.Tensor):
            codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"{name}: codebook indices must be an integer tensor; got {codes.dtype}")
        if codes.numel():
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.codebook_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name}: code {bad} is outside the codebook [0, codebook_size = {self.codebook_size})"
                )
        return codes.long()

    def codes_to_tokens(self, codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
        """Codebook indices -> token ids (same shape)."""
        return self.check_codes(codes, name) + self.text_vocab

    def tokens_to_codes(self, tokens: torch.Tensor, name: str = "tokens") -> torch.Tensor:
        """Code token ids -> codebook indices (same shape); any non-code token raises ValueError."""
        tokens = torch.as_tensor(tokens)
        if tokens.numel() and not bool(self.is_code(tokens).all()):
            bad = int(tokens[~self.is_code(tokens)].reshape(-1)[0])
            raise ValueError(
                f"{name}: token {bad} is not an image code token [{self.code_start}, {self.code_end})"
            )
        return tokens.long() - self.text_vocab

    def is_code(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask of the code tokens."""
        return (tokens >= self.code_start) & (tokens < self.code_end)

    def image_tokens(self, codes: torch.Tensor, special: SpecialTokens, name: str = "codes") -> list[int]:
        """``[<BOI>, code tokens of the (h, w) grid in raster order, <EOI>]``."""
        return [special.boi, *self.codes_to_tokens(codes, name).reshape(-1).tolist(), special.eoi]

    def check_special(self, special: SpecialTokens) -> None:
        for field_name in ("pad", "bos", "eos", "boi", "eoi", "image"):
            value = getattr(special, field_name)
            if not 0 <= value < self.text_vocab:
                raise ValueError(
                    f"special.{field_name} = {value} is outside the text vocabulary [0, text_vocab = "
                    f"{self.text_vocab})"
                )


def resolve_codebook_size(cfg: ModelConfig, codebook_size: int | None = None) -> int:
    """The codebook size from the argument or ``cfg.codebook_size`` (when the config has that field)."""
    from_cfg = getattr(cfg, "codebook_size", None) or None
    if codebook_size is None:
        codebook_size = from_cfg
    elif from_cfg is not None and from_cfg != codebook_size:
        raise ValueError(
            f"codebook_size = {codebook_size} differs from ModelConfig.codebook_size = {from_cfg}"
        )
    if not is_int(codebook_size) or codebook_size <= 0:
        raise ValueError(
            f"codebook_size = {codebook_size!r} must be a positive integer (pass it, or set "
            "ModelConfig.codebook_size)"
        )
    return codebook_size


def vocab_for(cfg: ModelConfig, codebook_size: int | None = None) -> DiscreteVocab:
    """The discrete vocabulary of a model config: ``cfg.vocab_size`` text ids, then the codebook."""
    return DiscreteVocab(cfg.vocab_size, resolve_codebook_size(cfg, codebook_size))


# ====================================================================== packing
def _is_code_grid(seg: object) -> bool:
    return (
        isinstance(seg, torch.Tensor)
        and seg.dim() == 2
        and not (seg.is_floating_point() or seg.is_complex() or seg.dtype == torch.bool)
    )


def _text_ids(where: str, seg: object, vocab: DiscreteVocab) -> list[int]:
    if isinstance(seg, torch.Tensor) and seg.is_floating_point():
        raise ValueError(
            f"{where}: a float tensor of shape {tuple(seg.shape)}; the discrete baseline takes images "
            "as integer code grids (h, w), not continuous latents"
        )
    ids = text_ids(where, seg, image_kind="an integer (h, w) code grid")
    bad = [x for x in ids if not 0 <= x < vocab.text_vocab]
    if bad:
        raise ValueError(
            f"{where}: token id {bad[0]} is outside the text vocabulary [0, text_vocab = {vocab.text_vocab}) "
            "(image codes go in (h, w) code grids)"
        )
    return ids


def discrete_documents(
    documents: Sequence[Sequence[Any]],
    vocab: DiscreteVocab,
    special: SpecialTokens,
    caption_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[list[list[list[int]]], list[bool], list[bool]]:
    """Documents with code-grid images -> token-only documents (one segment per input segment).

    Applies caption dropout exactly as ``pack_documents`` does (same rule, same random draws in the same
    order). Returns (documents, image_first per image, caption_dropped per image), images in input order.
    """
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout = {caption_dropout} must be in [0, 1]")
    vocab.check_special(special)
    keep = special.ids()
    out: list[list[list[int]]] = []
    all_first: list[bool] = []
    all_dropped: list[bool] = []
    for d, doc in enumerate(documents):
        if isinstance(doc, (torch.Tensor, str)) or not isinstance(doc, Sequence):
            raise ValueError(f"documents[{d}] must be a list of segments; got {type(doc).__name__}")
        segs: list[list[int] | torch.Tensor] = []
        grids: dict[int, torch.Tensor] = {}
        for j, seg in enumerate(doc):
            where = f"documents[{d}][{j}]"
            if _is_code_grid(seg):
                grids[j] = vocab.check_codes(seg, where)
                # apply_caption_dropout recognises images as float tensors: a stand-in marks the spot.
                segs.append(torch.empty(0))
            else:
                segs.append(_text_ids(where, seg, vocab))
        firsts: list[bool] = []
        seen_content = False
        for j, seg in enumerate(segs):
            if j in grids:
                firsts.append(not seen_content)
            else:
                seen_content = seen_content or any(x not in keep for x in seg)
        segs, dropped = apply_caption_dropout(segs, firsts, caption_dropout, special, generator)
        out.append(
            [vocab.image_tokens(grids[j], special) if j in grids else list(seg) for j, seg in enumerate(segs)]
        )
        all_first.extend(firsts)
        all_dropped.extend(dropped)
    return out, all_first, all_dropped


def pack_discrete_documents(
    documents: Sequence[Sequence[Any]],
    seq_len: int,
    vocab: DiscreteVocab,
    special: SpecialTokens | None = None,
    caption_dropout: float = 0.0,
    generator: torch.Generator | None = None,
    num_rows: int | None = None,
    loss_after_dropped_caption: bool = True,
) -> PackedBatch:
    """Pack documents for ``DiscreteLM`` (see the module docstring).

    Args:
        documents: each a list of segments: text token ids (list or 1-D integer tensor, ids in
            ``[0, text_vocab)``) or images as integer code grids ``(h, w)`` with codes in
            ``[0, codebook_size)``; ``training_data.document_for(caption, codes, caption_first, special)``
            builds the training recipe's documents.
        seq_len, num_rows: as for ``pack_documents``.
        caption_dropout, generator: caption dropout for classifier-free guidance, as for ``pack_documents``.
        loss_after_dropped_caption: as for ``pack_documents``.

    Returns a ``PackedBatch`` without continuous images (``num_images == 0``; causal layout) whose tokens
    hold the code tokens and whose LM targets exclude ``<EOI>``. Errors name the document and segment.
    """
    special = special or SpecialTokens()
    if len(documents) == 0:
        raise ValueError("documents is empty; nothing to pack")
    docs, _, dropped = discrete_documents(documents, vocab, special, caption_dropout, generator)
    batch = pack_documents(
        docs, seq_len, patch_size=1, special=special, vocab_size=vocab.size, num_rows=num_rows
    )
    # an image's last code: a code followed by <EOI> (text may hold the <EOI> id, never after a code)
    last_code = torch.zeros_like(batch.lm_mask)
    last_code[:, :-1] = vocab.is_code(batch.tokens[:, :-1]) & (batch.tokens[:, 1:] == special.eoi)
    # <EOI> after the last code is forced at sampling time: no loss on it (as in Transfusion).
    drop = last_code.clone()
    if not loss_after_dropped_caption:
        # no loss at the <EOI> of a caption-dropped image (its target is the token after it); each
        # document's images in order, as ``dropped`` lists them
        flags = iter(dropped)
        for r, s, e in batch.doc_spans:
            for p in (s + torch.nonzero(last_code[r, s:e]).flatten()).tolist():
                if next(flags):
                    drop[r, p + 1] = True
    lm_mask = batch.lm_mask & ~drop
    lm_targets = torch.where(lm_mask, batch.lm_targets, IGNORE_INDEX)
    return replace(batch, lm_targets=lm_targets, lm_mask=lm_mask)


def discrete_target_counts(batch: PackedBatch, vocab: DiscreteVocab) -> tuple[int, int]:
    """(text targets, image-code targets) of a packed discrete batch (the two loss parts' token counts)."""
    targets = batch.lm_targets[batch.lm_mask]
    n_image = int(vocab.is_code(targets).sum())
    return int(targets.numel()) - n_image, n_image


class DiscreteStream(MixedModalStream):
    """``MixedModalStream`` over (caption ids, code grid) pairs, packed with ``pack_discrete_documents``.

    Example order, caption-first / image-first draws and caption dropout draws are those of a Transfusion
    ``MixedModalStream`` with the same captions, seed and document lengths (``config.patch_size`` must be
    1: one position per code): only the ``document`` and ``pack`` hooks differ. ``state_dict`` /
    ``load_state_dict`` / ``batch_at`` work the same way.

    Args:
        captions: token ids of every example's caption (no special tokens), ids in ``[0, text_vocab)``.
        codes: (n, h, w) integer codebook indices, one grid per caption.
        config: the stream recipe; ``patch_size`` must be 1.
        vocab: the text / codebook split of the model's vocabulary.
        special: special token ids (the tokenizer's).
    """

    def __init__(
        self,
        captions: Sequence[Sequence[int]],
        codes: torch.Tensor,
        config: StreamConfig,
        vocab: DiscreteVocab,
        special: SpecialTokens | None = None,
    ) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes must be an integer tensor (n, h, w); got {shape}")
        codes = vocab.check_codes(codes, "codes").cpu().contiguous()
        if config.patch_size != 1:
            raise ValueError(
                f"config.patch_size = {config.patch_size}: a discrete stream has one position per code; "
                "use patch_size=1"
            )
        n, h, w = codes.shape
        # The parent only needs the per-image position count (h * w) from its latents argument; give it a
        # zero-stride stand-in and keep the codes.
        super().__init__(captions, torch.zeros(()).expand(n, 1, h, w), config, special, vocab.text_vocab)
        vocab.check_special(self.special)
        self.latents = torch.zeros(0, 1, h, w)
        self.codes = codes
        self.vocab = vocab

    def document(self, i: int):
        index, caption_first = self.example(i)
        return document_for(self.captions[index], self.codes[index], caption_first, self.special)

    def pack(self, docs: list, generator: torch.Generator) -> PackedBatch:
        return pack_discrete_documents(
            docs,
            seq_len=self.config.seq_len,
            vocab=self.vocab,
            special=self.special,
            caption_dropout=self.config.caption_dropout,
            generator=generator,
            num_rows=self.config.batch_rows,
            loss_after_dropped_caption=self.config.loss_after_dropped_caption,
        )


# ====================================================================== the model
@dataclass
class DiscreteOutput:
    """Losses of one forward pass (columns shared with ``TransfusionOutput``)."""

    loss: torch.Tensor  # mean cross-entropy over every target token (+ cfg.z_loss * z_loss)
    lm_loss: torch.Tensor  # the mean cross-entropy (== loss without z-loss)
    diffusion_loss: torch.Tensor  # always 0 (no continuous images)
    text_loss: torch.Tensor  # detached: mean over targets outside the codebook (0 when there are none)
    image_loss: torch.Tensor  # detached: mean over code targets (0 when there are none)
    n_lm_tokens: int
    n_text_tokens: int
    n_image_tokens: int
    n_images: int = 0  # continuous images (always 0; images are code tokens here)
    hidden: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None  # mean logsumexp^2 of the LM logits, when cfg.z_loss > 0

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "lm_loss": float(self.lm_loss.detach()),
            "diffusion_loss": float(self.diffusion_loss.detach()),
            "text_loss": float(self.text_loss),
            "image_loss": float(self.image_loss),
        }


class DiscreteLM(nn.Module):
    """Token embedding + the shared ``Transformer`` + an untied LM head over text ids and VQ codes.

    Args:
        cfg: the model config; ``cfg.vocab_size`` is the TEXT vocabulary (as for Transfusion), the model's
            vocabulary is ``cfg.vocab_size + codebook_size``. ``cfg.qk_norm`` turns on QK-norm.
            Image-adapter and diffusion fields are unused.
        codebook_size: VQ codebook entries; default ``cfg.codebook_size`` when the config has that field.
    """

    def __init__(self, cfg: ModelConfig, codebook_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab = vocab_for(cfg, codebook_size)
        V = self.vocab.size
        self.tok_emb = nn.Embedding(V, cfg.dim)
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.dim, V, bias=False)  # untied from tok_emb
        nn.init.normal_(self.tok_emb.weight, std=cfg.init_std)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    @property
    def codebook_size(self) -> int:
        return self.vocab.codebook_size

    @property
    def text_vocab(self) -> int:
        return self.vocab.text_vocab

    def flop_config(self) -> ModelConfig:
        """``cfg`` with ``vocab_size`` = the full vocabulary: what ``transfusion.flops`` should count."""
        return self.cfg.replace(vocab_size=self.vocab.size)

    # ------------------------------------------------------------------ checks
    def check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = (
                f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens)
            )
            raise ValueError(f"{name} must be a (B, L) integer tensor; got {got}")
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.vocab.size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name}: id {bad} is outside [0, vocab_size = {self.vocab.size}) (text "
                    f"{self.vocab.text_vocab} + codebook {self.vocab.codebook_size})"
                )

    def validate(self, batch: PackedBatch) -> None:
        """Raise ValueError (naming the field and value) on any bad input; runs no model compute."""
        self.check_tokens(batch.tokens)
        B, L = batch.tokens.shape
        if L > self.cfg.max_seq_len:
            raise ValueError(
                f"tokens: sequence length {L} exceeds ModelConfig.max_seq_len = {self.cfg.max_seq_len}"
            )
        layout = batch.layout
        if (layout.batch_size, layout.q_len, layout.kv_len) != (B, L, L):
            raise ValueError(
                f"layout is (batch={layout.batch_size}, q_len={layout.q_len}, kv_len={layout.kv_len}); "
                f"tokens are ({B}, {L})"
            )
        if batch.num_images or any(layout.image_spans):
            raise ValueError(
                f"batch holds {max(batch.num_images, sum(map(len, layout.image_spans)))} continuous images; "
                "DiscreteLM takes images as code tokens (pack them with pack_discrete_documents)"
            )
        if tuple(batch.lm_targets.shape) != (B, L) or tuple(batch.lm_mask.shape) != (B, L):
            raise ValueError(
                f"lm_targets {tuple(batch.lm_targets.shape)} / lm_mask {tuple(batch.lm_mask.shape)} must be "
                f"({B}, {L}) like tokens"
            )
        targets = batch.lm_targets[batch.lm_mask]
        if targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= self.vocab.size:
                raise ValueError(f"lm_targets: id {lo if lo < 0 else hi} is outside [0, {self.vocab.size})")

    # ------------------------------------------------------------------ pieces (also used by sampling)
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(tokens)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def run_transformer(
        self,
        x: torch.Tensor,
        layout: AttentionLayout,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        commit: bool = True,
    ) -> torch.Tensor:
        return self.transformer(x, layout, positions=positions, cache=cache, commit=commit)

    def logits(
        self,
        tokens: torch.Tensor,
        layout: AttentionLayout,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        commit: bool = True,
        check: bool = True,
    ) -> torch.Tensor:
        """(B, L) token ids -> (B, L, vocab.size) logits; ``layout``/``cache`` as for ``Transformer``."""
        if check:
            self.check_tokens(tokens)
        hidden = self.run_transformer(self.embed(tokens), layout, positions, cache, commit)
        return self.lm_logits(hidden)

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: PackedBatch, return_hidden: bool = False) -> DiscreteOutput:
        """The LM loss on a batch from ``pack_discrete_documents`` (split into text / image parts)."""
        self.validate(batch)
        hidden = self.run_transformer(self.embed(batch.tokens), batch.layout, positions=batch.positions)
        flat = hidden.reshape(-1, hidden.shape[-1])
        # Only positions with a target go through the LM head (as in Transfusion; FLOPs count the same).
        mask = batch.lm_mask.reshape(-1)
        targets = batch.lm_targets.reshape(-1)[mask]
        n_lm = int(targets.numel())
        zero = flat.sum() * 0.0
        z = None
        if n_lm:
            logits = self.lm_head(flat[mask])
            per_token = F.cross_entropy(logits.float(), targets, reduction="none")
            loss = per_token.mean()
            if self.cfg.z_loss > 0:
                z = z_loss(logits)
            is_image = self.vocab.is_code(targets)
            n_image = int(is_image.sum())
            with torch.no_grad():
                part = per_token.detach()
                text_loss = part[~is_image].mean() if n_image < n_lm else zero.detach()
                image_loss = part[is_image].mean() if n_image else zero.detach()
        else:
            loss, n_image = zero, 0
            text_loss = image_loss = zero.detach()
            if self.cfg.z_loss > 0:
                z = zero
        return DiscreteOutput(
            loss=loss if z is None else loss + self.cfg.z_loss * z,
            lm_loss=loss,
            diffusion_loss=zero.detach(),
            text_loss=text_loss,
            image_loss=image_loss,
            n_lm_tokens=n_lm,
            n_text_tokens=n_lm - n_image,
            n_image_tokens=n_image,
            hidden=hidden if return_hidden else None,
            z_loss=z,
        )

    def num_params(self) -> dict[str, int]:
        """Parameter counts by part (``image_tokens``: the codebook rows of the embedding and LM head)."""
        count = lambda m: sum(p.numel() for p in m.parameters())
        image_rows = 2 * self.vocab.codebook_size * self.cfg.dim
        parts = {
            "transformer": count(self.transformer),
            "text": count(self.tok_emb) + count(self.lm_head) - image_rows,
            "image_tokens": image_rows,
            "adapter": 0,
        }
        parts["total"] = sum(parts.values())
        return parts


def discrete_analytic_step_flops(
    cfg: ModelConfig, batch: PackedBatch, codebook_size: int | None = None, training: bool = True
) -> FlopEstimate:
    """Analytic FLOPs of one ``DiscreteLM`` step: Transfusion's accounting with the full vocabulary."""
    full = cfg.replace(vocab_size=vocab_for(cfg, codebook_size).size)
    return analytic_step_flops(full, batch, training=training)


__all__ = [
    "DiscreteLM",
    "DiscreteOutput",
    "DiscreteStream",
    "DiscreteVocab",
    "discrete_analytic_step_flops",
    "discrete_documents",
    "discrete_target_counts",
    "pack_discrete_documents",
    "resolve_codebook_size",
    "vocab_for",
]
