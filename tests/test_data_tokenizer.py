"""Byte-level and BPE tokenizers: round trips, special ids, persistence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transfusion.data.shapes import ShapesConfig, ShapesGenerator
from transfusion.data.tokenizer import (
    BOI_ID,
    BOS_ID,
    EOI_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    TextTokenizer,
    bits_per_byte,
    get_tokenizer,
    load_tokenizer,
    utf8_len,
)


def _captions(n: int = 400) -> list[str]:
    g = ShapesGenerator(ShapesConfig(seed=0))
    return [g.sample("train", i).caption for i in range(n)]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(_captions(), vocab_size=320)


@pytest.fixture(scope="module")
def byte() -> ByteTokenizer:
    return ByteTokenizer()


_TRICKY = [
    "",
    " ",
    "  two  spaces ",
    "a small red circle",
    "héllo wörld 🙂\n\t\r\n",
    "<|bos|>",
    "\x00\xff",
    "e\u0301",
]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == utf8_len(text)
    assert all(5 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(len(SPECIAL_TOKENS) <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@pytest.mark.parametrize("text", _TRICKY)
def test_round_trip_tricky(bpe: BPETokenizer, byte: ByteTokenizer, text: str) -> None:
    for tok in (bpe, byte):
        assert tok.decode(tok.encode(text)) == text
        assert BOS_ID not in tok.encode(text)  # literal special names stay plain text


def test_special_ids_fixed(bpe: BPETokenizer, byte: ByteTokenizer) -> None:
    assert (PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID) == (0, 1, 2, 3, 4)
    for tok in (bpe, byte):
        assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id) == (0, 1, 2, 3, 4)
    assert [bpe.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert byte.vocab_size == 261
    assert 261 < bpe.vocab_size <= 320


def test_save_load(tmp_path: Path, bpe: BPETokenizer, byte: ByteTokenizer) -> None:
    text = "there is a large cyan cross in the center 🙂"
    for name, tok in (("bpe", bpe), ("byte", byte)):
        path = tmp_path / f"{name}.json"
        tok.save(path)
        json.loads(path.read_text())  # plain JSON
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.encode(text, add_bos=True, add_eos=True) == tok.encode(text, add_bos=True, add_eos=True)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.boi_id, loaded.eoi_id) == (1, 2, 0, 3, 4)
        assert TextTokenizer.load(path).decode(loaded.encode(text)) == text
        assert BOS_ID not in loaded.encode("<|bos|>")


def test_load_rejects_bad_files(tmp_path: Path, byte: ByteTokenizer) -> None:
    path = tmp_path / "t.json"
    path.write_text("{nope")
    with pytest.raises(ValueError, match=r"t\.json"):
        load_tokenizer(path)
    byte.save(path)
    data = json.loads(path.read_text())
    data["special_tokens"]["<|bos|>"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="special_tokens"):
        load_tokenizer(path)


def test_specials_in_sequences(bpe: BPETokenizer, byte: ByteTokenizer) -> None:
    for tok in (bpe, byte):
        ids = tok.encode("a red square", add_bos=True, add_eos=True)
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        seq = [BOS_ID, *tok.encode("hi"), BOI_ID, EOI_ID, *tok.encode(" there"), EOS_ID, PAD_ID]
        assert tok.decode(seq) == "hi there"
        assert tok.decode(seq, skip_special=False) == "<|bos|>hi<|boi|><|eoi|> there<|eos|><|pad|>"
        with pytest.raises(ValueError, match="ids"):
            tok.decode([tok.vocab_size])


def test_bpe_compresses_and_is_deterministic(bpe: BPETokenizer, byte: ByteTokenizer) -> None:
    captions = _captions(50)
    assert byte.bytes_per_token(captions) == 1.0
    assert bpe.bytes_per_token(captions) > 2.0
    again = BPETokenizer.train(_captions(), vocab_size=320)
    assert again.hf.get_vocab() == bpe.hf.get_vocab()


def test_helpers_and_errors() -> None:
    assert utf8_len("aé🙂") == 1 + 2 + 4
    assert bits_per_byte(10 * math.log(2), 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_bytes"):
        bits_per_byte(1.0, 0)
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="kind"):
        get_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="corpus"):
        get_tokenizer("bpe")
    assert isinstance(get_tokenizer("bpe", corpus=["a b c"] * 10, vocab_size=270), BPETokenizer)
