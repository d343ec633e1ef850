"""``transfusion train`` end to end on the other data sources and the BPE tokenizer (a few steps each)."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_data_sources import _write_folder
from tests.test_train import SMALL_ARGS
from transfusion.cli import main
from transfusion.train import read_metrics


def _train(tmp_path, capsys, *extra: str) -> dict:
    out = tmp_path / "run"
    args = [a for a in SMALL_ARGS if not a.startswith("data.max_objects")]  # a shapes-only option
    code = main(["train", *args, "--steps", "3", "--out", str(out), "log_every=1", *extra])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    return json.loads((out / "config.json").read_text())


def test_train_on_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    cfg = _train(tmp_path, capsys, "dataset=digits", "train_examples=64")
    assert cfg["train"]["dataset"] == "digits"


def test_train_on_an_image_folder(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    _write_folder(root, n=8)
    cfg = _train(tmp_path, capsys, "dataset=folder", f"data.root={root}", "train_examples=0")
    assert cfg["train"]["dataset"] == "folder" and cfg["train"]["dataset_options"]["root"] == str(root)


def test_train_with_a_bpe_tokenizer(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    cfg = _train(tmp_path, capsys, "tokenizer=bpe", "model.vocab_size=300")
    assert cfg["train"]["tokenizer"] == "bpe"
    assert (tmp_path / "run" / "tokenizer.json").is_file()
