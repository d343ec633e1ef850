"""Generation entry points (``DESIGN.md``'s ``generate.py``); the code is in ``transfusion.generation``.

Usage: ``from transfusion.generate import generate, text_to_image, caption, load_run, generate_main``.
"""

from transfusion.generation import *  # noqa: F403  (this module is an alias of the package)
from transfusion.generation import __all__  # noqa: F401
