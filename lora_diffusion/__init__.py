"""lora_diffusion: LoRA for Stable Diffusion, kohya-compatible files, a hackable library and a lean trainer."""

import logging

# diffusers imports bitsandbytes when it is installed, and on CPUs bitsandbytes warns at import about a 4-bit kernel
# package that nothing here uses; keep that line out of every command's output (real errors still show).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers 5 warns, when diffusers' pipelines import CLIP's image processor, that torchvision is missing and it
# falls back to PIL: we never use an image processor, so the line is not the user's to act on.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

from . import cloneofsimo
from .cloneofsimo import *  # noqa: F401,F403  cloneofsimo/lora's API under its names (lora_network, ...)
from .kohya import LoRAFileError, read_lora_file
from .layer import LoRALayer
from .network import (
    LoRANetwork,
    TokenEmbeddings,
    create_network,
    dim_from_weights,
    load_network,
    merge_base_weights,
)

__version__ = "0.1.0"

__all__ = [
    "LoRALayer", "LoRANetwork", "TokenEmbeddings", "create_network", "load_network", "dim_from_weights",
    "merge_base_weights", "read_lora_file", "LoRAFileError",
    *cloneofsimo.__all__,
]
