"""The two uses of the decoder that evaluation needs: text-to-image and image-to-text (captioning).

Both build the documents training used (``transfusion.training_data.document_for``):

    text-to-image:  <BOS> caption <BOI>  -> the image is generated, then generation stops
    captioning:     <BOS> <BOI> image <EOI>  -> the caption is sampled until <EOS>

and call ``generate``. The unconditional prompt of classifier-free guidance is ``<BOS> <BOI>``, the
caption-dropped form of the first (see ``transfusion.generation.decoder``).

Both functions also take the discrete baseline (``transfusion.baseline.DiscreteLM``, dispatched on the
model's type) and then call ``transfusion.baseline_sampling``: ``text_to_image`` draws the ``h * w`` VQ codes
of each image (``generate_images``; ``guidance_scale`` is its ``cfg_scale``, None meaning 1 = no guidance;
``temperature`` / ``top_k`` apply to the codes; the diffusion settings ``scheduler``, ``num_steps``,
``timestep_spacing``, ``eta`` do not apply) and returns the (N, h, w) codes, or images decoded with the VQ
autoencoder's ``decode_codes``; ``caption`` takes (N, h, w) integer codes, or images encoded with
``autoencoder.encode_codes``, and samples text (``caption_images``, limited to the tokenizer's vocabulary).
Per-row generators follow ``row_generators``' rules for both families.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from transfusion.generation.decoder import generate
from transfusion.generation.sampling import SamplingConfig, row_generators
from transfusion.packing import SpecialTokens


def is_discrete(model) -> bool:
    """Whether ``model`` is the discrete baseline (``DiscreteLM``) rather than ``Transfusion``."""
    from transfusion.baseline import DiscreteLM

    return isinstance(getattr(model, "module", model), DiscreteLM)


def _special(tokenizer) -> SpecialTokens:
    if tokenizer is None:
        return SpecialTokens()
    return SpecialTokens.from_tokenizer(tokenizer)


def _vocab_limit(tokenizer) -> int | None:
    return None if tokenizer is None else int(tokenizer.vocab_size)


def text_to_image(
    model,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer=None,
    autoencoder=None,
    generator: torch.Generator | Sequence[torch.Generator] | int | None = None,
    config: SamplingConfig | None = None,
    **options: Any,
) -> torch.Tensor:
    """One image per prompt.

    Args:
        prompts: captions as strings (needs ``tokenizer``) or token id lists (without ``<BOS>``; a leading
            ``<BOS>`` is not duplicated).
        autoencoder: when given (anything with ``decode(latents)``; for a discrete model a VQ autoencoder's
            ``decode_codes``), the latents (codes) are decoded.
        generator, config, options: as for ``generate`` (e.g. ``scheduler="ddim", num_steps=50,
            guidance_scale=3.0``).

    Returns (N, C, H, W) latents (a discrete model: (N, h, w) int64 codes), or (N, 3, H', W') images in
    [-1, 1] when ``autoencoder`` is given.
    """
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of captions (strings or token id lists)")
    special = _special(tokenizer)
    captions = [_caption_ids(i, p, tokenizer, special) for i, p in enumerate(prompts)]
    if is_discrete(model):
        return _discrete_text_to_image(
            model, captions, special, tokenizer, autoencoder, generator, config, options
        )
    docs = [[[special.bos, *ids, special.boi]] for ids in captions]
    cfg = (config or SamplingConfig()).with_options(**{"max_new_tokens": 0, **options})
    gens = generate(
        model, docs, cfg, generator=generator, special=special, vocab_limit=_vocab_limit(tokenizer)
    )
    latents = torch.stack([g.images[0] for g in gens])
    if autoencoder is None:
        return latents
    return autoencoder.decode(latents).cpu()


def _caption_ids(i: int, p, tokenizer, special: SpecialTokens) -> list[int]:
    """The caption's token ids without a leading ``<BOS>`` or a trailing ``<BOI>``."""
    if isinstance(p, str):
        if tokenizer is None:
            raise ValueError(f"prompts[{i}] is a string; pass tokenizer= to encode it")
        ids = list(tokenizer.encode(p))
    elif isinstance(p, torch.Tensor):
        ids = [int(x) for x in p.reshape(-1).tolist()]
    else:
        ids = list(p)
    if ids and ids[0] == special.bos:
        ids = ids[1:]
    if ids and ids[-1] == special.boi:
        ids = ids[:-1]
    return ids


def _discrete_text_to_image(model, captions, special, tokenizer, autoencoder, generator, config, options):
    from transfusion.baseline_sampling import generate_images

    limit = _vocab_limit(tokenizer)
    for i, ids in enumerate(captions):
        bad = [t for t in ids if limit is not None and not 0 <= t < limit]
        if bad:
            raise ValueError(
                f"prompts[{i}]: token id {bad[0]} is outside the tokenizer's vocabulary [0, {limit})"
            )
    cfg = (config or SamplingConfig()).with_options(**options)
    scale = 1.0 if cfg.guidance_scale is None else float(cfg.guidance_scale)
    samples = generate_images(
        model,
        captions,
        special=special,
        cfg_scale=scale,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        generator=row_generators(generator, len(captions)),
    )
    if autoencoder is None:
        return samples.codes.cpu()
    if not hasattr(autoencoder, "decode_codes"):
        raise ValueError(
            "autoencoder: a discrete model draws VQ codes; pass its VQ autoencoder (decode_codes)"
        )
    return autoencoder.decode_codes(samples.codes).cpu()


def _discrete_caption(model, x, autoencoder, tokenizer, generator, config, options):
    from transfusion.baseline_sampling import caption_images

    if not isinstance(x, torch.Tensor):
        x = torch.stack(list(x))
    if x.is_floating_point():
        if x.dim() == 3:
            x = x[None]
        if autoencoder is None or not hasattr(autoencoder, "encode_codes"):
            raise ValueError(
                "latents_or_images: a discrete model captions VQ codes; pass (N, h, w) integer codes, or "
                "images with autoencoder= a VQ autoencoder (encode_codes)"
            )
        x = autoencoder.encode_codes(x)
    elif x.dim() == 2:
        x = x[None]
    if x.dim() != 3:
        raise ValueError(f"codes must be an integer tensor (N, h, w); got shape {tuple(x.shape)}")
    special = _special(tokenizer)
    base = config or SamplingConfig(temperature=0.0)
    cfg = base.with_options(**{"allow_images": False, **options})
    n = x.shape[0]
    room = model.cfg.max_seq_len - (x.shape[1] * x.shape[2] + 3)  # after <BOS> <BOI> codes <EOI>
    if room <= 0:
        raise ValueError(
            f"codes of shape {tuple(x.shape)} leave no room for a caption within ModelConfig.max_seq_len = "
            f"{model.cfg.max_seq_len}"
        )
    if cfg.max_new_tokens == 0:
        out: list[list[int]] = [[] for _ in range(n)]
    else:
        out = caption_images(
            model,
            x,
            special=special,
            max_new_tokens=min(cfg.max_new_tokens, room),
            min_new_tokens=min(cfg.min_new_tokens, room),  # SamplingConfig keeps it <= max_new_tokens
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            generator=row_generators(generator, n),
            text_vocab=_vocab_limit(tokenizer),
        ).tokens
    if tokenizer is None:
        return out
    return [tokenizer.decode(t) for t in out]


def caption(
    model,
    latents_or_images: torch.Tensor | Sequence[torch.Tensor],
    *,
    autoencoder=None,
    tokenizer=None,
    generator: torch.Generator | Sequence[torch.Generator] | int | None = None,
    config: SamplingConfig | None = None,
    **options: Any,
) -> list[list[int]] | list[str]:
    """A caption per image (image-first documents; the model may not open another image).

    Args:
        latents_or_images: (N, C, h, w) latents as the model sees them, or (N, 3, H, W) images in [-1, 1]
            when ``autoencoder`` is given (they are encoded with it). A discrete model: (N, h, w) integer
            VQ codes, or images with its VQ autoencoder.
        tokenizer: when given, captions are returned as text; otherwise as token id lists.
        config, options: sampling settings; without ``config`` decoding is greedy (``temperature=0``)
            with at most 64 new tokens. ``allow_images`` is False unless an option sets it.

    The final ``<EOS>`` is not part of the returned captions (a discrete model stops at
    ``ModelConfig.max_seq_len`` at the latest).
    """
    if is_discrete(model):
        return _discrete_caption(model, latents_or_images, autoencoder, tokenizer, generator, config, options)
    x = latents_or_images
    if not isinstance(x, torch.Tensor):
        x = torch.stack(list(x))
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"latents_or_images must be a (N, C, H, W) float tensor; got {tuple(x.shape)}")
    if autoencoder is not None:
        x = autoencoder.encode(x)
    special = _special(tokenizer)
    docs = [[[special.bos], x[i].detach().float().cpu()] for i in range(x.shape[0])]
    base = config or SamplingConfig(temperature=0.0)
    cfg = base.with_options(**{"allow_images": False, **options})
    gens = generate(
        model, docs, cfg, generator=generator, special=special, vocab_limit=_vocab_limit(tokenizer)
    )
    out = []
    for g in gens:
        toks = g.tokens
        if toks and toks[-1] == special.eos:
            toks = toks[:-1]
        out.append(toks)
    if tokenizer is None:
        return out
    return [tokenizer.decode(t) for t in out]


__all__ = ["caption", "is_discrete", "text_to_image"]
