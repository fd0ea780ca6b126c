"""The SD1.x/2.x family, offline: the built-in tiny and mini models, a diffusers folder, or one checkpoint file; its
text conditioning (one CLIP text encoder, --clip_skip) and StableDiffusionPipeline for sampling.

    models = load_models("builtin:mini")                        # pretrained mini SD1.x of the shapes world
    models = load_models("builtin:tiny")                        # tiny random SD1.x, same weights everywhere
    models = load_models("path/to/diffusers_folder")            # has model_index.json
    models = load_models("v1-5-pruned-emaonly.safetensors")     # original CompVis/Stability key layout
    models = load_models("v2-1_768-ema-pruned.ckpt", v_parameterization=True, dtype=torch.float16)

Single files are converted with the configs shipped in assets/ (v1, v2, v2-v) and the shipped CLIP tokenizer,
so nothing ever touches the network. Loading is lean on memory: modules are built on the meta device and each
tensor is read, cast to `dtype` and renamed one at a time, then assigned; no full fp32 copy is ever held when
`dtype` is half. Reading a file lives in checkpoint.py, renaming its keys to diffusers' names in convert.py, what
the families share in loading.py. It is the fallback family: what no other family recognises is loaded as SD.
"""

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lora_diffusion.formats.io import build_folder_atomically

from .checkpoint import ModelLoadError
from .convert import check_is_sd_checkpoint, clip_names, detect_v2, unet_names, vae_names
from .family import ModelFamily, SDModels, assemble_models, family_named, register
from .loading import (
    ASSETS,
    convert_into,
    declare_fp32_load,
    deterministic_state_dict,
    folder_predicts_v,
    load_part,
    make_noise_scheduler,
    read_config,
)
from .text import encode_prompts
from .tokenizer import load_clip_tokenizer, save_tokenizer

BUILTIN_TINY = "builtin:tiny"
BUILTIN_MINI = "builtin:mini"
MINI_FOLDER = ASSETS / "mini"  # written by `lora-diffusion pretrain-mini`


@register
class StableDiffusion(ModelFamily):
    """SD1.x and SD2.x: one CLIP text encoder (OpenAI ViT-L or OpenCLIP ViT-H), a U-Net without added conditioning."""

    name = "sd"
    title = "SD1.x/2.x"
    builtin_names = (BUILTIN_MINI, BUILTIN_TINY)
    fallback = True
    text_cache_tag = {"sdxl": False}

    def recognises_folder(self, folder):
        return (Path(folder) / "unet").is_dir()

    def recognises_checkpoint(self, names):
        return True  # check_is_sd_checkpoint names what is missing

    def load_builtin(self, name, *, v2, v_parameterization, dtype, device):
        if v2:
            raise ModelLoadError(f"{name} is an SD1.x-style model; --v2 does not apply to it")
        if name == BUILTIN_TINY:  # built from configs with seeded random weights
            models = build_tiny_models(seed=0, dtype=dtype, device=device)
            models.v_parameterization = bool(v_parameterization)
            models.noise_scheduler = make_noise_scheduler(models.v_parameterization)
            return models
        if not (MINI_FOLDER / "model_index.json").is_file():
            raise ModelLoadError(f"{BUILTIN_MINI} is not in this install ({MINI_FOLDER} is missing); "
                                 "build it with `lora-diffusion pretrain-mini`")
        models = self.load_folder(MINI_FOLDER, v2=None, v_parameterization=v_parameterization, dtype=dtype,
                                  device=device)
        models.name = BUILTIN_MINI
        return models

    def load_folder(self, folder, *, v2, v_parameterization, dtype, device):
        return load_sd_folder(folder, v2=v2, v_parameterization=v_parameterization, dtype=dtype, device=device)

    def load_single_file(self, path, reader, *, v2, v_parameterization, dtype, device, config_dir=None):
        return load_sd_single_file(path, reader, v2=v2, v_parameterization=v_parameterization, dtype=dtype,
                                   device=device, config_dir=config_dir)

    def encode_prompts(self, models, captions, *, clip_skip=None, max_token_length=None):
        return encode_prompts(models.tokenizer, models.text_encoder, captions, clip_skip=clip_skip,
                              max_token_length=max_token_length)

    def pipeline(self, models, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                       unet=models.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def prompt_inputs(self, models, prompt, negative_prompt, *, expand, clip_skip=None, max_token_length=None,
                      device="cpu"):
        """The prompt through the training text path (clip_skip, max_token_length, new tokens written out)."""
        embeds = self.encode_prompts(models, [expand(prompt), expand(negative_prompt)], clip_skip=clip_skip,
                                     max_token_length=max_token_length).to(device=device, dtype=models.unet.dtype)
        return dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:])


def assemble(tokenizer, text_encoder, vae, unet, *, dtype, device, v2, v_parameterization, name) -> SDModels:
    """The loaded SD1.x/2.x parts, cast and moved, in eval mode, with SD's training noise schedule."""
    return assemble_models(family_named("sd"), tokenizer, text_encoder, vae, unet, dtype=dtype, device=device, v2=v2,
                           v_parameterization=v_parameterization, name=name)


# ---------------------------------------------------------------------------------------------------------------
# The built-in tiny model: SD1.x topology, narrow channels, deterministic random weights.


def empty_modules(config_dir):
    """Text encoder, VAE and U-Net from `config_dir`'s configs, parameters on the meta device (no memory)."""
    config_dir = Path(config_dir)
    with init_empty_weights():
        te_config = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"), local_files_only=True)
        text_encoder = CLIPTextModel(te_config)
        vae = AutoencoderKL.from_config(read_config(config_dir / "vae"))
        unet = UNet2DConditionModel.from_config(read_config(config_dir / "unet"))
    return text_encoder, vae, unet


def build_tiny_models(seed=0, dtype=torch.float32, device="cpu"):
    """The `builtin:tiny` pipeline from assets/tiny-sd: real CLIP tokenizer, random but reproducible weights."""
    text_encoder, vae, unet = empty_modules(ASSETS / "tiny-sd")
    for offset, module in enumerate((text_encoder, vae, unet)):
        module.load_state_dict(deterministic_state_dict(module, seed * 1000 + offset), assign=True)
    return assemble(load_clip_tokenizer(v2=False), text_encoder, vae, unet, dtype=dtype, device=device, v2=False,
                    v_parameterization=False, name=BUILTIN_TINY)


def save_tiny_diffusers_folder(path, seed=0):
    """Write the tiny model as a diffusers folder (save_pretrained + model_index.json), atomically."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new folder for the tiny diffusers model")
    models = build_tiny_models(seed=seed)

    def fill(staging):
        models.unet.save_pretrained(staging / "unet")
        models.vae.save_pretrained(staging / "vae")
        models.text_encoder.save_pretrained(staging / "text_encoder")
        declare_fp32_load(staging / "text_encoder" / "config.json")
        save_tokenizer(models.tokenizer, staging / "tokenizer")
        models.noise_scheduler.save_pretrained(staging / "scheduler")
        write_model_index(staging, "DDPMScheduler")

    build_folder_atomically(path, fill)
    return path


def write_model_index(folder, scheduler_class):
    """The model_index.json of an SD1.x StableDiffusionPipeline folder without safety checker."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# A diffusers folder.


def load_sd_folder(folder, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu"):
    """An SD1.x/2.x diffusers folder: unet/, vae/, text_encoder/ (tokenizer/, scheduler/ optional)."""
    folder = Path(folder)
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise ModelLoadError(f"diffusers folder {folder} has no {part}/ subfolder")
    try:
        unet = load_part(folder, "unet", UNet2DConditionModel, dtype)
        vae = load_part(folder, "vae", AutoencoderKL, dtype)
        text_encoder = load_part(folder, "text_encoder", CLIPTextModel, dtype)
        if v2 is None:
            v2 = unet.config.cross_attention_dim == 1024
        if (folder / "tokenizer").is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        else:
            tokenizer = load_clip_tokenizer(v2=v2)
        if v_parameterization is None:
            v_parameterization = folder_predicts_v(folder)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {error}") from error
    return assemble(tokenizer, text_encoder, vae, unet, dtype=dtype, device=device, v2=bool(v2),
                    v_parameterization=bool(v_parameterization), name=str(folder))


# ---------------------------------------------------------------------------------------------------------------
# A single checkpoint file in the original (CompVis / Stability) layout.


def load_sd_single_file(path, reader, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu",
                        config_dir=None):
    check_is_sd_checkpoint(path, reader.names)
    detected_v2 = detect_v2(reader)
    if v2 is not None and bool(v2) != detected_v2:
        found = ("SD2.x (OpenCLIP text encoder, 1024-wide cross-attention)" if detected_v2
                 else "SD1.x (CLIP text encoder)")
        flag = "given" if v2 else "set to false"
        raise ModelLoadError(f"{path} holds {found} weights but --v2 was {flag}; drop the flag to let it be detected")
    v2 = detected_v2
    v_parameterization = bool(v_parameterization)
    if config_dir is None:
        config_dir = ASSETS / ("v1" if not v2 else "v2-v" if v_parameterization else "v2")
    config_dir = Path(config_dir)

    text_encoder, vae, unet = empty_modules(config_dir)
    unet_config = read_config(config_dir / "unet")
    convert_into(unet, reader, unet_names(reader.names, unet_config["layers_per_block"]), path, "U-Net")
    vae_levels = len(read_config(config_dir / "vae")["up_block_types"])
    convert_into(vae, reader, vae_names(reader.names, vae_levels), path, "VAE")
    text_names = clip_names(reader.names, hasattr(text_encoder, "text_model"), text_encoder.config.num_hidden_layers)
    convert_into(text_encoder, reader, text_names, path, "text encoder")

    tokenizer_dir = config_dir / "tokenizer"
    if tokenizer_dir.is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    else:
        tokenizer = load_clip_tokenizer(v2=v2)
    return assemble(tokenizer, text_encoder, vae, unet, dtype=dtype, device=device, v2=v2,
                    v_parameterization=v_parameterization, name=str(path))
