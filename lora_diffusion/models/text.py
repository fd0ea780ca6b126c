"""Captions -> CLIP text-encoder hidden states, the U-Net's `encoder_hidden_states` (kohya semantics); every
family with CLIP text encoders encodes with these (SDXL joins two encoders' states: sdxl.py).

max_token_length None/75: one 77-token window (BOS, 75 tokens, EOS/padding).
max_token_length 150/225: the caption is tokenized to max_token_length + 2 ids, split into 2 or 3 windows
of 75 tokens each wrapped in BOS ... EOS, each window encoded separately, and the states are joined as
[first BOS] + [the 75 inner states of every window] + [last EOS] -> 152 or 227 tokens.
clip_skip k > 1: the hidden states k layers from the end (k=2: the penultimate layer, NovelAI style),
passed through the final layer norm as kohya and the SD web UIs do.
"""

import torch

MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def final_layer_norm(text_encoder):
    """The final LayerNorm of a transformers CLIPTextModel (4.x: under `text_model`, 5.x: top level)."""
    model = getattr(text_encoder, "module", text_encoder)  # unwrap DistributedDataParallel
    return getattr(model, "text_model", model).final_layer_norm


def tokenize_captions(tokenizer, captions, *, max_token_length=None):
    """Token ids (B, n_windows, 77): one 77-id window per 75 tokens of caption, each BOS ... EOS/PAD."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"--max_token_length must be one of 75, 150, 225 (or unset), got {max_token_length!r}")
    if isinstance(captions, str):
        captions = [captions]
    window = 77
    total = window if max_token_length in (None, 75) else max_token_length + 2
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=total,
                    return_tensors="pt").input_ids
    if total == window:
        return ids.unsqueeze(1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, total - 1, window - 2):
        chunk = torch.cat([ids[:, :1], ids[:, start : start + window - 2], ids[:, -1:]], dim=1).clone()
        if pad != eos:
            # SD 2.x pads with a token other than EOS. A window cut inside the text ends in EOS; a window
            # that starts past the text gets BOS EOS PAD ... like a tokenized empty caption (kohya).
            inner_last = chunk[:, -2]
            cut = (inner_last != eos) & (inner_last != pad)
            chunk[cut, -1] = eos
            empty = chunk[:, 1] == pad
            chunk[empty, 1] = eos
        windows.append(chunk)
    return torch.stack(windows, dim=1)


def encode_token_ids(text_encoder, input_ids, *, clip_skip=None):
    """Hidden states (B, T, D) for ids of shape (B, 77) or (B, n_windows, 77) from tokenize_captions."""
    if clip_skip is not None and clip_skip < 1:
        raise ValueError(f"--clip_skip must be >= 1 (2 = penultimate layer), got {clip_skip}")
    if input_ids.ndim == 2:
        input_ids = input_ids.unsqueeze(1)
    b, n_windows, window = input_ids.shape
    flat_ids = input_ids.reshape(b * n_windows, window).to(next(text_encoder.parameters()).device)
    if clip_skip is None or clip_skip == 1:
        states = text_encoder(flat_ids, return_dict=True).last_hidden_state
    else:
        out = text_encoder(flat_ids, output_hidden_states=True, return_dict=True)
        states = final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    states = states.reshape(b, n_windows, window, states.shape[-1])
    if n_windows == 1:
        return states[:, 0]
    # Keep the first window's BOS, the 75 inner states of every window, the last window's EOS.
    inner = states[:, :, 1:-1].reshape(b, n_windows * (window - 2), states.shape[-1])
    return torch.cat([states[:, 0, :1], inner, states[:, -1, -1:]], dim=1)


def encode_prompts(tokenizer, text_encoder, captions, *, clip_skip=None, max_token_length=None):
    """Captions (a list of str) -> encoder_hidden_states (B, 77 | 152 | 227, D).

    Gradients flow when the text encoder is trained (LoRA on it); call it under torch.no_grad() otherwise.
    """
    input_ids = tokenize_captions(tokenizer, captions, max_token_length=max_token_length)
    return encode_token_ids(text_encoder, input_ids, clip_skip=clip_skip)
