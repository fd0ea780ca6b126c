"""Loading Stable Diffusion, offline, by family: SD1.x/2.x (sd.py) and SDXL (sdxl.py); a checkpoint file a tensor
at a time (checkpoint.py), the original single-file key names (convert.py), CLIP's tokenizer from the shipped BPE
file (tokenizer.py).

    models = load_models("builtin:mini")      # or a diffusers folder, or one .safetensors / .ckpt file
"""

from .checkpoint import CheckpointReader, ModelLoadError, SafetensorsFile  # noqa: F401
from .sd import (  # noqa: F401  the names of lora_diffusion.models before it was a package
    ASSETS,
    BUILTIN_MINI,
    BUILTIN_TINY,
    BUILTIN_TINY_XL,
    DIFFUSERS_DTYPE_KWARG,
    DTYPE_KWARG,
    MINI_FOLDER,
    SDModels,
    assemble,
    build_tiny_models,
    convert_into,
    declare_fp32_load,
    deterministic_state_dict,
    empty_modules,
    finish,
    fit_shape,
    load_diffusers_folder,
    load_models,
    load_part_lean,
    load_single_file,
    make_noise_scheduler,
    read_config,
    save_tiny_diffusers_folder,
    weights_variant,
    write_model_index,
)
from .tokenizer import load_clip_tokenizer, save_tokenizer  # noqa: F401
