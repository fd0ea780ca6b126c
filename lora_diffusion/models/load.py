"""load_models: a name, a folder or a file -> the SDModels of the family that recognises it (family.py's registry;
each family's module says how it loads). Above the families: it names none of them."""

import re
from pathlib import Path

import torch

from .checkpoint import CheckpointReader, ModelLoadError
from .family import builtin_family, builtin_names, checkpoint_family, family_titles, folder_family


def load_models(name_or_path, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu", config_dir=None):
    """Load tokenizer(s), text encoder(s), VAE, U-Net and the training noise scheduler; `models.family` says what
    they are and how they are used.

    v2: None detects SD2.x (from the weights or the folder's configs); True/False forces it.
    v_parameterization: None means False for single files (it cannot be read from the weights: pass True for
        SD2.x 768-v models) and the folder's scheduler prediction_type for diffusers folders.
    config_dir: for single files only, a folder with unet/, vae/, text_encoder/ configs (and optionally
        tokenizer/) to convert with instead of the shipped ones.
    """
    name = str(name_or_path)
    family = builtin_family(name)
    if family is not None:
        return family.load_builtin(name, v2=v2, v_parameterization=v_parameterization, dtype=dtype, device=device)
    path = Path(name).expanduser()
    if not path.exists():
        looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name)
        hint = " (nothing is downloaded: fetch the model first and pass its local path)" if looks_like_hub_id else ""
        builtins = builtin_names()
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {name} not found; expected a diffusers folder with model_index.json, "
            f"a .safetensors/.ckpt {family_titles()} checkpoint, {', '.join(builtins[:-1])} or {builtins[-1]}{hint}"
        )
    if path.is_dir():
        return load_diffusers_folder(path, v2=v2, v_parameterization=v_parameterization, dtype=dtype, device=device)
    return load_single_file(
        path, v2=v2, v_parameterization=v_parameterization, dtype=dtype, device=device, config_dir=config_dir
    )


def load_diffusers_folder(folder, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu"):
    """A diffusers folder (model_index.json and a subfolder per part), by the family its layout shows."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {folder} is a folder but not a diffusers model folder: model_index.json "
            "is missing (expected model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/ subfolders)"
        )
    return folder_family(folder).load_folder(folder, v2=v2, v_parameterization=v_parameterization, dtype=dtype,
                                             device=device)


def load_single_file(path, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu", config_dir=None):
    """One checkpoint file in its original layout, by the family its tensor names show."""
    reader = CheckpointReader(path, dtype)
    return checkpoint_family(reader.names).load_single_file(path, reader, v2=v2, v_parameterization=v_parameterization,
                                                            dtype=dtype, device=device, config_dir=config_dir)
