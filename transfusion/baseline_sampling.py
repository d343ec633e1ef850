"""Sampling from the discrete baseline (``transfusion.baseline.DiscreteLM``) with the KV cache.

Text to image (``generate_images``): the prompt is ``<BOS> caption <BOI>``; exactly ``h * w`` codes are
drawn one at a time with the logits restricted to the codebook, then ``<EOI>`` is forced. Classifier-free
guidance (``cfg_scale != 1``) runs the conditional prompts and their unconditional twins in one batch;
the unconditional prompt is the caption-dropped form training saw (``<BOS> <BOI>``: the caption's content
tokens removed, its special tokens kept). Guided logits are ``u + s * (c - u)`` over the code logits
(equivalent to guiding log-probabilities: the two differ by a per-row constant), and the drawn code is
appended to both rows.

Image to text (``caption_images``): the prompt is the image-first form ``<BOS> <BOI> codes <EOI>``; text
tokens are drawn (greedy, temperature, top-k) from the text vocabulary without the special tokens that
cannot start or continue a caption (pad, bos, boi, eoi), until ``<EOS>`` or ``max_new_tokens``.

Prompts of different lengths are left-padded; padding positions are outside every document (empty
attention intervals) and RoPE positions count from each prompt's first real token, so a padded row
computes what it would compute alone. Every draw uses the caller's ``torch.Generator``, or, when a list
of generators is given (one per image / caption), row i draws only from generator i, so a row gets the
same samples alone or in any batch (up to float round-off of the batched matmuls; this is how
``transfusion generate`` seeds image i with ``--seed + i``). With ``temperature = 0`` decoding is greedy.
``recompute_logits`` runs the same rows without the cache (tests check it against the cached decode step
by step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from transfusion.baseline import DiscreteLM
from transfusion.layout import PAD, TEXT, AttentionLayout
from transfusion.model import KVCache
from transfusion.packing import SpecialTokens
from transfusion.value_checks import is_finite_real, is_int, is_real


@dataclass
class ImageSamples:
    """Result of ``generate_images``.

    Attributes:
        codes: (N, h, w) int64 codebook indices, every one in ``[0, codebook_size)``.
        tokens: (R, P + h*w + 1) every decoded row: left-padded prompt, code tokens, the forced ``<EOI>``.
            Rows ``N..2N-1`` are the unconditional twins when guidance is on (R = 2N), else R = N.
        pads: (R,) left padding of each row.
        prompt_len: P, the padded prompt length.
        step_logits: (h*w, R, vocab) float32 raw model logits each code was drawn from (``return_logits``).
    """

    codes: torch.Tensor
    tokens: torch.Tensor
    pads: torch.Tensor
    prompt_len: int
    step_logits: torch.Tensor | None = None


@dataclass
class CaptionSamples:
    """Result of ``caption_images``.

    Attributes:
        tokens: per image, the generated text ids (``<EOS>`` excluded).
        finished: per image, whether ``<EOS>`` was drawn within ``max_new_tokens``.
        sequences: (N, P + steps) prompt + drawn tokens; after a row's ``<EOS>``: ``special.pad``.
        prompt_len: P.
        step_logits: (steps, N, vocab) float32 raw model logits of every draw (``return_logits``).
    """

    tokens: list[list[int]]
    finished: list[bool]
    sequences: torch.Tensor
    prompt_len: int
    step_logits: torch.Tensor | None = None


# ====================================================================== small pieces
def check_sampling(temperature: float, top_k: int | None) -> None:
    if not is_real(temperature):
        raise ValueError(f"temperature = {temperature!r} must be a number >= 0")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature = {temperature!r} must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise ValueError(f"top_k = {top_k!r} must be None or a positive integer")


def sample_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One draw per row of (R, V) logits -> (R,) int64 column indices.

    ``temperature = 0``: argmax (first maximum on ties). Otherwise softmax(logits / temperature), keeping
    only the ``top_k`` largest logits when given. Entries at -inf are never drawn.
    """
    check_sampling(temperature, top_k)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    device = probs.device
    if generator is not None and generator.device != device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)


Generators = torch.Generator | Sequence[torch.Generator] | None


def check_generators(generator: Generators, rows: int) -> list[torch.Generator] | torch.Generator | None:
    """``generator`` as given (None or one generator for the batch), or as a list of one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (str, bytes)) or not isinstance(generator, Sequence):
        raise ValueError(
            f"generator must be a torch.Generator or a list of them; got {type(generator).__name__}"
        )
    gens = list(generator)
    if len(gens) != rows:
        raise ValueError(f"generator: got {len(gens)} generators for {rows} rows; pass one per row")
    for i, g in enumerate(gens):
        if not isinstance(g, torch.Generator):
            raise ValueError(f"generator[{i}] is a {type(g).__name__}, not a torch.Generator")
    return gens


def draw(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: list[torch.Generator] | torch.Generator | None,
) -> torch.Tensor:
    """``sample_token`` on (R, V) logits with one generator for all rows, or row i from ``generator[i]``."""
    if generator is None or isinstance(generator, torch.Generator):
        return sample_token(logits, temperature, top_k, generator)
    if temperature == 0:
        return sample_token(logits, 0.0, top_k)
    return torch.cat(
        [sample_token(logits[i : i + 1], temperature, top_k, g) for i, g in enumerate(generator)]
    )


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, P) int64 prompts right-aligned after ``pad_id`` padding, and (R,) pad counts."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    pads = torch.tensor([P - len(p) for p in prompts], dtype=torch.long)
    for r, p in enumerate(prompts):
        tokens[r, P - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    return tokens.to(device), pads.to(device)


def decode_layout(pads: torch.Tensor, start: int, end: int) -> AttentionLayout:
    """Causal layout of queries ``start .. end-1`` over keys ``0 .. end-1``: row r's document starts at
    ``pads[r]``, the positions before it are padding."""
    q = torch.arange(start, end, dtype=torch.int32, device=pads.device)[None]
    p = pads.to(torch.int32)[:, None]
    real = q >= p
    lo = torch.where(real, p, q)
    hi = torch.where(real, q, q - 1)
    return AttentionLayout(
        lo=lo,
        hi=hi,
        doc_id=torch.where(real, 0, -1).to(torch.int32),
        image_id=torch.full_like(lo, -1),
        modality=torch.where(real, TEXT, PAD).to(torch.int8),
        image_spans=((),) * len(pads),
        kv_len=int(end),
    )


def decode_positions(pads: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(R, end - start) RoPE positions counted from each row's first real token (0 on padding)."""
    q = torch.arange(start, end, device=pads.device)[None]
    return (q - pads[:, None]).clamp_min(0)


def _step(
    model: DiscreteLM, tokens: torch.Tensor, pads: torch.Tensor, start: int, cache: KVCache
) -> torch.Tensor:
    """Run positions ``start .. start + L - 1`` through the cached model; (R, V) logits of the last one."""
    end = start + tokens.shape[1]
    logits = model.logits(
        tokens, decode_layout(pads, start, end), decode_positions(pads, start, end), cache=cache, check=False
    )
    return logits[:, -1].float()


@torch.no_grad()
def recompute_logits(model: DiscreteLM, tokens: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
    """(R, L, V) float32 logits of left-padded rows, recomputed from scratch (no cache)."""
    L = tokens.shape[1]
    return model.logits(tokens, decode_layout(pads, 0, L), decode_positions(pads, 0, L)).float()


def _model_device(model: DiscreteLM) -> torch.device:
    return next(model.parameters()).device


def _check_prompt_ids(name: str, ids: Sequence[int], model: DiscreteLM) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, torch.Tensor)):
        raise ValueError(f"{name} must be a list of token ids; got {type(ids).__name__}")
    out = [int(x) for x in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    bad = [x for x in out if not 0 <= x < model.text_vocab]
    if bad:
        raise ValueError(f"{name}: token id {bad[0]} is outside the text vocabulary [0, {model.text_vocab})")
    return out


# ====================================================================== text to image
@torch.no_grad()
def generate_images(
    model: DiscreteLM,
    captions: Sequence[Sequence[int]],
    *,
    special: SpecialTokens | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: Generators = None,
    grid: tuple[int, int] | None = None,
    return_logits: bool = False,
) -> ImageSamples:
    """Draw one code grid per caption (see the module docstring).

    Args:
        captions: per image, the caption's text token ids (no ``<BOS>``/``<BOI>``; may be empty).
        cfg_scale: guidance scale s (guided = u + s (c - u)); 1 turns guidance off (no unconditional rows).
        temperature, top_k: code sampling; ``temperature = 0`` is greedy.
        generator: drives every draw (seed it for reproducible samples); a list of one generator per
            caption: image i draws from generator i only.
        grid: (h, w) codes per image; default ``(cfg.latent_size, cfg.latent_size)``.
        return_logits: keep the raw logits of every step in the result.
    """
    special = special or SpecialTokens()
    cfg, vocab = model.cfg, model.vocab
    vocab.check_special(special)
    check_sampling(temperature, top_k)
    if not is_finite_real(cfg_scale):
        raise ValueError(f"cfg_scale = {cfg_scale!r} must be a finite number (1: no guidance)")
    if isinstance(captions, (str, torch.Tensor)) or not isinstance(captions, Sequence) or not captions:
        raise ValueError("captions must be a non-empty list of token id lists")
    h, w = grid if grid is not None else (cfg.latent_size, cfg.latent_size)
    if any(not is_int(x) or x <= 0 for x in (h, w)):
        raise ValueError(f"grid = {grid!r} must be two positive integers (h, w)")
    n_codes = h * w
    keep = special.ids()
    cond: list[list[int]] = []
    uncond: list[list[int]] = []
    for i, caption in enumerate(captions):
        ids = _check_prompt_ids(f"captions[{i}]", caption, model)
        prompt = [special.bos, *ids, special.boi]
        total = len(prompt) + n_codes + 1
        if total > cfg.max_seq_len:
            raise ValueError(
                f"captions[{i}] has {len(ids)} tokens: prompt ({len(prompt)}) + {h}x{w} codes + <EOI> = "
                f"{total} tokens exceeds ModelConfig.max_seq_len = {cfg.max_seq_len}"
            )
        cond.append(prompt)
        uncond.append([special.bos, *[x for x in ids if x in keep], special.boi])
    guided = cfg_scale != 1.0
    N = len(cond)
    gens = check_generators(generator, N)
    device = _model_device(model)
    tokens, pads = left_pad(cond + uncond if guided else cond, special.pad, device)
    R, P = tokens.shape

    cache = KVCache(cfg.n_layers)
    logits = _step(model, tokens, pads, 0, cache)
    codes = torch.empty(N, n_codes, dtype=torch.long, device=device)
    kept: list[torch.Tensor] = []
    for s in range(n_codes):
        if return_logits:
            kept.append(logits.clone())
        code_logits = logits[:, vocab.code_start : vocab.code_end]
        if guided:
            c, u = code_logits[:N], code_logits[N:]
            code_logits = u + cfg_scale * (c - u)
        codes[:, s] = draw(code_logits, temperature, top_k, gens)
        if s + 1 < n_codes:
            nxt = (codes[:, s] + vocab.code_start).repeat(R // N)[:, None]
            logits = _step(model, nxt, pads, P + s, cache)

    eoi = torch.full((R, 1), special.eoi, dtype=torch.long, device=device)
    all_tokens = torch.cat([tokens, (codes + vocab.code_start).repeat(R // N, 1), eoi], dim=1)
    return ImageSamples(
        codes=codes.view(N, h, w),
        tokens=all_tokens,
        pads=pads,
        prompt_len=P,
        step_logits=torch.stack(kept) if return_logits else None,
    )


# ====================================================================== image to text
@torch.no_grad()
def caption_images(
    model: DiscreteLM,
    codes: torch.Tensor,
    *,
    special: SpecialTokens | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: Generators = None,
    text_vocab: int | None = None,
    return_logits: bool = False,
    min_new_tokens: int = 0,
) -> CaptionSamples:
    """Caption each (h, w) code grid of ``codes`` (N, h, w) (see the module docstring).

    ``text_vocab``: draw only ids below it (pass the tokenizer's ``vocab_size`` when the model's text
    vocabulary is larger); default: the model's whole text vocabulary. ``min_new_tokens``: ``<EOS>`` is not
    drawn before this many tokens (1: no empty caption). ``generator``: one for the batch, or
    a list of one per image (image i draws from generator i only).
    """
    special = special or SpecialTokens()
    cfg, vocab = model.cfg, model.vocab
    vocab.check_special(special)
    check_sampling(temperature, top_k)
    if not is_int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens!r} must be a positive integer")
    if not is_int(min_new_tokens) or not (0 <= min_new_tokens <= max_new_tokens):
        raise ValueError(f"min_new_tokens = {min_new_tokens!r} must be an integer in [0, {max_new_tokens}]")
    limit = vocab.text_vocab if text_vocab is None else text_vocab
    if not is_int(limit) or not special.eos < limit <= vocab.text_vocab:
        raise ValueError(
            f"text_vocab = {text_vocab!r} must be an integer in ({special.eos}, {vocab.text_vocab}] (it must "
            "keep <EOS>)"
        )
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.shape[0] == 0:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be an integer tensor (N >= 1, h, w); got {shape}")
    device = _model_device(model)
    code_tokens = vocab.codes_to_tokens(codes, "codes").to(device).flatten(1)
    N, n_codes = code_tokens.shape
    gens = check_generators(generator, N)
    P = n_codes + 3
    if P + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"codes of shape {tuple(codes.shape)} make a prompt of {P} tokens (<BOS> <BOI> {n_codes} codes "
            f"<EOI>); with max_new_tokens = {max_new_tokens} that is {P + max_new_tokens} tokens, over "
            f"ModelConfig.max_seq_len = {cfg.max_seq_len}"
        )
    col = lambda t: torch.full((N, 1), t, dtype=torch.long, device=device)
    tokens = torch.cat([col(special.bos), col(special.boi), code_tokens, col(special.eoi)], dim=1)
    pads = torch.zeros(N, dtype=torch.long, device=device)
    banned = torch.zeros(vocab.size, dtype=torch.bool, device=device)
    banned[limit:] = True
    for t in (special.pad, special.bos, special.boi, special.eoi, special.image):
        if t != special.eos:
            banned[t] = True

    banned_early = banned.clone()
    banned_early[special.eos] = True
    cache = KVCache(cfg.n_layers)
    logits = _step(model, tokens, pads, 0, cache)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    drawn: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    for s in range(max_new_tokens):
        if return_logits:
            kept.append(logits.clone())
        now = banned_early if s < min_new_tokens else banned
        tok = draw(logits.masked_fill(now, float("-inf")), temperature, top_k, gens)
        tok = torch.where(finished, special.pad, tok)
        drawn.append(tok)
        finished |= tok == special.eos
        if bool(finished.all()) or s + 1 == max_new_tokens:
            break
        logits = _step(model, tok[:, None], pads, P + s, cache)

    new = torch.stack(drawn, dim=1)
    texts: list[list[int]] = []
    done: list[bool] = []
    for row in new.tolist():
        if special.eos in row:
            texts.append(row[: row.index(special.eos)])
            done.append(True)
        else:
            texts.append(row)
            done.append(False)
    return CaptionSamples(
        tokens=texts,
        finished=done,
        sequences=torch.cat([tokens, new], dim=1),
        prompt_len=P,
        step_logits=torch.stack(kept) if return_logits else None,
    )


__all__ = [
    "CaptionSamples",
    "ImageSamples",
    "caption_images",
    "check_generators",
    "check_sampling",
    "decode_layout",
    "decode_positions",
    "draw",
    "generate_images",
    "left_pad",
    "recompute_logits",
    "sample_token",
]
