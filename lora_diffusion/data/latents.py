"""The latent cache: encoding images with the VAE, a VAE fingerprint, cache keys and cache files."""

import hashlib
import json
from pathlib import Path

import torch

from lora_diffusion.formats.io import atomic_write

from .buckets import cover_size
from .errors import warn


def encode_latents(vae, images, *, device="cpu", dtype=torch.float32):
    """Images (B,3,H,W) in [-1,1] -> scaled latents: (mode of the posterior - shift) * scaling_factor."""
    with torch.no_grad():
        output = vae.encode(images.to(device=device, dtype=dtype))
        distribution = output.latent_dist if hasattr(output, "latent_dist") else output[0]
        latents = distribution.mode() if hasattr(distribution, "mode") else distribution.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor


def vae_fingerprint(vae) -> str:
    """Identifies a VAE by its config and, per tensor, name, shape, dtype and rounded sums: cheap next to
    encoding, and a different VAE (or a fine-tuned one) gets a different fingerprint."""
    digest = hashlib.sha256()
    config = getattr(vae, "config", None)
    if config is not None:
        # diffusers' bookkeeping keys (_use_default_values is a set turned into a list, in PYTHONHASHSEED order;
        # _name_or_path, _diffusers_version) do not change the latents and must not change the key
        values = {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}
        digest.update(json.dumps(values, sort_keys=True, default=_stable_json).encode())
    with torch.no_grad():
        for name, tensor in vae.state_dict().items():
            values = tensor.detach().float()
            stats = (values.sum().item(), values.abs().sum().item(), values.flatten()[:4].tolist())
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{stats[0]:.6e}|{stats[1]:.6e}|"
                          f"{[f'{v:.6e}' for v in stats[2]]}".encode())
    return digest.hexdigest()


def _stable_json(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


def latent_shape(vae, bucket):
    """(channels, h, w) of the latents of a (w, h) bucket, or None for a VAE without a diffusers config."""
    config = getattr(vae, "config", None)
    try:
        factor = 2 ** (len(config.block_out_channels) - 1)
        return (int(config.latent_channels), bucket[1] // factor, bucket[0] // factor)
    except (AttributeError, TypeError):
        return None


def latent_cache_key(entry, vae_key, dtype, *, interpolation=None, mask=None) -> str:
    """Hashes everything a cached latent (and its loss mask) depends on: image bytes, bucket, resize filter, crop,
    VAE and dtype, and the mask's source ("alpha": the image's own bytes; a mask file: its bytes). The filter and
    mask enter only when set, so the files of a run without them keep their keys."""
    resized = cover_size(entry.size, entry.bucket)
    crop = ((resized[0] - entry.bucket[0]) // 2, (resized[1] - entry.bucket[1]) // 2)
    fields = {"format": 1, "image": _file_sha256(entry.path), "bucket": list(entry.bucket),
               "resized": list(resized), "crop": list(crop), "vae": vae_key, "dtype": str(dtype)}
    if interpolation is not None:
        fields["interpolation"] = interpolation
    if mask is not None:
        fields["mask"] = "alpha" if mask == "alpha" else _file_sha256(mask)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def latent_file_path(entry, key, cache_dir):
    folder = Path(cache_dir) if cache_dir is not None else entry.path.parent
    return folder / f"{entry.path.stem}_{key[:16]}.safetensors"


def _file_sha256(path, chunk=1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_cache_file(path: Path, key: str, what: str, redo: str) -> dict | None:
    """The tensors of a cache file written for `key`, or None when there is none for it; an unreadable file is
    reported (named, as `what` cache file, saying `redo`) and None returned, so its input is encoded again."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        warn(f"{what} cache file '{path}' is unreadable ({type(e).__name__}: {e}); {redo}")
        return None


def write_cache_file(path: Path, key: str, tensors: dict, file_format: str):
    from safetensors.torch import save
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={"key": key, "format": file_format})
    atomic_write(path, lambda f: f.write(data))


def read_latent_file(path: Path, key: str, shape=None, mask_shape=None):
    """(latents, flipped latents or None, mask or None) from a cache file, or None when there is none for this key.
    A file that is unreadable, of the wrong shape or not finite (a mask: not uint8 of `mask_shape`) is reported
    (named) and encoded again, never trained on."""
    tensors = read_cache_file(path, key, "latent", "encoding the image again")
    if tensors is None:
        return None
    if "latents" not in tensors:
        warn(f"latent cache file '{path}' holds no latents; encoding the image again")
        return None
    plain, flipped = tensors["latents"], tensors.get("latents_flipped")
    shape = tuple(shape) if shape is not None else tuple(plain.shape)  # at least the two must agree
    for tensor in (plain, flipped):
        if tensor is None:
            continue
        if tuple(tensor.shape) != shape:
            warn(f"latent cache file '{path}' holds latents of shape {tuple(tensor.shape)}, expected {shape}; "
                 f"encoding the image again")
            return None
        if not torch.isfinite(tensor).all():
            warn(f"latent cache file '{path}' holds NaN or infinite values; encoding the image again")
            return None
    mask = tensors.get("alpha_mask")  # uint8: 255 is 1.0
    if mask is not None and ((mask_shape is not None and tuple(mask.shape) != tuple(mask_shape)) or
                             mask.dtype != torch.uint8):
        warn(f"latent cache file '{path}' holds a mask of shape {tuple(mask.shape)} and dtype {mask.dtype}, "
             f"expected {mask_shape} uint8; encoding the image again")
        return None
    return plain, flipped, mask


def write_latent_file(path: Path, key: str, plain, flipped, mask=None):
    tensors = {"latents": plain} if flipped is None else {"latents": plain, "latents_flipped": flipped}
    if mask is not None:
        tensors["alpha_mask"] = mask
    write_cache_file(path, key, tensors, "lora_diffusion.latents.1")


def cache_latents_in_shares(dataset, vae, *, rank: int, world: int, wait, to_disk: bool, scratch_dir: Path,
                            **encode_options):
    """dataset.cache_latents over several processes: process `rank` of `world` encodes every world-th image and
    writes it to the disk cache (the images' folders with `to_disk`, else `scratch_dir`), `wait()` (a barrier for
    every process) and then each process caches the whole dataset, reading the others' shares from disk. No
    process encodes another's share (on several nodes without a shared disk, a node encodes what it cannot read).
    Afterwards the scratch folder is deleted (rank 0). `encode_options`: batch_size, device, dtype."""
    import copy
    import shutil

    cache_dir = None if to_disk else Path(scratch_dir)
    share = copy.copy(dataset)  # the same dataset, but only this process's images to encode
    share.entries = dataset.entries[rank::world]
    encode_options.setdefault("vae_id", vae_fingerprint(vae))  # the same key for both passes, computed once
    try:
        share.cache_latents(vae, to_disk=True, cache_dir=cache_dir, **encode_options)
        wait()
        dataset.cache_latents(vae, to_disk=True, cache_dir=cache_dir, **encode_options)
        wait()
    finally:
        if cache_dir is not None and rank == 0:
            shutil.rmtree(cache_dir, ignore_errors=True)
