"""The z-loss (PaLM, Chameleon): the mean square of the LM softmax's log-normaliser.

``z_loss(logits) = mean(logsumexp(logits, -1) ** 2)`` over the positions with an LM target. Weighted by
``ModelConfig.z_loss`` and added to the training loss, it keeps the normaliser near 1 (log near 0), which
Chameleon used (weight 1e-5) against logit drift in its mixed-modal training. Both families apply it the
same way, so switching the family changes nothing else; it is off (weight 0) by default.
"""

from __future__ import annotations

import torch


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """(N, vocab) logits -> scalar mean of logsumexp^2, computed in float32."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
