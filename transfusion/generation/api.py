"""The two uses of the decoder that evaluation needs: text-to-image and image-to-text (captioning).

Both build the documents training used (``transfusion.training_data.document_for``):

    text-to-image:  <BOS> caption <BOI>  -> the image is generated, then generation stops
    captioning:     <BOS> <BOI> image <EOI>  -> the caption is sampled until <EOS>

and call ``generate``. The unconditional prompt of classifier-free guidance is ``<BOS> <BOI>``, the
caption-dropped form of the first (see ``transfusion.generation.decoder``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from transfusion.generation.decoder import generate
from transfusion.generation.sampling import SamplingConfig
from transfusion.packing import SpecialTokens


def _special(tokenizer) -> SpecialTokens:
    if tokenizer is None:
        return SpecialTokens()
    return SpecialTokens(
        pad=tokenizer.pad_id,
        bos=tokenizer.bos_id,
        eos=tokenizer.eos_id,
        boi=tokenizer.boi_id,
        eoi=tokenizer.eoi_id,
        image=tokenizer.pad_id,
    )


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
        autoencoder: when given (anything with ``decode(latents)``), the latents are decoded.
        generator, config, options: as for ``generate`` (e.g. ``scheduler="ddim", num_steps=50,
            guidance_scale=3.0``).

    Returns (N, C, H, W) latents, or (N, 3, H', W') images in [-1, 1] when ``autoencoder`` is given.
    """
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of captions (strings or token id lists)")
    special = _special(tokenizer)
    docs = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompts[{i}] is a string; pass tokenizer= to encode it")
            ids = list(tokenizer.encode(p))
        elif isinstance(p, torch.Tensor):
            ids = [int(x) for x in p.reshape(-1).tolist()]
        else:
            ids = list(p)
        if not ids or ids[0] != special.bos:
            ids = [special.bos, *ids]
        if ids[-1] == special.boi:
            ids = ids[:-1]
        docs.append([[*ids, special.boi]])
    cfg = (config or SamplingConfig()).with_options(**{"max_new_tokens": 0, **options})
    gens = generate(
        model, docs, cfg, generator=generator, special=special, vocab_limit=_vocab_limit(tokenizer)
    )
    latents = torch.stack([g.images[0] for g in gens])
    if autoencoder is None:
        return latents
    return autoencoder.decode(latents).cpu()


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
            when ``autoencoder`` is given (they are encoded with it).
        tokenizer: when given, captions are returned as text; otherwise as token id lists.
        config, options: sampling settings; without ``config`` decoding is greedy (``temperature=0``)
            with at most 64 new tokens. ``allow_images`` is False unless an option sets it.

    The final ``<EOS>`` is not part of the returned captions.
    """
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


__all__ = ["caption", "text_to_image"]
