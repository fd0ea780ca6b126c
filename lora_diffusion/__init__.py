"""lora_diffusion: LoRA for Stable Diffusion, kohya-compatible files, a hackable library and a lean trainer.

The package's folders:
    core/      the adapter layers (core/adapters/: one module per algorithm), LoRANetwork, target modules, injection
    formats/   files: kohya / LyCORIS .safetensors, cloneofsimo/lora's formats, atomic writes
    models/    loading Stable Diffusion by family (SD1.x/2.x, SDXL), checkpoints, the offline tokenizer
    data/      the training data: kohya's folder layout, captions, buckets, latent cache
    options/   the trainer's options as declarations; flag files (TOML, kohya_ss GUI JSON)
    training/  the trainer: its loop and the small pieces it calls
    tools/     the `lora-diffusion` subcommands (merge, resize, extract, generate, evaluate, ...)
    world/     the shapes world of builtin:mini, its judge and features
"""

import logging

# diffusers imports bitsandbytes when it is installed, and on CPUs bitsandbytes warns at import about a 4-bit kernel
# package that nothing here uses; keep that line out of every command's output (real errors still show).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers 5 warns, when diffusers' pipelines import CLIP's image processor, that torchvision is missing and it
# falls back to PIL: we never use an image processor, so the line is not the user's to act on.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

from lora_diffusion import _moved

_moved.install()

from lora_diffusion.core.adapters import LoRALayer
from lora_diffusion.core.inject import inject_trainable_lora
from lora_diffusion.core.kohya import LoRAFileError, read_lora_file
from lora_diffusion.core.network import (
    LoRANetwork,
    TokenEmbeddings,
    create_network,
    dim_from_weights,
    load_network,
    merge_base_weights,
)
from lora_diffusion.core.spec import NetworkSpec

__version__ = "0.1.0"

__all__ = [
    "LoRALayer", "LoRANetwork", "NetworkSpec", "TokenEmbeddings", "create_network", "load_network", "dim_from_weights",
    "merge_base_weights", "read_lora_file", "LoRAFileError", "inject_trainable_lora",
]


def __getattr__(name):
    """The modules that moved (`lora_diffusion.network`, ...) and cloneofsimo/lora's names (`from lora_diffusion
    import monkeypatch_lora`, ...) as before, from their homes, with a DeprecationWarning for one release."""
    import importlib
    import warnings

    if name.startswith("__") or name == "lora":
        raise AttributeError(f"module 'lora_diffusion' has no attribute {name!r}")
    if name in _moved.MOVED:  # lora_diffusion.network, ... as attributes, as before (with the import's warning)
        return importlib.import_module(f"lora_diffusion.{name}")
    lora = importlib.import_module("lora_diffusion.lora")
    if name in lora.__all__:
        warnings.warn(f"lora_diffusion.{name} is cloneofsimo/lora's API: import it from lora_diffusion.lora",
                      _moved.MovedModuleWarning, stacklevel=2)
        return getattr(lora, name)
    raise AttributeError(f"module 'lora_diffusion' has no attribute {name!r}")
