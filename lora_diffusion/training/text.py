"""Captions -> CLIP text-encoder hidden states (kohya semantics): the encoding lives with the models
(lora_diffusion.models.text, used by each family's encode_prompts); here the cache of a frozen encoder's outputs."""

from types import SimpleNamespace

from lora_diffusion.models.family import family_named
from lora_diffusion.models.text import (  # noqa: F401  the names of this module before the encoding moved down
    MAX_TOKEN_LENGTHS,
    encode_prompts,
    encode_token_ids,
    final_layer_norm,
    tokenize_captions,
)


def cache_text_encoder_outputs(captions, tokenizer, text_encoder, *, device, clip_skip=None, max_token_length=None):
    """caption -> encoder hidden states, for a frozen text encoder and captions that never change (the SD1.x/2.x
    family's cache_text_outputs; a trainer with loaded models asks models.family)."""
    parts = SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder, text_encoder_list=[text_encoder])
    return family_named("sd").cache_text_outputs(parts, captions, device=device, clip_skip=clip_skip,
                                                 max_token_length=max_token_length)
