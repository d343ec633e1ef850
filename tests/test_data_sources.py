"""Digits, image folders and the dataset registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from transfusion.data import collate, get_dataset, list_datasets
from transfusion.data.digits import DigitsConfig, DigitsDataset, caption_label
from transfusion.data.folder import FolderConfig, FolderDataset

# ---------------------------------------------------------------- digits


def test_digits_splits_and_labels() -> None:
    splits = {s: DigitsDataset(DigitsConfig(seed=0), s) for s in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == 1797
    index_sets = [set(d.indices.tolist()) for d in splits.values()]
    assert set.union(*index_sets) == set(range(1797))
    assert sum(len(s) for s in index_sets) == 1797  # disjoint
    styles = set()
    for d in splits.values():
        for i in range(0, len(d), 7):
            item = d[i]
            assert caption_label(item["caption"]) == item["label"]
            assert item["image"].shape == (3, 32, 32)
            assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
            styles.add(item["caption"].split()[1])
    assert {"digit", "handwritten", "number"} <= styles


def test_digits_deterministic_and_seeded() -> None:
    a, b = DigitsDataset(DigitsConfig(seed=1), "val"), DigitsDataset(DigitsConfig(seed=1), "val")
    assert np.array_equal(a.indices, b.indices)
    assert torch.equal(a[3]["image"], b[3]["image"]) and a[3]["caption"] == b[3]["caption"]
    c = DigitsDataset(DigitsConfig(seed=2), "val")
    assert not np.array_equal(a.indices, c.indices)


def test_digits_pixels_match_source() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    d = DigitsDataset(DigitsConfig(image_size=8), "test")
    item = d[0]
    src = raw.images[d.indices[0]]
    assert raw.target[d.indices[0]] == item["label"]
    assert torch.allclose(item["image"][0], torch.from_numpy(src).float() / 8 - 1)
    assert torch.equal(item["image"][0], item["image"][2])  # grey repeated to RGB


# ---------------------------------------------------------------- folder


def _write_folder(root: Path, n: int = 6) -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        w, h = (40, 24) if i % 2 else (24, 24)
        mode = ["RGB", "L", "RGBA"][i % 3]
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(root / f"img{i}.png")
        lines.append(json.dumps({"file": f"img{i}.png", "caption": f"picture number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n\n")  # trailing blank line is fine
    return lines


def test_folder_loads_and_crops(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    ds = FolderDataset(FolderConfig(root=tmp_path, image_size=16, verify=True))
    assert len(ds) == 6
    for i in range(6):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        assert item["caption"] == f"picture number {i}" and item["file"].endswith(f"img{i}.png")
    # same-size image: no resampling, exact pixels
    same = FolderDataset(FolderConfig(root=tmp_path, image_size=24))[0]["image"]
    src = np.array(Image.open(tmp_path / "img0.png"))
    assert torch.equal(same, torch.from_numpy(src).permute(2, 0, 1).float() / 127.5 - 1)


def test_folder_splits(tmp_path: Path) -> None:
    _write_folder(tmp_path, n=10)
    cfg = FolderConfig(root=tmp_path, val_fraction=0.2, test_fraction=0.2, seed=3)
    files = {s: {e[0].name for e in FolderDataset(cfg, s).entries} for s in ("train", "val", "test")}
    assert [len(files[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert len(files["train"] | files["val"] | files["test"]) == 10


def _expect_error(root: Path, *needles: str, verify: bool = False, load_item: bool = False) -> None:
    with pytest.raises(ValueError) as info:
        ds = FolderDataset(FolderConfig(root=root, verify=verify))
        if load_item:
            for i in range(len(ds)):
                ds[i]
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_folder_errors_name_the_file(tmp_path: Path) -> None:
    lines = _write_folder(tmp_path, n=3)
    index = tmp_path / "captions.jsonl"
    # missing image
    index.write_text("\n".join([*lines, json.dumps({"file": "gone.png", "caption": "x"})]))
    _expect_error(tmp_path, "gone.png", "captions.jsonl:4")
    # bad JSON line
    index.write_text("\n".join([lines[0], "{not json", lines[1]]))
    _expect_error(tmp_path, "captions.jsonl:2", "invalid JSON")
    # missing key / wrong type
    index.write_text("\n".join([lines[0], json.dumps({"file": "img1.png"})]))
    _expect_error(tmp_path, "captions.jsonl:2", "'caption'")
    index.write_text(json.dumps({"file": "img1.png", "caption": 5}))
    _expect_error(tmp_path, "captions.jsonl:1", "'caption'")
    # corrupt image: named at load time, or up front with verify=True
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    index.write_text("\n".join([lines[0], json.dumps({"file": "bad.png", "caption": "x"})]))
    _expect_error(tmp_path, "bad.png", verify=True)
    _expect_error(tmp_path, "bad.png", load_item=True)
    # no index at all
    index.unlink()
    _expect_error(tmp_path, "captions.jsonl")


# ---------------------------------------------------------------- registry


def test_registry_builds_every_dataset(tmp_path: Path) -> None:
    _write_folder(tmp_path, n=4)
    assert list_datasets() == ["digits", "folder", "shapes"]
    datasets = {
        "shapes": get_dataset("shapes", "test", length=8, image_size=32),
        "digits": get_dataset("digits", "val", image_size=32),
        "folder": get_dataset("folder", "all", root=str(tmp_path), image_size=32),
    }
    for name, ds in datasets.items():
        item = ds[0]
        assert item["image"].shape == (3, 32, 32), name
        assert isinstance(item["caption"], str) and item["caption"], name
        assert item["image"].dtype == torch.float32
    assert "objects" in datasets["shapes"][0]
    batch = next(iter(DataLoader(datasets["shapes"], batch_size=4, collate_fn=collate)))
    assert (
        batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4 and len(batch["objects"]) == 4
    )


@pytest.mark.parametrize(
    ("name", "split", "config", "needles"),
    [
        ("imagenet", "train", {}, ["name", "imagenet"]),
        ("shapes", "bogus", {}, ["split", "bogus"]),
        ("shapes", "train", {"image_size": -4}, ["image_size", "-4"]),
        ("shapes", "train", {"colour_count": 3}, ["colour_count", "3"]),
        ("shapes", "train", {"length": "many"}, ["length", "many"]),
        ("digits", "train", {"image_size": 0}, ["image_size", "0"]),
        ("digits", "holdout", {}, ["split", "holdout"]),
        ("folder", "train", {"root": "/nonexistent/dir"}, ["root", "/nonexistent/dir"]),
        ("folder", "train", {}, ["root"]),
    ],
)
def test_registry_errors(name: str, split: str, config: dict, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        get_dataset(name, split, **config)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
