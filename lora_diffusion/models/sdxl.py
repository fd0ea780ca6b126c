"""The SDXL family, offline: the built-in tiny SDXL, SDXL diffusers folders, single files in the original (SGM)
layout; its conditioning (both text encoders' penultimate states, the pooled projection, the size / crop time ids)
and StableDiffusionXLPipeline for sampling.

    models = load_models("builtin:tiny-xl")                    # models.family is this module's SDXL
    models.text_encoder, models.text_encoder_2                 # CLIP ViT-L, OpenCLIP ViT-bigG (with projection)
    models.tokenizer, models.tokenizer_2                       # the CLIP tokenizer, padding with <|endoftext|> / "!"
    pipe = sdxl_pipeline(models)                               # a StableDiffusionXLPipeline of the same modules

A single SDXL file holds `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE),
`conditioner.embedders.0.transformer.*` (CLIP ViT-L in transformers' layout) and `conditioner.embedders.1.model.*`
(OpenCLIP bigG: fused in_proj q/k/v, `text_projection` [width, proj] used as x @ P). Configs ship in assets/sdxl.

In training (kohya's sdxl_train_network semantics, diffusers' StableDiffusionXLPipeline's numbers):

- the context is the penultimate layer of both text encoders, joined along the width (768 + 1280 = 2048 on SDXL),
  without the final layer norm; --clip_skip does not apply;
- the pooled text embedding is the second encoder's projected `text_embeds` (of the first 75-token window when
  --max_token_length makes several);
- the time ids, per sample: [original height, original width, crop top, crop left, target height, target width],
  with the image's size as displayed, the bucket window's offset in the resized (and flipped) image, the bucket.
"""

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from lora_diffusion.formats.io import build_folder_atomically

from . import convert
from .checkpoint import ModelLoadError
from .family import ModelFamily, assemble_models, family_named, register
from .loading import (
    ASSETS,
    convert_into,
    deterministic_state_dict,
    folder_predicts_v,
    load_part,
    make_noise_scheduler,
    read_config,
)
from .sampling import sample_images
from .text import tokenize_captions
from .tokenizer import load_clip_tokenizer, save_tokenizer

BUILTIN_TINY_XL = "builtin:tiny-xl"
TINY_XL = ASSETS / "tiny-xl"
SDXL_CONFIGS = ASSETS / "sdxl"
CONDITIONER = "conditioner.embedders."
CLIP_L_PREFIX = convert.SDXL_CLIP_L_PREFIX
OPEN_CLIP_G_PREFIX = convert.SDXL_OPEN_CLIP_G_PREFIX
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def is_sdxl_checkpoint(names) -> bool:
    return any(n.startswith(CONDITIONER) for n in names)


def is_sdxl_folder(folder) -> bool:
    return (Path(folder) / "text_encoder_2").is_dir()


def empty_sdxl_modules(config_dir):
    """Text encoders, VAE and U-Net from `config_dir`'s configs, on the meta device (no memory)."""
    config_dir = Path(config_dir)
    for part in PARTS:
        if not (config_dir / part / "config.json").is_file():
            raise ModelLoadError(f"SDXL configs in {config_dir}: {part}/config.json is missing (expected unet/, vae/, "
                                 f"text_encoder/ and text_encoder_2/ configs)")
    with init_empty_weights():
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"),
                                                                    local_files_only=True))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
            str(config_dir / "text_encoder_2"), local_files_only=True))
        vae = AutoencoderKL.from_config(read_config(config_dir / "vae"))
        unet = UNet2DConditionModel.from_config(read_config(config_dir / "unet"))
    return text_encoder, text_encoder_2, vae, unet


def assemble_sdxl(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, *, dtype, device,
                  v_parameterization, name):
    """The loaded SDXL parts, cast and moved, in eval mode, with SD's training noise schedule."""
    return assemble_models(family_named("sdxl"), tokenizer, text_encoder, vae, unet, dtype=dtype, device=device,
                           v2=False, v_parameterization=v_parameterization, name=name, tokenizer_2=tokenizer_2,
                           text_encoder_2=text_encoder_2)


def shipped_tokenizers():
    """SDXL's two tokenizers: CLIP's BPE both times; the second (OpenCLIP bigG's) pads with "!" (id 0)."""
    return load_clip_tokenizer(v2=False), load_clip_tokenizer(v2=True)


def folder_tokenizers(folder):
    """The two tokenizers of `folder` (a diffusers folder or a config folder): its tokenizer/ and tokenizer_2/
    where it has them, else the shipped ones."""
    folder = Path(folder)
    return [CLIPTokenizer.from_pretrained(str(folder / name), local_files_only=True)
            if (folder / name).is_dir() else default
            for name, default in zip(("tokenizer", "tokenizer_2"), shipped_tokenizers())]


def write_sdxl_model_index(folder):
    """The model_index.json of a StableDiffusionXLPipeline folder."""
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# -- builtin:tiny-xl ----------------------------------------------------------------------------------------------


def build_tiny_xl_models(seed=0, dtype=torch.float32, device="cpu"):
    """The `builtin:tiny-xl` pipeline from assets/tiny-xl: SDXL's topology (two text encoders, text_time added
    embeddings, 3 levels, linear projections), narrow channels, random but reproducible weights."""
    modules = empty_sdxl_modules(TINY_XL)
    for offset, module in enumerate(modules):
        module.load_state_dict(deterministic_state_dict(module, seed * 1000 + 100 + offset), assign=True)
    text_encoder, text_encoder_2, vae, unet = modules
    return assemble_sdxl(*shipped_tokenizers(), text_encoder, text_encoder_2, vae, unet, dtype=dtype, device=device,
                         v_parameterization=False, name=BUILTIN_TINY_XL)


def save_tiny_xl_diffusers_folder(path, seed=0):
    """Write the tiny SDXL as a diffusers folder (StableDiffusionXLPipeline.from_pretrained reads it), atomically."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new folder for the tiny SDXL diffusers model")
    models = build_tiny_xl_models(seed=seed)

    def fill(staging):
        for part in PARTS:
            getattr(models, part).save_pretrained(staging / part)
        for part in ("tokenizer", "tokenizer_2"):
            save_tokenizer(getattr(models, part), staging / part)
        models.noise_scheduler.save_pretrained(staging / "scheduler")
        write_sdxl_model_index(staging)

    build_folder_atomically(path, fill)  # readable by others, like any folder a user saves
    return path


# -- a diffusers folder -------------------------------------------------------------------------------------------


def load_sdxl_folder(folder, *, v_parameterization=None, dtype=torch.float32, device="cpu"):
    """An SDXL diffusers folder: unet/, vae/, text_encoder/, text_encoder_2/ (tokenizer/, tokenizer_2/ optional)."""
    folder = Path(folder)
    for part in PARTS:
        if not (folder / part).is_dir():
            raise ModelLoadError(f"SDXL diffusers folder {folder} has no {part}/ subfolder")
    try:
        unet = load_part(folder, "unet", UNet2DConditionModel, dtype)
        vae = load_part(folder, "vae", AutoencoderKL, dtype)
        text_encoder = load_part(folder, "text_encoder", CLIPTextModel, dtype)
        text_encoder_2 = load_part(folder, "text_encoder_2", CLIPTextModelWithProjection, dtype, lean=False)
        tokenizers = folder_tokenizers(folder)
        if v_parameterization is None:
            v_parameterization = folder_predicts_v(folder)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the SDXL diffusers folder {folder}: {error}") from error
    return assemble_sdxl(*tokenizers, text_encoder, text_encoder_2, vae, unet, dtype=dtype, device=device,
                         v_parameterization=bool(v_parameterization), name=str(folder))


# -- a single file in the original (SGM) layout --------------------------------------------------------------------


class TransposingReader:
    """A CheckpointReader whose listed keys come out transposed: OpenCLIP's text_projection is used as x @ P, a
    Linear's weight as x @ W.T."""

    def __init__(self, reader, keys):
        self.reader, self.keys = reader, set(keys)

    def get(self, name):
        tensor = self.reader.get(name)
        return tensor.T.contiguous() if name in self.keys else tensor


def check_sdxl_parts(path, names):
    def has(prefix):
        return any(n.startswith(prefix) for n in names)

    parts = {"U-Net (model.diffusion_model.)": has(convert.UNET_PREFIX), "VAE (first_stage_model.)":
             has(convert.VAE_PREFIX), f"CLIP ViT-L ({CLIP_L_PREFIX})": has(CLIP_L_PREFIX),
             f"OpenCLIP bigG ({OPEN_CLIP_G_PREFIX})": has(OPEN_CLIP_G_PREFIX)}
    missing = [part for part, ok in parts.items() if not ok]
    if missing:
        raise ModelLoadError(f"{path} looks like an SDXL checkpoint (it has {CONDITIONER}* keys) but is incomplete: "
                             f"missing {', '.join(missing)}; expected the four parts of an SDXL base model")


def text_encoder_names(names, text_encoder, text_encoder_2):
    """{original key: [(diffusers key, chunk)]} of both text encoders."""
    first = convert.clip_names(names, hasattr(text_encoder, "text_model"), text_encoder.config.num_hidden_layers,
                               clip_prefix=CLIP_L_PREFIX, open_clip_prefix=None)
    second = convert.clip_names(names, hasattr(text_encoder_2, "text_model"), text_encoder_2.config.num_hidden_layers,
                                clip_prefix=None, open_clip_prefix=OPEN_CLIP_G_PREFIX, projection=True)
    return first, second


def load_sdxl_single_file(path, reader, *, v_parameterization=None, dtype=torch.float32, device="cpu",
                          config_dir=None):
    check_sdxl_parts(path, reader.names)
    config_dir = Path(config_dir) if config_dir else SDXL_CONFIGS
    text_encoder, text_encoder_2, vae, unet = empty_sdxl_modules(config_dir)
    convert_into(unet, reader, convert.unet_names(reader.names, unet.config.layers_per_block), path, "U-Net")
    vae_levels = len(read_config(config_dir / "vae")["up_block_types"])
    convert_into(vae, reader, convert.vae_names(reader.names, vae_levels), path, "VAE")
    first, second = text_encoder_names(reader.names, text_encoder, text_encoder_2)
    convert_into(text_encoder, reader, first, path, "text encoder (CLIP ViT-L)")
    convert_into(text_encoder_2, TransposingReader(reader, convert.TRANSPOSED_KEYS), second, path,
                 "text encoder 2 (OpenCLIP bigG)")
    return assemble_sdxl(*folder_tokenizers(config_dir), text_encoder, text_encoder_2, vae, unet, dtype=dtype,
                         device=device, v_parameterization=bool(v_parameterization), name=str(path))


# -- drawing ------------------------------------------------------------------------------------------------------


def sdxl_pipeline(models, scheduler=None):
    """A diffusers StableDiffusionXLPipeline around the loaded modules (shared, not copied)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=models.text_encoder, text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer, tokenizer_2=models.tokenizer_2, unet=models.unet,
        scheduler=scheduler or models.noise_scheduler, add_watermarker=False)


def generate_sdxl_samples(models, *, prompts, out_dir, step=0, epoch=None, output_name="", device="cpu",
                          dtype=torch.float32, sampler="ddim", clip_skip=None, seed=None):
    """sample_images (sampling.py) of an SDXL model: one PNG per prompt dict, kohya's file names, PNG text and seeds;
    the prompts go through diffusers' SDXL encoding (a multi-vector token written out by diffusers'
    maybe_convert_prompt from the tokenizers' added tokens)."""
    return sample_images(models, prompts=prompts, out_dir=out_dir, step=step, epoch=epoch, output_name=output_name,
                         device=device, dtype=dtype, sampler=sampler, clip_skip=clip_skip, seed=seed)


# -- the family ---------------------------------------------------------------------------------------------------


def encode_prompts_sdxl(tokenizers, text_encoders, captions, *, max_token_length=None):
    """Captions -> (context (B, 77 | 152 | 227, D1 + D2), pooled (B, P)). Gradients flow when an encoder trains;
    call it under torch.no_grad() otherwise."""
    states, pooled = [], None
    for index, (tokenizer, encoder) in enumerate(zip(tokenizers, text_encoders)):
        ids = tokenize_captions(tokenizer, captions, max_token_length=max_token_length)
        b, n_windows, window = ids.shape
        flat = ids.reshape(b * n_windows, window).to(next(encoder.parameters()).device)
        out = encoder(flat, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states[-2]
        hidden = hidden.reshape(b, n_windows, window, hidden.shape[-1])
        if n_windows == 1:
            states.append(hidden[:, 0])
        else:  # the first window's BOS, the 75 inner states of every window, the last window's EOS (as SD1.x)
            inner = hidden[:, :, 1:-1].reshape(b, n_windows * (window - 2), hidden.shape[-1])
            states.append(torch.cat([hidden[:, 0, :1], inner, hidden[:, -1, -1:]], dim=1))
        if index == 1:
            pooled = out.text_embeds.reshape(b, n_windows, -1)[:, 0]
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(batch, *, device=None, dtype=torch.float32):
    """The U-Net's `time_ids` (B, 6) of a collated batch: per sample [orig_h, orig_w, crop_top, crop_left,
    target_h, target_w] from its "original_sizes" (w, h), "crops" (left, top) and "buckets" (w, h)."""
    rows = [[oh, ow, top, left, th, tw] for (ow, oh), (left, top), (tw, th)
            in zip(batch["original_sizes"], batch["crops"], batch["buckets"])]
    return torch.tensor(rows, dtype=dtype, device=device)


@register
class StableDiffusionXL(ModelFamily):
    """SDXL base: two text encoders (CLIP ViT-L, OpenCLIP bigG with projection), a U-Net with text_time added
    embeddings (the pooled text embedding and six size / crop ids per sample)."""

    name = "sdxl"
    title = "SDXL"
    builtin_names = (BUILTIN_TINY_XL,)
    text_encoder_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    default_resolution = 1024  # kohya's SDXL recommendation
    bucket_range = (512, 2048)
    v2_applies = False
    clip_skip_note = "which always uses the penultimate layer of both text encoders"
    text_cache_tag = {"sdxl": True}

    def recognises_folder(self, folder):
        return is_sdxl_folder(folder)

    def recognises_checkpoint(self, names):
        return is_sdxl_checkpoint(names)

    def load_builtin(self, name, *, v2, v_parameterization, dtype, device):
        if v2:
            raise ModelLoadError(f"{name} is an SDXL model; --v2 does not apply to it")
        models = build_tiny_xl_models(seed=0, dtype=dtype, device=device)
        models.v_parameterization = bool(v_parameterization)
        models.noise_scheduler = make_noise_scheduler(models.v_parameterization)
        return models

    def load_folder(self, folder, *, v2, v_parameterization, dtype, device):
        if v2:
            raise ModelLoadError(f"{folder} is an SDXL model (it has text_encoder_2/); --v2 does not apply to it")
        return load_sdxl_folder(folder, v_parameterization=v_parameterization, dtype=dtype, device=device)

    def load_single_file(self, path, reader, *, v2, v_parameterization, dtype, device, config_dir=None):
        if v2:
            raise ModelLoadError(f"{path} holds SDXL weights (conditioner.embedders.* keys) but --v2 was given; "
                                 "drop the flag")
        return load_sdxl_single_file(path, reader, v_parameterization=v_parameterization, dtype=dtype,
                                     device=device, config_dir=config_dir)

    def encode_prompts(self, models, captions, *, clip_skip=None, max_token_length=None):
        """(context, pooled); --clip_skip does not apply."""
        return encode_prompts_sdxl(models.tokenizers, models.text_encoder_list, captions,
                                   max_token_length=max_token_length)

    def time_ids(self, batch, *, device=None, dtype=torch.float32):
        return sdxl_time_ids(batch, device=device, dtype=dtype)

    def unet_conditioning(self, encoded, time_ids, *, device, dtype):
        context, pooled = encoded
        return context.to(device), {"added_cond_kwargs": {"text_embeds": pooled.to(device, dtype),
                                                          "time_ids": time_ids}}

    def pipeline(self, models, scheduler):
        return sdxl_pipeline(models, scheduler)

    def prompt_inputs(self, models, prompt, negative_prompt, *, expand, clip_skip=None, max_token_length=None,
                      device="cpu"):
        """The prompts as text: the pipeline encodes them (and writes out a multi-vector token itself)."""
        return dict(prompt=prompt, negative_prompt=negative_prompt or None)
