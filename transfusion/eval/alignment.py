"""Judge-based accuracies over a batch (shapes dataset; see ``transfusion.data.judge``).

* Text-to-image alignment (GenEval-style): for each (generated image, prompt) pair, the fraction of the
  attributes the prompt states that the judge finds in the image; the batch score is the mean.
* Captioning accuracy (image-to-text): for each (generated caption, truth) pair, the attribute accuracy of
  the caption against the true objects (or an image the judge parses); the batch score is the mean.

Both also report per-attribute accuracy (correct / stated, pooled over the batch), the fraction of pairs
scored perfectly (``exact``) and the fraction whose object counts agree (``count_match``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from transfusion.data.judge import ATTRIBUTES, Score, judge_caption, judge_image


@dataclass
class AlignmentResult:
    """Mean judge score of a batch, with its parts."""

    score: float  # mean per-pair score
    exact: float  # fraction of pairs with score 1
    count_match: float  # fraction of pairs whose object counts agree
    per_attribute: dict[str, float | None]  # pooled correct / total per attribute (None: never stated)
    n: int
    scores: list[float] = field(default_factory=list)

    def as_dict(self, with_scores: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_scores:
            d.pop("scores")
        return d


def _summarize(scores: Sequence[Score]) -> AlignmentResult:
    if not scores:
        raise ValueError("no pairs to score")
    per = {k: [0, 0] for k in ATTRIBUTES}
    for s in scores:
        for k, (c, t) in s.per_attribute.items():
            per[k][0] += c
            per[k][1] += t
    values = [float(s.score) for s in scores]
    return AlignmentResult(
        score=float(np.mean(values)),
        exact=float(np.mean([v >= 1.0 for v in values])),
        count_match=float(np.mean([s.count_match for s in scores])),
        per_attribute={k: (c / t if t else None) for k, (c, t) in per.items()},
        n=len(values),
        scores=values,
    )


def _image_list(images: torch.Tensor | np.ndarray | Sequence) -> list:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(
                f"images: expected (N, 3, H, W) or (N, H, W, 3); got shape {tuple(images.shape)}"
            )
        return [images[i] for i in range(images.shape[0])]
    return list(images)


def text_to_image_alignment(
    images: torch.Tensor | np.ndarray | Sequence, prompts: Sequence[str]
) -> AlignmentResult:
    """Judge accuracy of ``images`` ((N, 3, H, W) in [-1, 1], or what ``judge_image`` takes) vs prompts."""
    imgs = _image_list(images)
    if isinstance(prompts, str) or len(imgs) != len(prompts):
        raise ValueError(f"{len(imgs)} images but {1 if isinstance(prompts, str) else len(prompts)} prompts")
    return _summarize([judge_image(img, p) for img, p in zip(imgs, prompts, strict=True)])


def caption_accuracy(captions: Sequence[str], truths: Sequence) -> AlignmentResult:
    """Attribute accuracy of ``captions`` against ``truths`` (per caption: a list of ``ShapeObject`` or
    an image for the judge to parse)."""
    if isinstance(captions, str):
        raise ValueError("captions must be a list of strings")
    truth_list = _image_list(truths) if isinstance(truths, (torch.Tensor, np.ndarray)) else list(truths)
    if len(captions) != len(truth_list):
        raise ValueError(f"{len(captions)} captions but {len(truth_list)} truths")
    return _summarize([judge_caption(c, t) for c, t in zip(captions, truth_list, strict=True)])


__all__ = ["AlignmentResult", "caption_accuracy", "text_to_image_alignment"]
