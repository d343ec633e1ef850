"""Judge for the shapes dataset: caption -> objects, and image/caption agreement scores.

``parse_image`` (re-exported from ``transfusion.data.detect``, which documents the
image pipeline and its limits) turns an image into objects; ``parse_caption`` turns
a caption into objects. ``score_image(image, caption)`` is the fraction of the
attributes the caption states that the image shows; ``score_caption(caption, truth)``
is the attribute accuracy of a caption against ground-truth objects or an image.
Stated and actual objects are paired by the assignment that maximises agreeing
attributes (exhaustive up to 5040 assignments, e.g. 7 objects; greedy beyond).

Caption parsing is keyword based: each clause (split on "and", ";", ".", newlines)
is one object; colour, shape and size words (with a few synonyms and plurals) and
row/column words ("top"/"upper", "middle"/"center"/"centre", "bottom"/"lower",
"left", "right") are picked up and everything else is ignored. A lone row or column
word ("at the top") is ambiguous and gives no position. Two objects described in
one clause without "and" are read as one.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from transfusion.data.detect import DetectedObject, parse_image
from transfusion.data.shapes import PALETTE, POSITIONS, ShapeObject

__all__ = [
    "ATTRIBUTES", "CaptionObject", "DetectedObject", "Score", "judge_caption", "judge_image",
    "match_objects", "parse_caption", "parse_image", "score_caption", "score_image",
]  # fmt: skip

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")


@dataclass(frozen=True)
class CaptionObject:
    """Attributes stated for one object; ``None`` where the caption says nothing."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None

    def attributes(self) -> dict[str, str | None]:
        return {"color": self.color, "shape": self.shape, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Score:
    """``score`` = correct / total; ``per_attribute`` maps attribute -> (correct, total)."""

    score: float
    per_attribute: dict[str, tuple[int, int]]
    count_match: bool


# ---------------------------------------------------------------- caption side

_COLOR_WORDS = {name: name for name in PALETTE} | {"violet": "purple", "turquoise": "cyan", "aqua": "cyan"}
_SHAPE_WORDS = {
    "circle": "circle", "disc": "circle", "disk": "circle", "ball": "circle",
    "square": "square", "box": "square", "rectangle": "square",
    "triangle": "triangle",
    "cross": "cross", "plus": "cross",
}  # fmt: skip
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_ROW_WORDS = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_COL_WORDS = {"left": 0, "right": 2}
_MID_WORDS = {"center", "centre", "middle", "central"}
_CLAUSE_SPLIT = re.compile(r"\band\b|[;.\n]")


def _word(token: str, table: dict[str, str]) -> str | None:
    if token in table:
        return table[token]
    if token.endswith("s") and token[:-1] in table:  # plurals
        return table[token[:-1]]
    return None


def _parse_clause(clause: str) -> CaptionObject | None:
    tokens = re.findall(r"[a-z]+", clause.lower())
    color = shape = size = None
    row = col = None
    mid = False
    for t in tokens:
        color = color or _word(t, _COLOR_WORDS)
        shape = shape or _word(t, _SHAPE_WORDS)
        size = size or _word(t, _SIZE_WORDS)
        if t in _ROW_WORDS and row is None:
            row = _ROW_WORDS[t]
        elif t in _COL_WORDS and col is None:
            col = _COL_WORDS[t]
        elif t in _MID_WORDS:
            mid = True
    # "middle"/"center" fills whichever of row/column is missing; a lone row or
    # column word ("at the top") is ambiguous and yields no position
    if mid:
        row = 1 if row is None else row
        col = 1 if col is None else col
    position = POSITIONS[row * 3 + col] if row is not None and col is not None else None
    obj = CaptionObject(color, shape, size, position)
    return obj if any(v is not None for v in obj.attributes().values()) else None


def parse_caption(caption: str) -> list[CaptionObject]:
    """Objects stated by a caption, one per clause; unstated attributes are ``None``."""
    objs = (_parse_clause(c) for c in _CLAUSE_SPLIT.split(caption))
    return [o for o in objs if o is not None]


# ---------------------------------------------------------------- scoring


def _agreement(a: object, b: object) -> int:
    return sum(1 for k in ATTRIBUTES if getattr(a, k) is not None and getattr(a, k) == getattr(b, k))


def match_objects(stated: list, actual: list) -> list[tuple[int, int]]:
    """Pairs (i_stated, j_actual) maximising the number of agreeing attributes."""
    if not stated or not actual:
        return []
    if math.perm(max(len(stated), len(actual)), min(len(stated), len(actual))) > 5040:
        return _greedy_match(stated, actual)  # exhaustive search would blow up factorially
    if len(stated) <= len(actual):
        options = [
            list(zip(range(len(stated)), p, strict=True))
            for p in itertools.permutations(range(len(actual)), len(stated))
        ]
    else:
        options = [
            list(zip(p, range(len(actual)), strict=True))
            for p in itertools.permutations(range(len(stated)), len(actual))
        ]
    return max(options, key=lambda pairs: sum(_agreement(stated[i], actual[j]) for i, j in pairs))


def _greedy_match(stated: list, actual: list) -> list[tuple[int, int]]:
    pairs, used = [], set()
    for i, s in enumerate(stated):
        best = max(
            (j for j in range(len(actual)) if j not in used),
            key=lambda j: _agreement(s, actual[j]),
            default=None,
        )
        if best is not None:
            used.add(best)
            pairs.append((i, best))
    return pairs


def _as_objects(image_or_objects: object) -> list:
    if isinstance(image_or_objects, (np.ndarray, torch.Tensor)):
        return parse_image(image_or_objects)
    return list(image_or_objects)


def judge_image(image: np.ndarray | torch.Tensor, caption: str) -> Score:
    """How many attributes stated by ``caption`` are present in ``image``."""
    stated = parse_caption(caption)
    actual = parse_image(image)
    per = {k: [0, 0] for k in ATTRIBUTES}
    matched = dict(match_objects(stated, actual))
    for i, s in enumerate(stated):
        for k in ATTRIBUTES:
            v = getattr(s, k)
            if v is None:
                continue
            per[k][1] += 1
            if i in matched and getattr(actual[matched[i]], k) == v:
                per[k][0] += 1
    correct = sum(c for c, _ in per.values())
    total = sum(t for _, t in per.values())
    return Score(
        correct / total if total else 0.0, {k: tuple(v) for k, v in per.items()}, len(stated) == len(actual)
    )


def score_image(image: np.ndarray | torch.Tensor, caption: str) -> float:
    """Fraction of the caption's stated attributes that the judge finds in the image."""
    return judge_image(image, caption).score


def judge_caption(caption: str, image_or_objects: np.ndarray | torch.Tensor | list[ShapeObject]) -> Score:
    """Attribute accuracy of ``caption`` against the truth (objects, or an image to parse).

    Each truth object contributes 4 attributes; objects the caption invents or omits
    count as 4 wrong attributes each, so the denominator is ``4 * max(n_true, n_stated)``.
    """
    stated = parse_caption(caption)
    truth = _as_objects(image_or_objects)
    matched = {j: i for i, j in match_objects(stated, truth)}
    n = max(len(stated), len(truth))
    per = {k: [0, n] for k in ATTRIBUTES}
    for j, t in enumerate(truth):
        if j in matched:
            for k in ATTRIBUTES:
                per[k][0] += int(getattr(stated[matched[j]], k) == getattr(t, k))
    correct = sum(c for c, _ in per.values())
    total = sum(t for _, t in per.values())
    return Score(
        correct / total if total else 0.0, {k: tuple(v) for k, v in per.items()}, len(stated) == len(truth)
    )


def score_caption(caption: str, image_or_objects: np.ndarray | torch.Tensor | list[ShapeObject]) -> float:
    """Attribute accuracy of a (generated) caption, see ``judge_caption``."""
    return judge_caption(caption, image_or_objects).score
