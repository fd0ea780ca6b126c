"""A model family as one object: what differs between SD1.x/2.x and SDXL (and a later family) is asked of it, never
tested for. The seams follow kohya's sdxl_train_network.py (a NetworkTrainer whose subclass changes a few methods):

- recognising: a `builtin:*` name, a diffusers folder, a single checkpoint's tensor names;
- loading: each of those into SDModels that carry their family (`models.family`);
- the run's defaults: --resolution and the bucket range; which flags apply (--v2, --clip_skip);
- text conditioning: captions -> what the U-Net takes (`encode_prompts`), cached per caption for frozen encoders;
- added conditioning: SDXL's pooled text embedding and size / crop time ids (`time_ids`, `unet_conditioning`);
- the U-Net call with that conditioning (`call_unet`);
- sampling: the diffusers pipeline over the loaded modules and its inputs for one prompt (`prompt_inputs`);
- the text encoders (`text_encoder_parts`, in LoRA prefix order): core/targets.py names their LoRA modules
  (`lora_te` for one encoder, `lora_te1` / `lora_te2` for two) and core/network.py picks the names from the
  encoders given; a family only says which modules they are.

A family registers itself with @register when its module is imported (models/__init__.py imports each). Adding one
(SD3.5, say) is one module with a ModelFamily subclass plus its configs under assets/. This module is below the
families and knows none of them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .checkpoint import SafetensorsFile
from .loading import finish, make_noise_scheduler


@dataclass
class SDModels:
    """The loaded parts of one model, and the family that knows how to use them (`models.family`)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    v2: bool
    v_parameterization: bool
    name: str
    text_encoder_2: CLIPTextModel | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection)
    tokenizer_2: CLIPTokenizer | None = None
    family: Any = None  # a ModelFamily; None: the fallback family (SD1.x/2.x)

    def __post_init__(self):
        if self.family is None:
            self.family = fallback_family()

    @property
    def sdxl(self) -> bool:
        """Kept for code that reads it; the package asks `family` instead."""
        return self.family.name == "sdxl"

    @property
    def text_encoder_list(self) -> list:
        """The family's text encoders, in LoRA prefix order."""
        return [getattr(self, part) for part in self.family.text_encoder_parts]

    @property
    def text_encoders(self):
        """What create_network/load_network take: the text encoder, or a tuple of several (SDXL's two)."""
        encoders = self.text_encoder_list
        return encoders[0] if len(encoders) == 1 else tuple(encoders)

    @property
    def tokenizers(self):
        """The tokenizer of each of text_encoders: the tokenizer, or a tuple of several."""
        tokenizers = [getattr(self, part) for part in self.family.tokenizer_parts]
        return tokenizers[0] if len(tokenizers) == 1 else tuple(tokenizers)


def assemble_models(family, tokenizer, text_encoder, vae, unet, *, dtype, device, v2, v_parameterization, name,
                    **more) -> SDModels:
    """The loaded parts, cast and moved, in eval mode, with SD's training noise schedule; `more`: the family's
    other parts (text_encoder_2=, tokenizer_2=), modules among them cast and moved too."""
    more = {key: finish(value, dtype, device) if isinstance(value, torch.nn.Module) else value
            for key, value in more.items()}
    return SDModels(tokenizer=tokenizer, text_encoder=finish(text_encoder, dtype, device),
                    vae=finish(vae, dtype, device), unet=finish(unet, dtype, device),
                    noise_scheduler=make_noise_scheduler(v_parameterization), v2=bool(v2),
                    v_parameterization=bool(v_parameterization), name=name, family=family, **more)


class ModelFamily:
    """The seams of one model family; a subclass sets the attributes and implements the methods that raise."""

    name = ""  # the registry's key: "sd", "sdxl"
    title = ""  # in messages: "SD1.x/2.x", "SDXL"
    builtin_names: tuple = ()  # the builtin:* models it builds
    fallback = False  # recognises what no other family does (SD1.x/2.x: a folder or file of unknown layout)
    text_encoder_parts: tuple = ("text_encoder",)  # SDModels attributes, in LoRA prefix order
    tokenizer_parts: tuple = ("tokenizer",)
    default_resolution = 512  # --resolution when not given
    bucket_range = (256, 1024)  # --min_bucket_reso / --max_bucket_reso when not given
    v2_applies = True  # --v2 (SD2.x) means something for it
    clip_skip_note: str | None = None  # why --clip_skip does not apply; None: it does
    text_cache_tag: dict = {}  # in the key of its cached text-encoder outputs (files of earlier runs keep theirs)

    # -- recognising (no weights read) ---------------------------------------------------------------------------

    def recognises_folder(self, folder: Path) -> bool:
        raise NotImplementedError

    def recognises_checkpoint(self, names) -> bool:
        """Is a single file with these tensor names one of this family's?"""
        raise NotImplementedError

    # -- loading ---------------------------------------------------------------------------------------------------

    def load_builtin(self, name, *, v2, v_parameterization, dtype, device) -> SDModels:
        raise NotImplementedError

    def load_folder(self, folder: Path, *, v2, v_parameterization, dtype, device) -> SDModels:
        raise NotImplementedError

    def load_single_file(self, path: Path, reader, *, v2, v_parameterization, dtype, device,
                         config_dir=None) -> SDModels:
        raise NotImplementedError

    # -- text and added conditioning, the U-Net call ---------------------------------------------------------------

    def encode_prompts(self, models, captions, *, clip_skip=None, max_token_length=None):
        """Captions -> the encoded text: a tensor (B, T, D), or a tuple of tensors (SDXL: context, pooled).
        Gradients flow when an encoder trains; call it under torch.no_grad() otherwise."""
        raise NotImplementedError

    def time_ids(self, batch, *, device=None, dtype=torch.float32):
        """The per-sample added ids of a collated batch (SDXL: size and crop), or None."""
        return None

    def image_time_ids(self, size, crop, bucket):
        """time_ids of one image of displayed `size` (w, h), cropped at `crop` (left, top) to `bucket` (w, h)."""
        return self.time_ids({"original_sizes": [size], "crops": [crop], "buckets": [bucket]})

    def unet_conditioning(self, encoded, time_ids, *, device, dtype):
        """(encoder_hidden_states on `device`, the U-Net's other keyword arguments) from encode_prompts' output and
        time_ids' (already on `device` in `dtype`)."""
        return encoded.to(device), {}

    def call_unet(self, unet, noisy, timesteps, context, added):
        """The U-Net's prediction for noisy latents with unet_conditioning's inputs."""
        return unet(noisy, timesteps, context, **added).sample

    def cache_text_outputs(self, models, captions, *, device, clip_skip=None, max_token_length=None) -> dict:
        """caption -> encode_prompts' output for that caption alone, for frozen encoders and fixed captions."""
        captions, cache = sorted(captions), {}
        for encoder in models.text_encoder_list:
            encoder.to(device)
        with torch.no_grad():
            for start in range(0, len(captions), 16):
                chunk = captions[start:start + 16]
                encoded = self.encode_prompts(models, chunk, clip_skip=clip_skip, max_token_length=max_token_length)
                cache.update(zip(chunk, unbatch(encoded)))
        return cache

    # -- sampling --------------------------------------------------------------------------------------------------

    def pipeline(self, models, scheduler):
        """A diffusers pipeline around the loaded modules (shared, not copied)."""
        raise NotImplementedError

    def prompt_inputs(self, models, prompt, negative_prompt, *, expand, clip_skip=None, max_token_length=None,
                      device="cpu") -> dict:
        """The pipeline's keyword arguments for one prompt and its negative (`expand`: new tokens written out)."""
        raise NotImplementedError


def unbatch(encoded) -> list:
    """encode_prompts' output of a batch -> one per caption (a tensor's rows; a tuple's rows, as tuples)."""
    return list(zip(*encoded)) if isinstance(encoded, tuple) else list(encoded)


def rebatch(values):
    """unbatch's inverse: per-caption values (cached) -> a batch as encode_prompts gives it."""
    if isinstance(values[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*values))
    return torch.stack(values)


# ---------------------------------------------------------------------------------------------------------------
# The registry


FAMILIES: dict[str, ModelFamily] = {}


def register(family_class):
    """Class decorator: one instance of the family in FAMILIES, under its name."""
    FAMILIES[family_class.name] = family_class()
    return family_class


def families() -> list[ModelFamily]:
    """Every registered family, the fallback last: the order in which they are asked to recognise a model."""
    return sorted(FAMILIES.values(), key=lambda family: family.fallback)


def fallback_family() -> ModelFamily:
    return next(family for family in families() if family.fallback)


def family_named(name) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"no model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def builtin_family(name) -> ModelFamily | None:
    return next((family for family in families() if name in family.builtin_names), None)


def folder_family(folder) -> ModelFamily:
    return next(family for family in families() if family.fallback or family.recognises_folder(Path(folder)))


def checkpoint_family(names) -> ModelFamily:
    return next(family for family in families() if family.fallback or family.recognises_checkpoint(names))


def detect_family(name) -> ModelFamily:
    """The family of a model from its name, its folder's layout or a .safetensors header (no weights read); a .ckpt,
    or what cannot be read, gives the fallback family (its loader names any problem)."""
    name = str(name)
    found = builtin_family(name)
    if found is not None:
        return found
    path = Path(name).expanduser()
    if path.is_dir():
        return folder_family(path)
    if path.is_file() and path.suffix == ".safetensors":
        try:
            return checkpoint_family(SafetensorsFile(path).entries)
        except (OSError, ValueError):
            pass
    return fallback_family()


def family_titles() -> str:
    """"SD1.x/2.x/SDXL": every family's title, in the order the families registered."""
    return "/".join(family.title for family in FAMILIES.values())


def builtin_names() -> list[str]:
    """Every family's builtin:* names, in the order the families registered."""
    return [name for family in FAMILIES.values() for name in family.builtin_names]
