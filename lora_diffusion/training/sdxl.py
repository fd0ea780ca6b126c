"""SDXL's conditioning in training (kohya's sdxl_train_network semantics, diffusers' StableDiffusionXLPipeline's
numbers):

- the context is the penultimate layer of both text encoders, joined along the width (768 + 1280 = 2048 on SDXL),
  without the final layer norm; --clip_skip does not apply;
- the pooled text embedding is the second encoder's projected `text_embeds` (of the first 75-token window when
  --max_token_length makes several);
- the time ids, per sample: [original height, original width, crop top, crop left, target height, target width],
  with the image's size as displayed, the bucket window's offset in the resized (and flipped) image, the bucket.
"""

import torch

from .text import tokenize_captions


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


def cache_text_encoder_outputs_sdxl(captions, tokenizers, text_encoders, *, device, max_token_length=None):
    """caption -> (context, pooled) for frozen text encoders and captions that never change."""
    from lora_diffusion import training  # looked up when called: a patched encode_prompts_sdxl is the one used

    captions, cache = sorted(captions), {}
    for encoder in text_encoders:
        encoder.to(device)
    with torch.no_grad():
        for start in range(0, len(captions), 16):
            chunk = captions[start:start + 16]
            context, pooled = training.encode_prompts_sdxl(tokenizers, text_encoders, chunk,
                                                           max_token_length=max_token_length)
            cache.update((c, (x, p)) for c, x, p in zip(chunk, context, pooled))
    return cache
