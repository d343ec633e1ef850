"""The shapes judge: image parsing accuracy, caption parsing, scoring."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transfusion.data.image import uint8_to_tensor
from transfusion.data.judge import (
    ATTRIBUTES,
    CaptionObject,
    judge_caption,
    judge_image,
    match_objects,
    parse_caption,
    parse_image,
    score_caption,
    score_image,
)
from transfusion.data.shapes import (
    COLORS,
    NUM_CAPTION_STYLES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesConfig,
    ShapesGenerator,
    make_caption,
)


def _accuracy(samples: list) -> dict[str, float]:
    """Per-attribute accuracy of parse_image against ground truth (unmatched = wrong)."""
    correct = dict.fromkeys(ATTRIBUTES, 0)
    total = count_ok = 0
    for image, objects in samples:
        found = parse_image(image)
        count_ok += len(found) == len(objects)
        pairs = dict((j, i) for i, j in match_objects(found, list(objects)))
        for j, o in enumerate(objects):
            total += 1
            if j in pairs:
                for k in ATTRIBUTES:
                    correct[k] += getattr(found[pairs[j]], k) == getattr(o, k)
    acc = {k: v / total for k, v in correct.items()}
    acc["count"] = count_ok / len(samples)
    return acc


def test_judge_accuracy_32px() -> None:
    # a seed and split never used elsewhere: fresh samples
    g = ShapesGenerator(ShapesConfig(seed=2024, holdout_pairs=()))
    acc = _accuracy([(s.image, s.objects) for s in (g.sample("test", i) for i in range(500))])
    assert all(v >= 0.99 for v in acc.values()), acc


def test_judge_accuracy_64px_and_tensor_input() -> None:
    g = ShapesGenerator(ShapesConfig(image_size=64, seed=77, max_objects=3))
    samples = [(uint8_to_tensor(s.image), s.objects) for s in (g.sample("test", i) for i in range(120))]
    acc = _accuracy(samples)
    assert all(v >= 0.99 for v in acc.values()), acc


def test_judge_accuracy_holdout_pairs() -> None:
    g = ShapesGenerator(ShapesConfig(seed=11))
    acc = _accuracy([(s.image, s.objects) for s in (g.sample("holdout", i) for i in range(100))])
    assert all(v >= 0.99 for v in acc.values()), acc


def _degrade(image: np.ndarray, sigma: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (separable, zero-padded) plus white noise, as float HxWx3 in [-1, 1]."""
    x = image.astype(np.float64) / 127.5 - 1.0
    r = int(np.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    h, w, _ = x.shape
    pad = np.pad(x + 1.0, ((r, r), (r, r), (0, 0)))  # pad with background (-1)
    x = sum(k[i] * pad[:, i : i + w] for i in range(2 * r + 1))
    x = sum(k[i] * x[i : i + h] for i in range(2 * r + 1)) - 1.0
    return np.clip(x + noise * rng.standard_normal(x.shape), -1.0, 1.0).astype(np.float32)


def test_judge_tolerates_mild_blur_and_noise() -> None:
    g = ShapesGenerator(ShapesConfig(seed=8))
    rng = np.random.default_rng(0)
    samples = [
        (_degrade(s.image, 0.7, 0.1, rng), s.objects) for s in (g.sample("test", i) for i in range(150))
    ]
    acc = _accuracy(samples)
    assert all(v >= 0.97 for v in acc.values()), acc


def test_judge_tolerates_gaussian_blur_at_64px() -> None:
    g = ShapesGenerator(ShapesConfig(seed=8, image_size=64))
    rng = np.random.default_rng(1)
    samples = [
        (_degrade(s.image, 1.5, 0.05, rng), s.objects) for s in (g.sample("test", i) for i in range(60))
    ]
    acc = _accuracy(samples)
    assert all(v >= 0.97 for v in acc.values()), acc


def test_empty_and_noise_images() -> None:
    assert parse_image(np.zeros((32, 32, 3), np.uint8)) == []
    rng = np.random.default_rng(0)
    noise = np.clip(rng.normal(20, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert parse_image(noise) == []
    assert score_image(np.zeros((32, 32, 3), np.uint8), "a small red circle at the top left") == 0.0


def test_true_caption_scores_one() -> None:
    g = ShapesGenerator(ShapesConfig(seed=9))
    for i in range(60):
        s = g.sample("val", i)
        assert score_image(s.image, s.caption) == 1.0
        assert score_caption(s.caption, list(s.objects)) == 1.0
        assert score_caption(s.caption, s.image) == 1.0


def _swap(value: str, options: tuple[str, ...]) -> str:
    return options[(options.index(value) + 1) % len(options)]


def test_wrong_caption_rejected() -> None:
    g = ShapesGenerator(ShapesConfig(seed=9))
    s = next(s for s in (g.sample("val", i) for i in range(50)) if len(s.objects) == 2)
    o = s.objects[0]
    variants = {
        "color": ShapeObject(_swap(o.color, COLORS), o.shape, o.size, o.position),
        "shape": ShapeObject(o.color, _swap(o.shape, SHAPES), o.size, o.position),
        "size": ShapeObject(o.color, o.shape, "small" if o.size == "large" else "large", o.position),
    }
    for attr, wrong in variants.items():
        caption = make_caption((wrong, s.objects[1]), style=0)
        result = judge_image(s.image, caption)
        assert result.score == pytest.approx(7 / 8), (attr, caption)
        assert result.per_attribute[attr] == (1, 2)
        assert score_caption(caption, list(s.objects)) == pytest.approx(7 / 8)
        assert judge_caption(caption, list(s.objects)).per_attribute[attr] == (1, 2)
    # an invented third object is penalised by score_caption, not by score_image's matched part
    extra = ShapeObject(
        "cyan",
        "cross",
        "small",
        next(p for p in ("top left", "center", "bottom right") if p not in {x.position for x in s.objects}),
    )
    caption = make_caption((*s.objects, extra), style=2)
    assert score_caption(caption, list(s.objects)) == pytest.approx(8 / 12)
    assert judge_image(s.image, caption).count_match is False
    # omitting an object halves the caption score
    assert score_caption(make_caption(s.objects[:1], 1), list(s.objects)) == pytest.approx(0.5)


@pytest.mark.parametrize("style", range(4))
def test_parse_caption_all_phrasings(style: int) -> None:
    objs = (
        ShapeObject("purple", "triangle", "large", "middle right"),
        ShapeObject("yellow", "cross", "small", "center"),
    )
    caption = make_caption(objs, style)
    parsed = parse_caption(caption)
    assert [p.attributes() for p in parsed] == [o.attributes() for o in objs], caption


def test_parse_caption_variants() -> None:
    assert parse_caption("A BIG violet disc in the centre.") == [
        CaptionObject("purple", "circle", "large", "center")
    ]
    assert parse_caption("upper right: little blue box") == [
        CaptionObject("blue", "square", "small", "top right")
    ]
    assert parse_caption("a red triangle at the top") == [CaptionObject("red", "triangle", None, None)]
    assert parse_caption("bottom center: a cyan plus; a green square at the middle left") == [
        CaptionObject("cyan", "cross", None, "bottom center"),
        CaptionObject("green", "square", None, "middle left"),
    ]
    assert parse_caption("nothing to see here") == []


def test_partial_caption_scoring() -> None:
    g = ShapesGenerator(ShapesConfig(seed=4))
    s = next(s for s in (g.sample("test", i) for i in range(50)) if len(s.objects) == 1)
    o = s.objects[0]
    # only stated attributes count for score_image
    assert score_image(s.image, f"a {o.color} {o.shape}") == 1.0
    assert judge_image(s.image, f"a {o.color} {o.shape}").per_attribute["size"] == (0, 0)
    # but a caption that omits attributes loses them in score_caption
    assert score_caption(f"a {o.color} {o.shape}", list(s.objects)) == pytest.approx(0.5)
    assert score_caption("", list(s.objects)) == 0.0


_objects = st.lists(
    st.tuples(
        st.sampled_from(COLORS), st.sampled_from(SHAPES), st.sampled_from(SIZES), st.sampled_from(POSITIONS)
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda t: t[3],
)


@settings(max_examples=150, deadline=None)
@given(_objects, st.integers(0, NUM_CAPTION_STYLES - 1))
def test_parse_caption_inverts_make_caption(objs: list, style: int) -> None:
    objects = tuple(ShapeObject(*o) for o in objs)
    caption = make_caption(objects, style)
    assert [p.attributes() for p in parse_caption(caption)] == [o.attributes() for o in objects]
    assert score_caption(caption, list(objects)) == 1.0
