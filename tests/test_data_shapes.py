"""The procedural shapes dataset: determinism, splits, hold-out, captions."""

from __future__ import annotations

import hashlib
import itertools
import re

import numpy as np
import pytest
import torch

from transfusion.data import image as imgmod
from transfusion.data.shapes import (
    COLORS,
    DEFAULT_HOLDOUT_PAIRS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    ShapesDataset,
    ShapesGenerator,
    position_phrase,
)


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def gen() -> ShapesGenerator:
    return ShapesGenerator(ShapesConfig(seed=3))


def test_same_seed_same_pixels() -> None:
    a, b = ShapesGenerator(ShapesConfig(seed=7)), ShapesGenerator(ShapesConfig(seed=7))
    for split, i in [("train", 0), ("train", 12345), ("val", 3), ("test", 99), ("holdout", 5)]:
        sa, sb = a.sample(split, i), b.sample(split, i)
        assert np.array_equal(sa.image, sb.image)
        assert sa.caption == sb.caption and sa.objects == sb.objects
    # order of access does not matter (no shared RNG state)
    assert np.array_equal(
        a.sample("train", 4).image, ShapesGenerator(ShapesConfig(seed=7)).sample("train", 4).image
    )


def test_different_seed_differs() -> None:
    a, b = ShapesGenerator(ShapesConfig(seed=0)), ShapesGenerator(ShapesConfig(seed=1))
    differing = sum(
        not np.array_equal(a.sample("train", i).image, b.sample("train", i).image) for i in range(20)
    )
    assert differing == 20


def test_image_format(gen: ShapesGenerator) -> None:
    s = gen.sample("train", 0)
    assert s.image.dtype == np.uint8 and s.image.shape == (32, 32, 3)
    assert tuple(s.image[0, 0]) == (0, 0, 0)  # black background at the corner margin
    big = ShapesGenerator(ShapesConfig(image_size=64)).sample("train", 0)
    assert big.image.shape == (64, 64, 3)
    item = ShapesDataset(ShapesConfig(seed=3), "train", length=4)[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    assert np.array_equal(imgmod.tensor_to_uint8(item["image"]), s.image)  # exact round trip
    assert item["caption"] == s.caption and item["objects"] == list(s.objects)


def test_splits_are_disjoint(gen: ShapesGenerator) -> None:
    seen: dict[str, set[str]] = {}
    for split in ("train", "val", "test", "holdout"):
        seen[split] = {_digest(gen.sample(split, i).image) for i in range(300)}
        assert len(seen[split]) == 300  # no repeats inside a split either
    for a, b in itertools.combinations(seen, 2):
        assert not seen[a] & seen[b], (a, b)


def test_holdout_pairs_only_in_holdout(gen: ShapesGenerator) -> None:
    held = set(DEFAULT_HOLDOUT_PAIRS)
    for split in ("train", "val", "test"):
        for i in range(700):
            pairs = {(o.color, o.shape) for o in gen.sample(split, i).objects}
            assert not pairs & held, (split, i, pairs)
    seen_held = set()
    for i in range(300):
        pairs = {(o.color, o.shape) for o in gen.sample("holdout", i).objects}
        assert pairs & held, i
        seen_held |= pairs & held
    assert seen_held == held


def test_holdout_fraction_by_seed() -> None:
    a = ShapesConfig(seed=5, holdout_fraction=0.25).resolved_holdout()
    assert a == ShapesConfig(seed=5, holdout_fraction=0.25).resolved_holdout()
    assert len(a) == 6
    assert a != ShapesConfig(seed=6, holdout_fraction=0.25).resolved_holdout()
    kept = set(itertools.product(COLORS, SHAPES)) - set(a)
    assert {c for c, _ in kept} == set(COLORS) and {s for _, s in kept} == set(SHAPES)
    g = ShapesGenerator(ShapesConfig(seed=5, holdout_fraction=0.25))
    for i in range(300):
        assert not {(o.color, o.shape) for o in g.sample("train", i).objects} & set(a)


def test_no_holdout() -> None:
    g = ShapesGenerator(ShapesConfig(holdout_pairs=()))
    assert len(g.train_pairs) == len(COLORS) * len(SHAPES)
    with pytest.raises(ValueError, match="holdout"):
        g.sample("holdout", 0)


def test_objects_layout_and_coverage(gen: ShapesGenerator) -> None:
    counts: dict[str, set] = {"color": set(), "shape": set(), "size": set(), "position": set(), "n": set()}
    cell = 32 / 3
    for i in range(1000):
        objs = gen.sample("train", i).objects
        cells = [o.cell for o in objs]
        assert len(set(cells)) == len(cells)  # one object per cell
        counts["n"].add(len(objs))
        for o in objs:
            row, col = divmod(o.cell, 3)
            half = o.extent / 2
            # bounding box stays inside the object's cell (with a margin)
            assert col * cell + 0.99 <= o.center[0] - half and o.center[0] + half <= (col + 1) * cell - 0.99
            assert row * cell + 0.99 <= o.center[1] - half and o.center[1] + half <= (row + 1) * cell - 0.99
            for k in ("color", "shape", "size", "position"):
                counts[k].add(getattr(o, k))
    assert counts["color"] == set(COLORS) and len(COLORS) >= 6
    assert counts["shape"] == set(SHAPES) and counts["size"] == set(SIZES)
    assert counts["position"] == set(POSITIONS) and counts["n"] == {1, 2}


def test_captions_state_every_attribute(gen: ShapesGenerator) -> None:
    starts = set()
    for i in range(400):
        s = gen.sample("train", i)
        clauses = re.split(r"\band\b", s.caption)
        assert len(clauses) == len(s.objects)
        for clause, o in zip(clauses, s.objects, strict=True):
            words = clause.split()
            assert o.color in words and o.shape in words and o.size in words
            assert o.position in clause
        starts.add(s.caption.split()[0])
    # several phrasings are in use ("a", "there", "one", and "<position>:")
    assert {"a", "there", "one"} <= starts and any(w.endswith(":") for w in starts)


def test_position_phrases() -> None:
    assert position_phrase("center") == "in the center"
    assert position_phrase("top left") == "at the top left"


def test_colour_and_shade_jitter(gen: ShapesGenerator) -> None:
    # the same nominal colour is rendered with different shades
    shades = set()
    for i in range(200):
        s = gen.sample("train", i)
        if len(s.objects) == 1 and s.objects[0].color == "red" and s.objects[0].shape == "square":
            shades.add(tuple(s.image.reshape(-1, 3).max(axis=0)))
    assert len(shades) >= 2
    assert len(PALETTE) >= 6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 8}, "image_size"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 10}, "max_objects"),
        ({"seed": -1}, "seed"),
        ({"holdout_pairs": (("pink", "circle"),)}, "holdout_pairs"),
        ({"holdout_fraction": 1.5}, "holdout_fraction"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ShapesConfig(**kwargs)


def test_dataset_bounds() -> None:
    ds = ShapesDataset(split="val", length=5)
    assert len(ds) == 5
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="bogus")
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(length=0)


def test_more_objects() -> None:
    g = ShapesGenerator(ShapesConfig(max_objects=4, seed=2))
    sizes = {len(g.sample("train", i).objects) for i in range(100)}
    assert sizes == {1, 2, 3, 4}
