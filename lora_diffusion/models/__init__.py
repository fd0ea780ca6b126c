"""Loading Stable Diffusion, offline, by family: each family one module with a ModelFamily (family.py) that says how
it is recognised, loaded, conditioned and sampled: SD1.x/2.x (sd.py), SDXL (sdxl.py). Below them what they share:
loading.py (configs, lean part loading, single-file conversion), text.py (CLIP prompt encoding), sampling.py (the
one sampling loop), checkpoint.py (a checkpoint file a tensor at a time), convert.py (the original single-file key
names), tokenizer.py (CLIP's tokenizer from the shipped BPE file). Above them load.py: load_models.

    models = load_models("builtin:mini")      # or a diffusers folder, or one .safetensors / .ckpt file
    models.family                             # what the trainer, validation, sampling and generate ask
"""

from . import sd, sdxl  # noqa: F401  each registers its family (family.FAMILIES); SD1.x/2.x first
from .checkpoint import CheckpointReader, ModelLoadError, SafetensorsFile  # noqa: F401
from .family import FAMILIES, ModelFamily, SDModels, detect_family, family_named  # noqa: F401
from .load import load_diffusers_folder, load_models, load_single_file  # noqa: F401
from .loading import (  # noqa: F401
    ASSETS,
    DIFFUSERS_DTYPE_KWARG,
    DTYPE_KWARG,
    convert_into,
    declare_fp32_load,
    deterministic_state_dict,
    finish,
    fit_shape,
    load_part_lean,
    make_noise_scheduler,
    read_config,
    weights_variant,
)
from .sd import (  # noqa: F401  the names of lora_diffusion.models before it was a package
    BUILTIN_MINI,
    BUILTIN_TINY,
    MINI_FOLDER,
    assemble,
    build_tiny_models,
    empty_modules,
    save_tiny_diffusers_folder,
    write_model_index,
)
from .sdxl import BUILTIN_TINY_XL  # noqa: F401
from .tokenizer import load_clip_tokenizer, save_tokenizer  # noqa: F401
