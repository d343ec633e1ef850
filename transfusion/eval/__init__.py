"""Evaluation helpers: judge-based alignment / captioning accuracy and text bits per byte.

* ``alignment``: ``text_to_image_alignment(images, prompts)`` and ``caption_accuracy(captions, truths)``,
  thin batch wrappers on ``transfusion.data.judge``.
* ``text``: ``bits_per_byte_of_texts(logits_fn, tokenizer, texts)`` and ``model_logits_fn(model)``.
* ``fid``: ``fid_kid(real, fake, extractor="cnn" | "inception", ...)`` through torch-fidelity, with a small
  CNN trained by the suite on shapes (``features``) or Inception from a local weights file. Import it
  as ``from transfusion.eval.fid import fid_kid`` (not here: it loads torch-fidelity and torchvision).
"""

from transfusion.eval.alignment import AlignmentResult, caption_accuracy, text_to_image_alignment
from transfusion.eval.text import TextEval, bits_per_byte_of_texts, model_logits_fn, text_nll

__all__ = [
    "AlignmentResult",
    "TextEval",
    "bits_per_byte_of_texts",
    "caption_accuracy",
    "model_logits_fn",
    "text_nll",
    "text_to_image_alignment",
]
