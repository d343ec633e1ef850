"""Inference for Transfusion (one decoder that samples text tokens and diffuses images) and the discrete
baseline's text-to-image / captioning through the same API and command.

* ``generate(model, prompts, ...)``: continue mixed-modal documents (``decoder.py``).
* ``text_to_image`` / ``caption``: the two directions evaluation needs, for Transfusion and for the
  discrete baseline (``is_discrete`` tells them apart) (``api.py``).
* ``SamplingConfig``, ``row_generators``, ``make_scheduler``: settings, seeding, diffusers schedulers
  (``sampling.py``).
* ``DecodeContext``: the left-padded KV cache (or recompute) context (``context.py``).
* ``load_run``, ``make_grid``, ``save_png``, ``load_image``: run directories and image files (``run.py``).
* ``generate_main`` / ``add_generate_subparser``: the ``transfusion generate`` command (``command.py``).
"""

from transfusion.generation.api import caption, is_discrete, text_to_image
from transfusion.generation.command import add_generate_subparser, generate_main
from transfusion.generation.context import DecodeContext
from transfusion.generation.decoder import Generation, caption_dropped, generate
from transfusion.generation.run import PoolCodec, Run, load_image, load_run, make_grid, save_png
from transfusion.generation.sampling import (
    DEFAULT_STEPS,
    SamplingConfig,
    make_scheduler,
    row_generators,
    sample_token,
)

__all__ = [
    "DEFAULT_STEPS",
    "DecodeContext",
    "Generation",
    "PoolCodec",
    "Run",
    "SamplingConfig",
    "add_generate_subparser",
    "caption",
    "caption_dropped",
    "generate",
    "generate_main",
    "is_discrete",
    "load_image",
    "load_run",
    "make_grid",
    "make_scheduler",
    "row_generators",
    "sample_token",
    "save_png",
    "text_to_image",
]
