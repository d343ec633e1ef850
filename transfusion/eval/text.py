"""Bits per byte of held-out text under a language model.

Each text is scored as the document ``<BOS> text``: the summed negative log-likelihood (nats) of the
text's tokens, each predicted from everything before it, divided by ``ln 2`` times the text's UTF-8
bytes (``transfusion.data.bits_per_byte``), pooled over all texts (total NLL / total bytes). Tokens
after the text (``<EOS>``, ``<BOI>``) are not scored: both model families follow a caption with
different tokens, and only the text itself is comparable across families and tokenizers.

``logits_fn(tokens, pads) -> logits`` maps left-padded (B, L) token rows and their (B,) pad counts to
(B, L, V) logits; ``model_logits_fn(model)`` builds one for any model of the bench (Transfusion or the
discrete baseline: both expose ``tok_emb``, ``run_transformer`` and ``lm_logits``). The softmax is over
all V model outputs, or the first ``vocab_limit`` of them when given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from transfusion.data.tokenizer import bits_per_byte, utf8_len

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TextEval:
    bits_per_byte: float
    nll_nats: float  # summed over every scored token
    n_tokens: int
    n_bytes: int
    n_texts: int

    @property
    def nats_per_token(self) -> float:
        return self.nll_nats / self.n_tokens

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "nats_per_token": self.nats_per_token}


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    tokens = torch.full((len(rows), L), pad_id, dtype=torch.long)
    pads = torch.tensor([L - len(r) for r in rows], dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, L - len(r) :] = torch.tensor(list(r), dtype=torch.long)
    return tokens.to(device), pads.to(device)


def model_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """``logits_fn`` of a bench model: causal attention within each left-padded row."""
    from transfusion.baseline_sampling import decode_layout, decode_positions

    def fn(tokens: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        x = model.tok_emb(tokens)
        hidden = model.run_transformer(x, decode_layout(pads, 0, L), positions=decode_positions(pads, 0, L))
        return model.lm_logits(hidden)

    return fn


@torch.no_grad()
def text_nll(
    logits_fn: LogitsFn,
    token_rows: Sequence[Sequence[int]],
    *,
    bos_id: int,
    pad_id: int = 0,
    batch_size: int = 32,
    vocab_limit: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[float, int]:
    """(Summed NLL in nats, count) of every row's tokens, each given ``<BOS>`` and the tokens before it."""
    total, count = 0.0, 0
    rows = [list(r) for r in token_rows]
    for r in rows:
        if not r:
            raise ValueError("empty text: nothing to score")
    for b0 in range(0, len(rows), batch_size):
        chunk = [[bos_id, *r] for r in rows[b0 : b0 + batch_size]]
        tokens, pads = _left_pad(chunk, pad_id, device)
        logits = logits_fn(tokens, pads).float()
        if vocab_limit is not None:
            logits = logits[..., :vocab_limit]
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        targets = tokens[:, 1:]
        nll = -logp.gather(-1, targets[..., None])[..., 0]
        # targets at index j are real text when j + 1 > pads (position 0 of a row's document is <BOS>)
        pos = torch.arange(1, tokens.shape[1], device=tokens.device)[None]
        scored = pos > pads[:, None]
        total += float(nll[scored].double().sum())
        count += int(scored.sum())
    return total, count


def bits_per_byte_of_texts(
    logits_fn: LogitsFn,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    vocab_limit: int | None = None,
    device: str | torch.device = "cpu",
) -> TextEval:
    """Pooled bits per UTF-8 byte of ``texts`` (see the module docstring)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    rows = [tokenizer.encode(t) for t in texts]
    nll, n_tok = text_nll(
        logits_fn,
        rows,
        bos_id=tokenizer.bos_id,
        pad_id=tokenizer.pad_id,
        batch_size=batch_size,
        vocab_limit=vocab_limit,
        device=device,
    )
    n_bytes = sum(utf8_len(t) for t in texts)
    bpb = bits_per_byte(nll, n_bytes)
    if not math.isfinite(bpb):
        raise FloatingPointError(f"bits per byte is {bpb}")
    return TextEval(bpb, nll, n_tok, n_bytes, len(texts))


__all__ = ["LogitsFn", "TextEval", "bits_per_byte_of_texts", "model_logits_fn", "text_nll"]
