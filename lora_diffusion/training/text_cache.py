"""--cache_text_encoder_outputs_to_disk: the frozen text encoders' outputs of each image's caption in a file next to
the image, '<stem>_te_<key>.safetensors' (kohya writes '<stem>_te_outputs.npz'), reused by later runs. The key hashes
the caption, the encoders (a fingerprint of their weights), --max_token_length and --clip_skip: a changed input never
reuses a stale file. A file holds "context" (the U-Net's encoder_hidden_states) and, for SDXL, "pooled"."""

import hashlib
import json

import torch

from lora_diffusion.data.errors import warn
from lora_diffusion.data.latents import read_cache_file, write_cache_file


def encoders_fingerprint(encoders) -> str:
    """Identifies text encoders by class and, per tensor, name, shape, dtype and rounded sums."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for encoder in encoders:
            digest.update(type(encoder).__name__.encode())
            for name, tensor in encoder.state_dict().items():
                values = tensor.detach().float()
                digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{values.sum().item():.6e}|"
                              f"{values.abs().sum().item():.6e}".encode())
    return digest.hexdigest()


def text_cache_key(caption, fields) -> str:
    return hashlib.sha256(json.dumps({"format": 1, "caption": caption, **fields}, sort_keys=True).encode()).hexdigest()


def _read(path, key):
    tensors = read_cache_file(path, key, "text-encoder", "encoding the caption again")
    if tensors is None:
        return None
    if "context" not in tensors or not all(torch.isfinite(t).all() for t in tensors.values()):
        warn(f"text-encoder cache file '{path}' is incomplete or not finite; encoding the caption again")
        return None
    return (tensors["context"], tensors["pooled"]) if "pooled" in tensors else tensors["context"]


def _write(path, key, value):
    tensors = {"context": value[0], "pooled": value[1]} if isinstance(value, tuple) else {"context": value}
    write_cache_file(path, key, tensors, "lora_diffusion.text_outputs.1")


def cache_text_outputs_on_disk(dataset, encode, fields):
    """caption -> cached value for every image of `dataset`, read from its file or made by `encode(captions)` (a
    dict caption -> tensor or (context, pooled)) and written. Returns (the cache, files read, files written)."""
    wanted = []
    for entry in dataset.entries:
        caption = dataset.fixed_caption_of(entry)
        key = text_cache_key(caption, fields)
        wanted.append((caption, key, entry.path.with_name(f"{entry.path.stem}_te_{key[:16]}.safetensors")))
    cache, todo = {}, []
    for caption, key, path in wanted:
        found = _read(path, key)
        if found is not None:
            cache.setdefault(caption, found)
        else:
            todo.append((caption, key, path))
    read = len(wanted) - len(todo)
    missing = sorted({caption for caption, _, _ in todo} - set(cache))
    if missing:
        cache.update(encode(missing))
    for caption, key, path in todo:
        _write(path, key, cache[caption])
    return cache, read, len(todo)
