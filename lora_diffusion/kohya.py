"""The kohya LoRA file: tensors and metadata in and out of `.safetensors`.

Defined once here, used for writing and reading. See docs/format.md for the contract.
Per module `<name>`: `<name>.lora_down.weight` [r, in(, kh, kw)], `<name>.lora_up.weight` [out, r(, 1, 1)],
`<name>.alpha` (0-dim). Every metadata value is a string.
"""

import datetime
import hashlib
import json
import os
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from .io import atomic_write
from .targets import KNOWN_PREFIXES

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
_UNSUPPORTED = {
    "hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
    "dora_scale": "DoRA", "diff": "full-weight difference (LyCORIS 'full')", "oft_": "OFT", "boft_": "BOFT",
}


class LoRAFileError(ValueError):
    """A file that is not a LoRA this library can read or write."""


@dataclass
class ModuleWeights:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float  # kohya convention: a missing .alpha means alpha = rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# -- reading ---------------------------------------------------------------------------------------------------


def read_lora_file(path: str) -> tuple[dict[str, ModuleWeights], dict[str, str]]:
    """Read a kohya-format LoRA: {kohya module name: ModuleWeights}, metadata. Raises LoRAFileError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoRAFileError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise LoRAFileError(f"{path} is not a readable .safetensors file ({e}); expected a kohya-format LoRA "
                            f"(`lora_unet_*`/`lora_te_*` keys with lora_down/lora_up/alpha)") from None
    return parse_state_dict(tensors, source=path), metadata


def parse_state_dict(tensors: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, ModuleWeights]:
    """Group flat kohya keys into modules, validating names, suffixes and shapes."""
    if not tensors:
        raise LoRAFileError(f"{source} holds no tensors")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in _SUFFIXES or not name.startswith(tuple(p + "_" for p in KNOWN_PREFIXES)):
            unknown.append(key)
            continue
        grouped.setdefault(name, {})[suffix] = tensor
    if unknown:
        raise LoRAFileError(_unknown_keys_message(unknown, source))

    modules = {}
    for name, parts in sorted(grouped.items()):
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            missing = [s for s in _SUFFIXES[:2] if s not in parts]
            raise LoRAFileError(f"{source}: module {name} lacks {', '.join(name + '.' + m for m in missing)}")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
            raise LoRAFileError(f"{source}: module {name} has inconsistent shapes lora_down {tuple(down.shape)}, "
                                f"lora_up {tuple(up.shape)}; expected [r, in(, kh, kw)] and [out, r(, 1, 1)]")
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise LoRAFileError(f"{source}: {name}.lora_up.weight must be 1x1, got {tuple(up.shape)}")
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LoRAFileError(f"{source}: {name}.alpha must be a scalar, got shape {tuple(alpha.shape)}")
        rank = down.shape[0]
        alpha_value = float(alpha.float().item()) if alpha is not None else float(rank)
        modules[name] = ModuleWeights(down, up, alpha_value)
    return modules


def _unknown_keys_message(keys: list[str], source: str) -> str:
    for marker, kind in _UNSUPPORTED.items():
        if any(marker in k for k in keys):
            return (f"{source} is a {kind} file, which is not a plain LoRA/LoCon; keys such as "
                    f"{', '.join(sorted(k for k in keys if marker in k)[:3])} cannot be loaded")
    shown = ", ".join(sorted(keys)[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return (f"{source} has keys that are not kohya LoRA keys: {shown}. Expected "
            f"`<lora_unet|lora_te|lora_te1|lora_te2>_<module>.{{lora_down.weight,lora_up.weight,alpha}}`")


# -- writing ---------------------------------------------------------------------------------------------------


def write_lora_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write tensors + metadata atomically, adding kohya's `sshs_*` hashes. A crash leaves any old file intact."""
    path = os.fspath(path)
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    data = save_safetensors_bytes(tensors, metadata)
    atomic_write(path, lambda f: f.write(data))


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya/AUTOMATIC1111 hashes, computed (as kohya does) on the file written with only the `ss_*` metadata:
    sha256 of the body after the header, and the first 8 hex of sha256 of the 64 KiB at offset 1 MiB."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save_safetensors_bytes(tensors, ss_only)
    (header_length,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(memoryview(data)[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


BASE_MODEL_VERSIONS = {  # (v2, v_parameterization) -> ss_base_model_version, modelspec architecture
    (False, False): ("sd_v1", "stable-diffusion-v1/lora"),
    (True, False): ("sd_v2", "stable-diffusion-v2-512/lora"),
    (True, True): ("sd_v2_v", "stable-diffusion-v2-768-v/lora"),
}


def network_metadata(*, rank: int, alpha: float, network_args: dict | None = None, v2: bool = False,
                     v_parameterization: bool = False, output_name: str = "lora", resolution=(512, 512),
                     title: str | None = None) -> dict[str, str]:
    """The keys every tool reads (ss_network_*, ss_base_model_version) and the ModelSpec block."""
    base_version, architecture = BASE_MODEL_VERSIONS[(bool(v2), bool(v_parameterization and v2))]
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({k: str(v) for k, v in (network_args or {}).items()}),
        "ss_v2": str(bool(v2)),
        "ss_base_model_version": base_version,
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or output_name,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
    }
