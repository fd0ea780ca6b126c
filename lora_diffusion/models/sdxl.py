"""SDXL, offline: the built-in tiny SDXL, SDXL diffusers folders, single files in the original (SGM) layout, and
drawing images with diffusers' StableDiffusionXLPipeline.

    models = load_models("builtin:tiny-xl")                    # models.py dispatches SDXL here
    models.text_encoder, models.text_encoder_2                 # CLIP ViT-L, OpenCLIP ViT-bigG (with projection)
    models.tokenizer, models.tokenizer_2                       # the CLIP tokenizer, padding with <|endoftext|> / "!"
    pipe = sdxl_pipeline(models)                               # a StableDiffusionXLPipeline of the same modules

A single SDXL file holds `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE),
`conditioner.embedders.0.transformer.*` (CLIP ViT-L in transformers' layout) and `conditioner.embedders.1.model.*`
(OpenCLIP bigG: fused in_proj q/k/v, `text_projection` [width, proj] used as x @ P). Configs ship in assets/sdxl.
"""

import json
import warnings
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
from .tokenizer import load_clip_tokenizer, save_tokenizer

ASSETS = Path(__file__).parents[1] / "assets"
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
    from .sd import read_config

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
    from .sd import assemble, finish

    models = assemble(tokenizer, text_encoder, vae, unet, dtype=dtype, device=device, v2=False,
                      v_parameterization=v_parameterization, name=name)
    models.text_encoder_2 = finish(text_encoder_2, dtype, device)
    models.tokenizer_2 = tokenizer_2
    models.sdxl = True
    return models


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
    from .sd import deterministic_state_dict

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
    from .sd import DTYPE_KWARG, load_part_lean, read_config, weights_variant

    folder = Path(folder)
    for part in PARTS:
        if not (folder / part).is_dir():
            raise ModelLoadError(f"SDXL diffusers folder {folder} has no {part}/ subfolder")
    try:
        unet = load_part_lean(folder / "unet", dtype) or UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=dtype, variant=weights_variant(folder / "unet"),
            local_files_only=True)
        vae = load_part_lean(folder / "vae", dtype) or AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=dtype, variant=weights_variant(folder / "vae"), local_files_only=True)
        text_encoder = load_part_lean(folder / "text_encoder", dtype) or CLIPTextModel.from_pretrained(
            str(folder / "text_encoder"), variant=weights_variant(folder / "text_encoder"), local_files_only=True,
            **{DTYPE_KWARG: dtype})
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            str(folder / "text_encoder_2"), variant=weights_variant(folder / "text_encoder_2"), local_files_only=True,
            **{DTYPE_KWARG: dtype})
        tokenizers = folder_tokenizers(folder)
        if v_parameterization is None:
            config = folder / "scheduler" / "scheduler_config.json"
            v_parameterization = config.is_file() and \
                read_config(folder / "scheduler", "scheduler_config.json").get("prediction_type") == "v_prediction"
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
    from .sd import convert_into, read_config

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
    """SDXL's generate_samples (training/sampling.py): one PNG per prompt dict, with the same file names, PNG text
    and seeds; the prompts go through diffusers' SDXL encoding (both encoders' penultimate layers, the pooled
    projection of the second, the original size / crop / target size as time ids; a multi-vector token written
    out by diffusers' maybe_convert_prompt from the tokenizers' added tokens). Leaves the modules' modes and
    devices and the RNG as it found them."""
    from lora_diffusion.training.sampling import (
        _save_png,
        draw,
        make_sample_scheduler,
        prompt_seed,
        sample_filename,
        sampling_session,
    )

    if clip_skip not in (None, 1, 2):  # kohya: SDXL always reads the penultimate layer; --clip_skip does not apply
        warnings.warn(f"clip_skip={clip_skip} is ignored for SDXL, which always uses the penultimate layer")
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with sampling_session([models.text_encoder, models.text_encoder_2, models.vae, models.unet], device):
        pipeline = sdxl_pipeline(models)
        pipeline.set_progress_bar_config(disable=True)
        for index, prompt in enumerate(prompts):
            pipeline.scheduler = make_sample_scheduler(prompt.get("sampler") or sampler, models.noise_scheduler,
                                                       v_parameterization=models.v_parameterization)
            prompt = dict(prompt, seed=prompt_seed(prompt, index, seed))
            generator = torch.Generator(device="cpu" if device.type == "mps" else device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
                image = draw(pipeline, prompt=prompt["prompt"], negative_prompt=prompt["negative_prompt"] or None,
                             width=prompt["width"], height=prompt["height"], num_inference_steps=prompt["steps"],
                             guidance_scale=prompt["scale"], generator=generator.manual_seed(prompt["seed"]))[0]
            path = out_dir / sample_filename(output_name, step=step, epoch=epoch, index=index, seed=prompt["seed"])
            _save_png(image, path, prompt)
            paths.append(path)
        del pipeline
    return paths
