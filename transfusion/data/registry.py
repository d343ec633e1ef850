"""``get_dataset(name, split, **config)``: one entry point for every data source.

Every dataset yields dicts with ``"image"`` (float32 ``(3, H, W)`` in ``[-1, 1]``)
and ``"caption"`` (str); shapes adds ``"objects"``, digits ``"label"``, folder
``"file"``. Unknown names, unknown config fields and bad values raise ``ValueError``
naming the field and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from transfusion.data.digits import DigitsConfig, DigitsDataset
from transfusion.data.folder import FolderConfig, FolderDataset
from transfusion.data.shapes import ShapesConfig, ShapesDataset


def _split_config(name: str, cls: type, config: dict, extra: tuple[str, ...] = ()) -> tuple[object, dict]:
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in config:
        if key not in fields and key not in extra:
            allowed = sorted(fields | set(extra))
            raise ValueError(
                f"{key}: unknown config field for dataset {name!r} (value {config[key]!r}); "
                f"expected one of {allowed}"
            )
    cfg = cls(**{k: v for k, v in config.items() if k in fields})
    return cfg, {k: v for k, v in config.items() if k in extra}


def _shapes(split: str, **config: object) -> Dataset:
    cfg, extra = _split_config("shapes", ShapesConfig, config, extra=("length",))
    return ShapesDataset(cfg, split, **extra)


def _digits(split: str, **config: object) -> Dataset:
    cfg, _ = _split_config("digits", DigitsConfig, config)
    return DigitsDataset(cfg, split)


def _folder(split: str, **config: object) -> Dataset:
    cfg, _ = _split_config("folder", FolderConfig, config)
    return FolderDataset(cfg, split)


DATASETS: dict[str, Callable[..., Dataset]] = {"shapes": _shapes, "digits": _digits, "folder": _folder}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str, split: str = "train", **config: object) -> Dataset:
    """Build dataset ``name`` ("shapes", "digits", "folder") for ``split``."""
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}, expected one of {list_datasets()}")
    try:
        return DATASETS[name](split, **config)
    except TypeError as e:  # e.g. a wrongly typed value that a dataclass check did not catch
        raise ValueError(f"config: invalid config for dataset {name!r}: {e}") from e


def collate(batch: list[dict]) -> dict:
    """Stack images; keep every other key (captions, objects, ...) as a list."""
    if not batch:
        raise ValueError("batch: empty")
    out: dict = {"image": torch.stack([b["image"] for b in batch])}
    for key in batch[0]:
        if key != "image":
            out[key] = [b[key] for b in batch]
    return out
