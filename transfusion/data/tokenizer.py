"""Text tokenizers: a pure byte-level one and a byte-level BPE (HuggingFace ``tokenizers``).

Both share the special tokens and their ids, fixed for every vocabulary:
``PAD=0, BOS=1, EOS=2, BOI=3 (begin image), EOI=4 (end image)``. Ordinary text never
encodes to a special id (a literal "<|bos|>" in the text is encoded as plain text), so
``decode(encode(s)) == s`` for every string ``s``. Both save to / load from one JSON file.

Bits per byte: sum the token NLL (nats) over a text and call
``bits_per_byte(nll, utf8_len(text))``, which makes numbers comparable across
tokenizers.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

SPECIAL_TOKENS: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|eos|>", "<|boi|>", "<|eoi|>")
PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)
_FORMAT = "transfusion-tokenizer"
_SPECIAL_MAP = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def utf8_len(text: str) -> int:
    """Number of UTF-8 bytes of ``text`` (the denominator of bits per byte)."""
    return len(text.encode("utf-8"))


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Convert a summed negative log-likelihood in nats into bits per UTF-8 byte."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes: must be positive, got {num_bytes}")
    return nll_nats / (math.log(2) * num_bytes)


class TextTokenizer(ABC):
    """Common interface; special ids are class constants shared by all tokenizers."""

    pad_id, bos_id, eos_id, boi_id, eoi_id = PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID
    special_tokens = SPECIAL_TOKENS

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def _encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def _payload(self) -> dict: ...

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._encode(text)
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``; specials are dropped, or rendered as their names if not skipped."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: token id {i} outside [0, {self.vocab_size})")
            if i < NUM_SPECIAL:
                out.append(self._decode(run))
                run = []
                if not skip_special:
                    out.append(SPECIAL_TOKENS[i])
            else:
                run.append(i)
        out.append(self._decode(run))
        return "".join(out)

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Average UTF-8 bytes per token over ``texts`` (compression ratio)."""
        n_bytes = n_tokens = 0
        for t in texts:
            n_bytes += utf8_len(t)
            n_tokens += len(self._encode(t))
        return n_bytes / max(n_tokens, 1)

    def save(self, path: str | Path) -> None:
        data = {
            "format": _FORMAT,
            "version": 1,
            "special_tokens": _SPECIAL_MAP,
        }
        Path(path).write_text(json.dumps(data | self._payload(), ensure_ascii=False), encoding="utf-8")

    @staticmethod
    def load(path: str | Path) -> TextTokenizer:
        return load_tokenizer(path)


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes shifted past the specials: id = byte + 5; vocabulary 261."""

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + 256

    def _encode(self, text: str) -> list[int]:
        return [b + NUM_SPECIAL for b in text.encode("utf-8")]

    def _decode(self, ids: list[int]) -> str:
        return bytes(i - NUM_SPECIAL for i in ids).decode("utf-8", errors="replace")

    def _payload(self) -> dict:
        return {"type": "byte"}


def _hf():
    try:
        import tokenizers
    except ImportError as e:  # a dev dependency; the byte tokenizer needs nothing
        raise ImportError("BPETokenizer needs the 'tokenizers' package (pip install tokenizers)") from e
    return tokenizers


class BPETokenizer(TextTokenizer):
    """Byte-level BPE: 5 specials, then the 256 byte symbols, then learned merges."""

    def __init__(self, hf_tokenizer) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            if hf_tokenizer.token_to_id(tok) != i:
                raise ValueError(
                    f"special_tokens: {tok!r} must have id {i}, got {hf_tokenizer.token_to_id(tok)}"
                )
        hf_tokenizer.encode_special_tokens = True  # literal "<|bos|>" in text stays text
        self.hf = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512, min_frequency: int = 2) -> BPETokenizer:
        if not isinstance(vocab_size, int) or vocab_size < NUM_SPECIAL + 256:
            raise ValueError(f"vocab_size: must be an int >= {NUM_SPECIAL + 256}, got {vocab_size!r}")
        tk = _hf()
        hf = tk.Tokenizer(tk.models.BPE())
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0..4
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def _encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False) if ids else ""

    def _payload(self) -> dict:
        return {"type": "bpe", "hf_tokenizer": json.loads(self.hf.to_str())}


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a tokenizer saved by ``TextTokenizer.save``; checks the special ids."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read tokenizer ({e})") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a {_FORMAT} file")
    if data.get("special_tokens") != _SPECIAL_MAP:
        raise ValueError(f"{path}: special_tokens differ from {SPECIAL_TOKENS}")
    kind = data.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer(_hf().Tokenizer.from_str(json.dumps(data["hf_tokenizer"])))
    raise ValueError(f"{path}: unknown tokenizer type {kind!r}")


def get_tokenizer(
    kind: str = "byte", corpus: Iterable[str] | None = None, vocab_size: int = 512
) -> TextTokenizer:
    """``"byte"`` needs nothing; ``"bpe"`` is trained on ``corpus`` (e.g. dataset captions)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if corpus is None:
            raise ValueError("corpus: required to train a 'bpe' tokenizer")
        return BPETokenizer.train(corpus, vocab_size=vocab_size)
    raise ValueError(f"kind: unknown tokenizer {kind!r}, expected 'byte' or 'bpe'")
