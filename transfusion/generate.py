"""Generation entry points (``DESIGN.md``'s ``generate.py``); the code is in ``transfusion.generation``.

Usage: ``from transfusion.generate import generate, text_to_image, caption, load_run, generate_main``.
"""

from transfusion.generation import (
    DEFAULT_STEPS,
    DecodeContext,
    Generation,
    PoolCodec,
    Run,
    SamplingConfig,
    add_generate_subparser,
    caption,
    caption_dropped,
    generate,
    generate_main,
    load_image,
    load_run,
    make_grid,
    make_scheduler,
    row_generators,
    sample_token,
    save_png,
    text_to_image,
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
    "load_image",
    "load_run",
    "make_grid",
    "make_scheduler",
    "row_generators",
    "sample_token",
    "save_png",
    "text_to_image",
]
