"""Data for the Transfusion bench: datasets, a shapes judge and text tokenizers.

Every dataset yields ``{"image": float32 (3, H, W) in [-1, 1], "caption": str, ...}``;
build one with ``get_dataset(name, split, **config)``.
"""

from transfusion.data.digits import DigitsConfig, DigitsDataset, caption_label
from transfusion.data.folder import FolderConfig, FolderDataset
from transfusion.data.image import as_uint8_hwc, tensor_to_uint8, uint8_to_tensor
from transfusion.data.judge import (
    CaptionObject,
    DetectedObject,
    Score,
    judge_caption,
    judge_image,
    parse_caption,
    parse_image,
    score_caption,
    score_image,
)
from transfusion.data.registry import collate, get_dataset, list_datasets
from transfusion.data.shapes import (
    COLORS,
    DEFAULT_HOLDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    ShapesGenerator,
    ShapesSample,
)
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

__all__ = [
    "BOI_ID", "BOS_ID", "COLORS", "DEFAULT_HOLDOUT_PAIRS", "EOI_ID", "EOS_ID", "PAD_ID", "POSITIONS",
    "SHAPES", "SIZES", "SPECIAL_TOKENS",
    "BPETokenizer", "ByteTokenizer", "CaptionObject", "DetectedObject", "DigitsConfig", "DigitsDataset",
    "FolderConfig", "FolderDataset", "Score", "ShapeObject", "ShapesConfig", "ShapesDataset",
    "ShapesGenerator", "ShapesSample", "TextTokenizer",
    "as_uint8_hwc", "bits_per_byte", "caption_label", "collate", "get_dataset", "get_tokenizer",
    "judge_caption", "judge_image", "list_datasets", "load_tokenizer", "parse_caption", "parse_image",
    "score_caption", "score_image", "tensor_to_uint8", "uint8_to_tensor", "utf8_len",
]  # fmt: skip
