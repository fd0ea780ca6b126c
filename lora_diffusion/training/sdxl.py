"""SDXL's conditioning in training: the encoding and the time ids live with the SDXL family
(lora_diffusion.models.sdxl, whose docstring gives kohya's semantics); here the cache of frozen encoders' outputs."""

from types import SimpleNamespace

from lora_diffusion.models.family import family_named
from lora_diffusion.models.sdxl import encode_prompts_sdxl, sdxl_time_ids  # noqa: F401  names of this module


def cache_text_encoder_outputs_sdxl(captions, tokenizers, text_encoders, *, device, max_token_length=None):
    """caption -> (context, pooled) for frozen text encoders and captions that never change (the SDXL family's
    cache_text_outputs; a trainer with loaded models asks models.family)."""
    parts = SimpleNamespace(tokenizers=tuple(tokenizers), text_encoder_list=list(text_encoders))
    return family_named("sdxl").cache_text_outputs(parts, captions, device=device, max_token_length=max_token_length)
