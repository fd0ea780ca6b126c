"""cloneofsimo/lora's module path: research code doing `from lora_diffusion.lora import ...` gets this package's
implementation of its API (see cloneofsimo.py)."""

from .cloneofsimo import *  # noqa: F401,F403
from .cloneofsimo import __all__, _text_lora_path, _ti_lora_path  # noqa: F401
