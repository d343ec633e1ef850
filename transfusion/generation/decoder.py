"""One decoder for both directions: text tokens by next-token sampling, images by diffusion.

A prompt is one document given as segments, like a training document for ``pack_documents``: text
segments are lists (or 1-D tensors) of token ids, image segments are (C, H, W) float latents. Each image
segment becomes ``<BOI> patch_1 .. patch_n <EOI>``; its patches enter at t = 0 (clean). A prompt may end
with ``<BOI>``: the decoder then starts with that image. ``<BOS>`` is prepended unless the prompt
starts with it.

LM mode: the logits of the last position are masked (``<PAD>``, ``<BOS>``, ``<EOI>`` never follow a
token in training; ``<BOI>`` when images are not allowed; ids past ``vocab_limit``), then a token is
sampled (greedy / temperature / top-k). The token is appended and run through the transformer as one new
query against the KV cache.

Diffusion mode (after a ``<BOI>``): the image's n patch positions are appended as noise x_T. Every
denoising step runs only those n queries against the cached prefix (query offset; ``commit=False``), with
the image's patches attending to the whole prefix document and to each other (interval layout), and one
step of a diffusers DDPM/DDIM scheduler. With classifier-free guidance the unconditional rows run in the
same batch: their prefix is the caption-dropped form of the document, exactly as training's caption
dropout (``transfusion.packing.apply_caption_dropout``) makes it: the text since the previous image (or
since the document start) keeps only its special tokens, so ``<BOS> caption <BOI>`` becomes
``<BOS> <BOI>``. Guidance combines the model's predictions linearly, eps or v alike (``prediction_type``;
the scheduler is set up with the same type), and the trace's "eps" entries hold those predictions.

After the last step the clean latents x_0 enter the context as the image: they are embedded at t = 0
(the timestep embedding of a clean image; training shows later tokens the image at its sampled noise
level, and t = 0 is the clean end of that range) and committed to the cache together with ``<EOI>``,
whose logits resume LM mode. Captioning is the same decoder with an image-first prompt
(``[[BOS], latents]``).

Batching: rows of different lengths are left-padded (see ``transfusion.generation.context``). All rows
step together in LM mode; when some rows open an image, only those rows denoise and the others get
padding prepended afterwards. Finished rows continue as padding queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from transfusion.generation.context import DecodeContext, QueryFields
from transfusion.generation.sampling import SamplingConfig, make_scheduler, row_generators, sample_token
from transfusion.layout import IMAGE, PAD, TEXT
from transfusion.packing import SpecialTokens
from transfusion.value_checks import is_int

Segment = list[int] | torch.Tensor


# ====================================================================== results
@dataclass
class Generation:
    """What one prompt produced.

    Attributes:
        segments: the generated segments in order: lists of text token ids (``<BOI>``/``<EOI>`` are implied
            by the images; a sampled ``<EOS>`` is kept) and (C, H, W) latents.
        finish_reason: "eos", "max_new_tokens" (the token budget is spent) or "max_seq_len" (the document
            cannot grow any further).
        num_tokens: text tokens sampled (``<BOI>`` and ``<EOS>`` included).
        document: the whole document (prompt + generated) as segments for ``pack_documents``.
    """

    segments: list[Segment] = field(default_factory=list)
    finish_reason: str = ""
    num_tokens: int = 0
    document: list[Segment] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        """All generated text token ids, images left out."""
        return [t for s in self.segments if not isinstance(s, torch.Tensor) for t in s]

    @property
    def images(self) -> list[torch.Tensor]:
        """The generated latents, (C, H, W) each."""
        return [s for s in self.segments if isinstance(s, torch.Tensor)]


# ====================================================================== prompts
@dataclass
class _Doc:
    """A document flattened into positions: token ids (placeholder at patches), image latents and spans."""

    tokens: list[int]
    kinds: list[int]  # TEXT or IMAGE per position
    latents: list[torch.Tensor]
    spans: list[tuple[int, int]]  # local half-open patch spans
    open_image: bool  # ends with <BOI>: an image is to be generated next

    def __len__(self) -> int:
        return len(self.tokens)


def _merge_text(segments: list[Segment]) -> list[Segment]:
    """Consecutive text segments joined: the text since the previous image is one segment (the caption)."""
    out: list[Segment] = []
    for s in segments:
        if not isinstance(s, torch.Tensor) and out and not isinstance(out[-1], torch.Tensor):
            out[-1] = [*out[-1], *s]
        else:
            out.append(s if isinstance(s, torch.Tensor) else list(s))
    return out


def check_prompt(
    i: int,
    prompt: Any,
    cfg,
    special: SpecialTokens,
    vocab_limit: int | None,
    add_bos: bool,
) -> tuple[list[Segment], bool]:
    """Validate one prompt; returns its segments (text merged, ``<BOS>`` added, final ``<BOI>`` removed)
    and whether it ends with ``<BOI>``. Errors are ValueErrors naming the prompt and the problem."""
    where = f"prompts[{i}]"
    if isinstance(prompt, str):
        raise ValueError(f"{where} is a string; tokenize it first (or use text_to_image(..., tokenizer=))")
    if isinstance(prompt, torch.Tensor) and not prompt.is_floating_point():
        prompt = [prompt]
    elif isinstance(prompt, torch.Tensor):
        raise ValueError(f"{where} is a tensor; wrap an image prompt as a segment list: [[bos], latents]")
    if not isinstance(prompt, Sequence):
        raise ValueError(f"{where} must be a list of segments; got {type(prompt).__name__}")
    if prompt and all(isinstance(x, (int, float)) for x in prompt):
        prompt = [list(prompt)]  # a bare list of token ids is one text segment
    limit = cfg.vocab_size if vocab_limit is None else min(vocab_limit, cfg.vocab_size)
    names = {special.image: "the image placeholder", special.pad: "<PAD>"}
    segs: list[Segment] = []
    for j, seg in enumerate(prompt):
        here = f"{where}[{j}]"
        if isinstance(seg, torch.Tensor) and seg.is_floating_point():
            shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
            if tuple(seg.shape) != shape:
                raise ValueError(
                    f"{here}: image latents have shape {tuple(seg.shape)}; the model needs {shape}"
                )
            if not bool(torch.isfinite(seg).all()):
                raise ValueError(f"{here}: image latents contain NaN or Inf")
            segs.append(seg.detach())
            continue
        if isinstance(seg, torch.Tensor):
            if seg.dim() != 1:
                raise ValueError(f"{here}: text token tensor must be 1-D; got shape {tuple(seg.shape)}")
            ids = [int(x) for x in seg.tolist()]
        elif isinstance(seg, Sequence) and not isinstance(seg, str):
            ids = list(seg)
            for x in ids:
                if not is_int(x):
                    raise ValueError(f"{here}: text tokens must be integers; got {x!r}")
        else:
            raise ValueError(
                f"{here}: a segment must be token ids or (C, H, W) latents; got {type(seg).__name__}"
            )
        for x in ids:
            if not 0 <= x < cfg.vocab_size:
                raise ValueError(
                    f"{here}: token id {x} is outside the vocabulary [0, vocab_size = {cfg.vocab_size})"
                )
            if x >= limit:
                raise ValueError(f"{here}: token id {x} is outside the tokenizer's vocabulary [0, {limit})")
        segs.append(ids)
    segs = _merge_text(segs)
    if not any(len(s) if not isinstance(s, torch.Tensor) else 1 for s in segs):
        raise ValueError(f"{where} is empty (no tokens and no images)")
    if add_bos and (isinstance(segs[0], torch.Tensor) or not segs[0] or segs[0][0] != special.bos):
        segs = _merge_text([[special.bos], *segs])
    open_image = False
    last = segs[-1]
    if not isinstance(last, torch.Tensor) and last and last[-1] == special.boi:
        open_image = True
        segs[-1] = last[:-1]
        if not segs[-1]:
            segs.pop()
    # Special ids that cannot appear inside a prompt's text.
    k = 0
    for j, seg in enumerate(segs):
        if isinstance(seg, torch.Tensor):
            k += 1
            continue
        for pos, x in enumerate(seg):
            if x == special.bos and (j > 0 or pos > 0):
                raise ValueError(f"{where}: <BOS> (id {x}) may only start a prompt; found it later")
            if x in (special.pad, special.image):
                raise ValueError(
                    f"{where}: token id {x} is {names[x]}, which never appears inside a document"
                )
            if x == special.eoi:
                raise ValueError(
                    f"{where}: <EOI> (id {x}) is inserted after each image; pass images as (C, H, W) latents"
                )
            if x == special.boi:
                raise ValueError(
                    f"{where}: <BOI> (id {x}) may only be the last token (it starts image generation); "
                    "pass prompt images as (C, H, W) latents"
                )
            if x == special.eos:
                raise ValueError(f"{where}: <EOS> (id {x}) ends a document; it cannot appear inside a prompt")
    if not segs:
        raise ValueError(f"{where} is empty (no tokens and no images)")
    return segs, open_image


def flatten(segments: Sequence[Segment], open_image: bool, patch_size: int, special: SpecialTokens) -> _Doc:
    """Positions of a document (as ``pack_documents`` lays it out), plus a final ``<BOI>`` if open."""
    toks: list[int] = []
    kinds: list[int] = []
    lats: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    for s in segments:
        if isinstance(s, torch.Tensor):
            n = (s.shape[1] // patch_size) * (s.shape[2] // patch_size)
            toks.append(special.boi)
            kinds.append(TEXT)
            spans.append((len(toks), len(toks) + n))
            toks.extend([special.image] * n)
            kinds.extend([IMAGE] * n)
            toks.append(special.eoi)
            kinds.append(TEXT)
            lats.append(s)
        else:
            toks.extend(s)
            kinds.extend([TEXT] * len(s))
    if open_image:
        toks.append(special.boi)
        kinds.append(TEXT)
    return _Doc(toks, kinds, lats, spans, open_image)


def caption_dropped(segments: Sequence[Segment], special: SpecialTokens) -> list[Segment]:
    """The unconditional form of a document for CFG: the text since the last image keeps only specials."""
    segs = list(segments)
    if segs and not isinstance(segs[-1], torch.Tensor):
        keep = special.ids()
        segs[-1] = [x for x in segs[-1] if x in keep]
        if not segs[-1]:
            segs.pop()
    return segs


# ====================================================================== the decoder
class _Row:
    """Per-row bookkeeping (global row index ``index``)."""

    def __init__(self, index: int, segments: list[Segment], length: int, generator) -> None:
        self.index = index
        self.segments = segments  # the whole document so far (text merged), without an open <BOI>
        self.length = length  # committed document positions
        self.generator = generator
        self.out = Generation()
        self.images = 0
        self.done = ""

    def add_text(self, tok: int) -> None:
        for segs in (self.segments, self.out.segments):
            if segs and not isinstance(segs[-1], torch.Tensor):
                segs[-1].append(tok)
            else:
                segs.append([tok])

    def add_image(self, lat: torch.Tensor) -> None:
        self.segments.append(lat)
        self.out.segments.append(lat)
        self.images += 1


class Decoder:
    """Runs ``generate`` for one batch of prompts (see the module docstring)."""

    def __init__(
        self,
        model,
        config: SamplingConfig,
        special: SpecialTokens,
        vocab_limit: int | None = None,
        trace: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.model = model
        self.mc = model.cfg
        self.cfg = config
        self.special = special
        self.trace = trace
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_patches = self.mc.patches_per_image
        limit = self.mc.vocab_size if vocab_limit is None else min(vocab_limit, self.mc.vocab_size)
        base = {special.pad, special.bos, special.eoi, special.image}
        base |= set(range(limit, self.mc.vocab_size))
        self.banned = sorted(base)
        self.banned_no_image = sorted(base | {special.boi})
        # the same while a row is under min_new_tokens: <EOS> may not end it yet
        self.banned_early = sorted(base | {special.eos})
        self.banned_no_image_early = sorted(base | {special.boi, special.eos})

    # ------------------------------------------------------------------ embedding helpers
    def _embed(self, tokens: torch.Tensor, patch_index: torch.Tensor, latents, t: torch.Tensor):
        return self.model.embed(tokens, patch_index, latents, t)

    def _image_inputs(self, x: torch.Tensor, t: torch.Tensor, trailing: list[int]):
        """Embedded inputs of one image per row (+ trailing text tokens): (R, n + len(trailing), dim)."""
        R, n = x.shape[0], self.n_patches
        e = len(trailing)
        tokens = torch.full((R, n + e), self.special.image, dtype=torch.long, device=self.device)
        if e:
            tokens[:, n:] = torch.tensor(trailing, dtype=torch.long, device=self.device)
        ar = torch.arange(max(R, n), device=self.device)
        patch_index = ar[:R, None] * (n + e) + ar[None, :n]
        return self._embed(tokens, patch_index, x.to(self.device, self.dtype), t)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_logits(h).float()

    # ------------------------------------------------------------------ prefill
    def prefill(self, docs: Sequence[_Doc]) -> tuple[DecodeContext, torch.Tensor]:
        """A fresh context holding ``docs`` (left-padded to one length) and their last hidden states."""
        R = len(docs)
        L = max(len(d) for d in docs)
        dev = self.device
        tokens = torch.full((R, L), self.special.pad, dtype=torch.long)
        lo = torch.arange(L, dtype=torch.int32).repeat(R, 1)
        hi = lo - 1
        doc_id = torch.full((R, L), -1, dtype=torch.int32)
        image_id = torch.full((R, L), -1, dtype=torch.int32)
        modality = torch.full((R, L), PAD, dtype=torch.int8)
        positions = torch.zeros((R, L), dtype=torch.long)
        spans: list[list[tuple[int, int]]] = []
        patch_rows: list[torch.Tensor] = []
        latents: list[torch.Tensor] = []
        for r, d in enumerate(docs):
            s = L - len(d)
            tokens[r, s:] = torch.tensor(d.tokens, dtype=torch.long)
            lo[r, s:] = s
            hi[r, s:] = torch.arange(s, L, dtype=torch.int32)
            doc_id[r, s:] = 0
            modality[r, s:] = TEXT
            positions[r, s:] = torch.arange(len(d))
            row_spans = []
            for k, ((a, b), lat) in enumerate(zip(d.spans, d.latents)):
                hi[r, s + a : s + b] = s + b - 1
                image_id[r, s + a : s + b] = k
                modality[r, s + a : s + b] = IMAGE
                row_spans.append((s + a, s + b))
                patch_rows.append(r * L + s + torch.arange(a, b))
                latents.append(lat)
            spans.append(row_spans)
        ctx = DecodeContext(self.model, R, self.cfg.use_cache, dev)
        f = QueryFields(
            lo=lo.to(dev),
            hi=hi.to(dev),
            doc_id=doc_id.to(dev),
            image_id=image_id.to(dev),
            modality=modality.to(dev),
            positions=positions.to(dev),
            spans=spans,
        )
        if latents:
            patch_index = torch.stack(patch_rows).to(dev)
            lat = torch.stack(latents).to(dev, self.dtype)
            t = torch.zeros(lat.shape[0], dtype=torch.long, device=dev)
        else:
            patch_index = torch.zeros(0, 0, dtype=torch.long, device=dev)
            lat = torch.zeros(0, 0, 0, 0, device=dev, dtype=self.dtype)
            t = torch.zeros(0, dtype=torch.long, device=dev)
        x, _ = self._embed(tokens.to(dev), patch_index, lat, t)
        h = ctx.run(x, ctx.plan(f), commit=True)
        ctx.start = torch.tensor([L - len(d) for d in docs], dtype=torch.long, device=dev)
        return ctx, h[:, -1]

    # ------------------------------------------------------------------ sampling
    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        c = self.cfg
        allow = c.allow_images and (c.max_images is None or row.images < c.max_images)
        if row.out.num_tokens < c.min_new_tokens:
            banned = self.banned_early if allow else self.banned_no_image_early
        else:
            banned = self.banned if allow else self.banned_no_image
        return sample_token(logits, banned, c.temperature, c.top_k, row.generator)

    # ------------------------------------------------------------------ images
    def image_event(self, ctx: DecodeContext, rows: list[_Row], S: list[int], logits: torch.Tensor) -> None:
        """Generate one image for rows ``S`` (indices into ``rows``), each of which just committed <BOI>."""
        c, mc, dev = self.cfg, self.mc, self.device
        n = self.n_patches
        all_rows = len(S) == ctx.rows
        sub = ctx if all_rows else ctx.select(S)
        guided = c.guidance_scale is not None
        if guided:
            uncond = [
                flatten(caption_dropped(rows[b].segments, self.special), True, mc.patch_size, self.special)
                for b in S
            ]
            unc_ctx, _ = self.prefill(uncond)
            den = DecodeContext.concat(sub, unc_ctx)
        else:
            den = sub
        image_index = [rows[b].images for b in S]
        plan = den.plan(den.image_fields(n, image_index * (2 if guided else 1)))
        gens = [rows[b].generator for b in S]
        shape = (1, mc.latent_channels, mc.latent_size, mc.latent_size)
        sched = make_scheduler(
            c.scheduler,
            mc.num_train_timesteps,
            c.steps,
            c.timestep_spacing,
            self.model.schedule,
            clip_sample_range=c.clip_sample_range,
            prediction_type=mc.prediction_type,
        )
        x = torch.cat([torch.randn(shape, generator=g) for g in gens]).to(dev, torch.float32)
        x = x * sched.init_noise_sigma
        step_kw = {"eta": c.eta} if c.scheduler == "ddim" else {}
        for t in sched.timesteps:
            x_in = sched.scale_model_input(x, t)
            xx = torch.cat([x_in, x_in]) if guided else x_in
            tt = torch.full((xx.shape[0],), int(t), dtype=torch.long, device=dev)
            emb, actx = self._image_inputs(xx, tt, [])
            h = den.run(emb, plan, commit=False)
            eps_all = self.model.adapter.decode(h, actx).float()
            if guided:
                eps_c, eps_u = eps_all[: len(S)], eps_all[len(S) :]
                eps = eps_u + c.guidance_scale * (eps_c - eps_u)
            else:
                eps_c, eps_u, eps = eps_all, None, eps_all
            if self.trace is not None:
                self.trace(
                    {
                        "kind": "eps",
                        "rows": [rows[b].index for b in S],
                        "t": int(t),
                        "x_t": x.clone(),
                        "eps_cond": eps_c.clone(),
                        "eps_uncond": None if eps_u is None else eps_u.clone(),
                        "eps": eps.clone(),
                    }
                )
            x = sched.step(eps, t, x, generator=gens, **step_kw).prev_sample
        for j, b in enumerate(S):
            rows[b].add_image(x[j].detach().cpu())
        # Rows that will sample again need the clean image (and <EOI>) in their context.
        goes_on = [b for b in S if self._can_continue(rows[b], after_image=True)]
        for b in S:
            if b not in goes_on:
                rows[b].done = self._stop_reason(rows[b])
        if not goes_on:
            return
        t0 = torch.zeros(len(S), dtype=torch.long, device=dev)
        emb, _ = self._image_inputs(x, t0, [self.special.eoi])
        h = sub.run(emb, sub.plan(sub.image_fields(n, image_index, trailing_text=1)), commit=True)
        new_logits = self._logits(h[:, -1])
        for j, b in enumerate(S):
            rows[b].length += n + 1
            logits[b] = new_logits[j]
            if self.trace is not None and b in goes_on:
                self.trace({"kind": "logits", "rows": [rows[b].index], "logits": new_logits[j].clone()})
        if not all_rows:
            ctx.pad_left(n + 1)
            ctx.assign(S, sub)

    # ------------------------------------------------------------------ budget
    def _can_continue(self, row: _Row, after_image: bool = False) -> bool:
        extra = self.n_patches + 1 if after_image else 0  # the image + <EOI> still to be committed
        return row.out.num_tokens < self.cfg.max_new_tokens and row.length + extra + 1 <= self.mc.max_seq_len

    def _stop_reason(self, row: _Row) -> str:
        return "max_new_tokens" if row.out.num_tokens >= self.cfg.max_new_tokens else "max_seq_len"

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def run(
        self, prompts: list[tuple[list[Segment], bool]], generators: list[torch.Generator]
    ) -> list[Generation]:
        mc = self.mc
        docs = [flatten(segs, open_img, mc.patch_size, self.special) for segs, open_img in prompts]
        rows = [
            _Row(i, list(segs), len(d), g)
            for i, ((segs, _), d, g) in enumerate(zip(prompts, docs, generators))
        ]
        ctx, h = self.prefill(docs)
        logits = self._logits(h)
        for r in rows:
            if not docs[r.index].open_image and self.trace is not None:
                self.trace({"kind": "logits", "rows": [r.index], "logits": logits[r.index].clone()})
        pending = [r.index for r in rows if docs[r.index].open_image]
        while True:
            if pending:
                self.image_event(ctx, rows, pending, logits)
            live = [r for r in rows if not r.done]
            if not live:
                break
            step: dict[int, int] = {}
            for r in live:
                if not self._can_continue(r):
                    r.done = self._stop_reason(r)
                    continue
                tok = self._sample(r, logits[r.index])
                if tok == self.special.boi and r.length + 1 + self.n_patches + 1 > mc.max_seq_len:
                    r.done = "max_seq_len"  # no room for the image: stop before opening it
                    continue
                r.out.num_tokens += 1
                if tok == self.special.boi:
                    step[r.index] = tok
                    continue
                r.add_text(tok)
                if tok == self.special.eos and self.cfg.stop_at_eos:
                    r.done = "eos"
                    continue
                step[r.index] = tok
            if not step:
                pending = []
                continue
            active = torch.zeros(len(rows), dtype=torch.bool)
            tokens = torch.full((len(rows), 1), self.special.pad, dtype=torch.long)
            for b, tok in step.items():
                active[b] = True
                tokens[b, 0] = tok
            x = self.model.tok_emb(tokens.to(self.device))
            h = ctx.run(x, ctx.plan(ctx.text_fields(active)), commit=True)
            new_logits = self._logits(h[:, -1])
            pending = []
            for b, tok in step.items():
                rows[b].length += 1
                logits[b] = new_logits[b]
                if tok == self.special.boi:
                    pending.append(b)
                elif self.trace is not None:
                    self.trace({"kind": "logits", "rows": [b], "logits": new_logits[b].clone()})
        for r in rows:
            r.out.finish_reason = r.done
            r.out.document = r.segments
        return [r.out for r in rows]


# ====================================================================== entry point
def generate(
    model,
    prompts: Sequence[Any],
    config: SamplingConfig | None = None,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | int | None = None,
    special: SpecialTokens | None = None,
    vocab_limit: int | None = None,
    add_bos: bool = True,
    trace: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> list[Generation]:
    """Continue each prompt (a mixed-modal document) with text and images.

    Args:
        model: a ``Transfusion`` model (its attention backend must accept a query offset, e.g. sdpa,
            naive or flex; the xformers backend takes whole rows only).
        prompts: one document per row: a list of segments (token id lists / 1-D integer tensors and
            (C, H, W) latents), or a bare list of token ids. A final ``<BOI>`` opens an image.
        config: sampling settings; ``options`` override single fields (e.g. ``temperature=0``).
        generator: randomness, one CPU generator per row (see ``transfusion.generation.sampling``).
        special: special token ids (default: the tokenizers' PAD=0 BOS=1 EOS=2 BOI=3 EOI=4).
        vocab_limit: the tokenizer's vocabulary size when smaller than the model's (ids at or past it
            are rejected in prompts and never sampled).
        add_bos: prepend ``<BOS>`` to prompts that do not start with it.
        trace: called with a dict for every LM step ({"kind": "logits", "rows", "logits"}) and every
            denoising step ({"kind": "eps", "rows", "t", "x_t", "eps_cond", "eps_uncond", "eps"}; under
            ``prediction_type="v_prediction"`` the "eps" entries hold the predicted v).

    Returns one ``Generation`` per prompt. Bad prompts or settings raise ValueError before any compute.

    The discrete baseline (``transfusion.baseline.DiscreteLM``) is not decoded here: its two uses are
    ``text_to_image`` / ``caption`` (which take either family), built on
    ``transfusion.baseline_sampling.generate_images`` / ``caption_images``.
    """
    from transfusion.baseline import DiscreteLM

    if isinstance(model, DiscreteLM):
        raise TypeError(
            "generate() decodes Transfusion models; for the discrete baseline use text_to_image / caption "
            "(or transfusion.baseline_sampling.generate_images / caption_images)"
        )
    cfg = (config or SamplingConfig()).with_options(**options)
    special = special or SpecialTokens()
    mc = model.cfg
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list with one prompt (a list of segments) per row")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt")
    if vocab_limit is not None and (not isinstance(vocab_limit, int) or vocab_limit <= 0):
        raise ValueError(f"vocab_limit = {vocab_limit!r} must be a positive integer")
    n = mc.patches_per_image
    parsed = []
    for i, p in enumerate(prompts):
        segs, open_image = check_prompt(i, p, mc, special, vocab_limit, add_bos)
        length = len(flatten(segs, open_image, mc.patch_size, special))
        if length > mc.max_seq_len:
            raise ValueError(
                f"prompts[{i}] is {length} positions long (text, image patches, <BOI>/<EOI>), longer than "
                f"the context max_seq_len = {mc.max_seq_len}"
            )
        if open_image and length + n + 1 > mc.max_seq_len:
            raise ValueError(
                f"prompts[{i}] is {length} positions long and ends with <BOI>: the image's {n} patches and "
                f"<EOI> do not fit in max_seq_len = {mc.max_seq_len}"
            )
        parsed.append((segs, open_image))
    gens = row_generators(generator, len(parsed))
    return Decoder(model, cfg, special, vocab_limit, trace).run(parsed, gens)


__all__ = ["Decoder", "Generation", "caption_dropped", "check_prompt", "flatten", "generate"]
