"""The kohya LoRA file: tensors and metadata in and out of `.safetensors`.

Defined once here, used for writing and reading. See docs/format.md for the contract.
Per module `<name>`: `<name>.lora_down.weight` [r, in(, kh, kw)], `<name>.lora_up.weight` [out, r(, 1, 1)],
`<name>.alpha` (0-dim); or LyCORIS' LoHa (`hada_*`), LoKr (`lokr_*`), iA3 (`weight`, `on_input`) tensors;
`dora_scale` for DoRA. Which keys make which algorithm is declared by each algorithm (lora_diffusion/core/adapters/).
Every metadata value is a string.
"""

import datetime
import hashlib
import json
import os
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes

from lora_diffusion.core import adapters
from lora_diffusion.core.targets import KNOWN_PREFIXES, canonical_kohya_name
from lora_diffusion.formats.errors import LoRAFileError, LoRAFileWarning
from lora_diffusion.formats.io import atomic_write

# 0.1.0's names of what each algorithm declares (core/adapters/)
LOHA_KEYS = adapters.LoHaLayer.file_keys
LOKR_KEYS = adapters.LoKrLayer.file_keys
ALGO_NAMES = {name: cls.label for name, cls in adapters.ALGORITHMS.items() if name != "dylora"}  # DyLoRA: LoRA files
EMBEDDING_PREFIX = "bundle_emb."  # A1111's textual-inversion embeddings bundled in a LoRA file


def _format_of(key: str, tensor: torch.Tensor) -> str | None:
    """The format (with its article) that a key not of a plain LoRA belongs to, from LyCORIS' and kohya's names."""
    parts = key.split(".")[1:]
    if not parts:
        return None
    last = parts[-1]
    if any(p.startswith("hada_") for p in parts):
        return "a LoHa (LyCORIS)"
    if any(p.startswith("lokr_") for p in parts):
        return "a LoKr (LyCORIS)"
    if "lora_mid" in parts:
        return "a LoCon with Tucker decomposition (lora_mid)"
    if last in ("diff", "diff_b"):
        return "a full-weight difference (LyCORIS 'full')"
    if any(p.startswith("boft_") for p in parts) or (last == "oft_blocks" and tensor.dim() == 4):
        return "a BOFT"  # BOFT's blocks are 4-D, OFT's 3-D (ComfyUI tells them apart the same way)
    if any(p.startswith("oft_") for p in parts):
        return "an OFT"
    if last == "weight" and len(parts) >= 2 and parts[-2] in ("a1", "a2", "b1", "b2"):
        return "a GLoRA (LyCORIS)"
    if last in ("w_norm", "b_norm"):
        return "a norm-layer (LyCORIS w_norm/b_norm)"
    return None


@dataclass
class ModuleWeights:
    """One module of a file. algo "lora": down/up (and `tensors` holds them by key); the others ("loha", "lokr",
    "ia3", see lora_diffusion/core/adapters/): `tensors` holds LyCORIS' tensors by key (hada_w1_a, ..., lokr_w1, ...,
    weight/on_input) and down/up are None. `dora_scale` [out, 1(, 1, 1)] or [1, in(, 1, 1)] makes any of them DoRA
    (core/adapters/dora.py checks and applies it)."""
    down: torch.Tensor | None
    up: torch.Tensor | None
    alpha: float  # kohya convention: a missing .alpha, or 0, means alpha = rank
    algo: str = "lora"
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    dora_scale: torch.Tensor | None = None

    @property
    def module_tensors(self) -> dict[str, torch.Tensor]:
        """The algorithm's tensors by file key (alpha and dora_scale aside)."""
        if self.down is not None:
            return {"lora_down.weight": self.down, "lora_up.weight": self.up}
        return self.tensors

    @property
    def rank(self) -> int:
        """The rank (r of alpha / r); 1 for a LoKr whose factors are both full (its scale is 1) and for iA3."""
        return _algorithm(self.algo).file_rank(self.module_tensors)

    @property
    def scale(self) -> float:
        """alpha / rank, or the algorithm's own rule (1 for a LoKr with both factors full, as LyCORIS; 1 for iA3)."""
        return _algorithm(self.algo).file_scale(self.module_tensors, self.alpha)

    @property
    def label(self) -> str:
        """LoRA, LoCon (a kxk conv), LoHa, LoKr, iA3; "DoRA " before it for DoRA (`algo` is the table's key)."""
        name = _algorithm(self.algo).file_label(self.module_tensors)
        return ("" if self.dora_scale is None else adapters.DoRA.label + " ") + name

    @property
    def kind(self) -> str:
        """0.1.0's name of `label` (an adapter layer's `kind` is its algo key, as `algo` here)."""
        warnings.warn("ModuleWeights.kind is now ModuleWeights.label", DeprecationWarning, stacklevel=2)
        return self.label


def _algorithm(name: str):
    return adapters.ALGORITHMS[name]


class LoRAModules(dict):
    """{kohya module name: ModuleWeights}, plus `embeddings`: the textual-inversion embeddings bundled in the file
    ({name: {key after the name: tensor}}, A1111's `bundle_emb.<name>.*`), which network.load_network applies."""

    def __init__(self, modules=(), embeddings=None):
        super().__init__(modules)
        self.embeddings = embeddings or {}


# -- reading ---------------------------------------------------------------------------------------------------


def read_lora_file(path: str, *, warn_embeddings: bool = True) -> tuple[LoRAModules, dict[str, str]]:
    """Read a kohya-format LoRA: {kohya module name: ModuleWeights}, metadata. Raises LoRAFileError. Bundled
    embeddings are in `modules.embeddings` (a warning says so unless `warn_embeddings=False`, for callers that
    apply them, such as network.load_network)."""
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
    return parse_state_dict(tensors, source=path, warn_embeddings=warn_embeddings), metadata


def parse_state_dict(tensors: dict[str, torch.Tensor], source: str = "state dict", *,
                     warn_embeddings: bool = True) -> LoRAModules:
    """Group flat kohya keys into modules, validating names, suffixes, shapes and values."""
    if not tensors:
        raise LoRAFileError(f"{source} holds no tensors")
    suffixes = adapters.file_keys()
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    unknown = {}
    for key, tensor in tensors.items():
        if key.startswith(EMBEDDING_PREFIX):
            name, _, rest = key[len(EMBEDDING_PREFIX):].partition(".")
            embeddings.setdefault(name, {})[rest] = tensor
            continue
        name, _, suffix = key.partition(".")
        if suffix not in suffixes or not name.startswith(tuple(p + "_" for p in KNOWN_PREFIXES)):
            unknown[key] = tensor
            continue
        grouped.setdefault(name, {})[suffix] = tensor
    if unknown:
        raise LoRAFileError(_unknown_keys_message(unknown, source))
    if not grouped:
        raise LoRAFileError(f"{source} holds only bundled embeddings ({', '.join(sorted(embeddings))}), no LoRA")

    spellings = {}
    for name in sorted(grouped):
        other = spellings.setdefault(canonical_kohya_name(name), name)
        if other != name:
            raise LoRAFileError(f"{source}: {other} and {name} are two spellings of the same module; a file may "
                                f"hold each module once")
    modules = LoRAModules(embeddings=embeddings)
    for name, parts in sorted(grouped.items()):
        for suffix, tensor in parts.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise LoRAFileError(f"{source}: {name}.{suffix} holds NaN or infinite values; the file is damaged "
                                    f"(saved from a diverged run?) and would turn every image black")
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LoRAFileError(f"{source}: {name}.alpha must be a scalar, got shape {tuple(alpha.shape)}")
        alpha_value = float(alpha.float().item()) if alpha is not None else 0.0
        dora = parts.get(adapters.DoRA.file_key)
        algos = adapters.detect(parts)
        tensors = {k: v for k, v in parts.items() if k not in ("alpha", adapters.DoRA.file_key)}
        if len(algos) != 1 or set(tensors) - set(algos[0].file_keys):
            raise LoRAFileError(f"{source}: module {name} has keys {sorted(parts)}; expected those of one algorithm: "
                                f"lora_down/lora_up (LoRA), hada_* (LoHa), lokr_* (LoKr), weight/on_input (iA3) or "
                                f"a1/a2/b1/b2 (GLoRA), w_norm/b_norm (norm layers)")
        cls = algos[0]
        cls.check_file_tensors(name, tensors, source)
        if cls.kind == "lora":
            weights = ModuleWeights(tensors["lora_down.weight"], tensors["lora_up.weight"], 0.0)
        else:
            weights = ModuleWeights(None, None, 0.0, cls.kind, tensors)
        if dora is not None:
            adapters.DoRA.check_file_tensor(name, dora, source)
            weights.dora_scale = dora
        weights.alpha = alpha_value or float(weights.rank)  # kohya: alpha 0 means alpha = rank
        modules[name] = weights
    if embeddings and warn_embeddings:
        warnings.warn(f"{source}: the bundled embedding(s) {', '.join(repr(n) for n in sorted(embeddings))} were "
                      f"not loaded (read_lora_file only lists them; network.load_network(..., tokenizer=) adds them "
                      f"to a text encoder)", LoRAFileWarning, stacklevel=3)
    return modules


def _unknown_keys_message(keys: dict[str, torch.Tensor], source: str) -> str:
    formats = {key: _format_of(key, tensor) for key, tensor in sorted(keys.items())}
    for kind, _ in Counter(f for f in formats.values() if f).most_common(1):  # the format of most keys
        examples = [k for k, f in formats.items() if f == kind][:3]
        return (f"{source} is {kind} file, which is not supported (LoRA/LoCon, LoHa, LoKr, iA3, GLoRA, norm layers "
                f"and DoRA are); keys such as {', '.join(examples)} cannot be loaded")
    shown = ", ".join(sorted(keys)[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return (f"{source} has keys that are not kohya LoRA keys: {shown}. Expected "
            f"`<lora_unet|lora_te|lora_te1|lora_te2>_<module>.{{lora_down.weight,lora_up.weight,alpha}}` (or LyCORIS' "
            f"hada_*/lokr_*/dora_scale, iA3's weight/on_input)")


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


SDXL_BASE_MODEL_VERSION = ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")  # kohya's and ModelSpec's names


def network_metadata(*, rank: int, alpha: float, network_args: dict | None = None, v2: bool = False,
                     network_module: str = "networks.lora",
                     v_parameterization: bool = False, output_name: str = "lora", resolution=None,
                     title: str | None = None, sdxl: bool = False) -> dict[str, str]:
    """The keys every tool reads (ss_network_*, ss_base_model_version) and the ModelSpec block. `resolution`
    defaults to 512 px (SD1.x/2.x) or 1024 px (`sdxl`)."""
    if sdxl and v2:
        raise ValueError("a LoRA's base model is SDXL or SD2.x (v2), not both")
    base_version, architecture = SDXL_BASE_MODEL_VERSION if sdxl else \
        BASE_MODEL_VERSIONS[(bool(v2), bool(v_parameterization and v2))]
    resolution = resolution or ((1024, 1024) if sdxl else (512, 512))
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    return {
        "ss_network_module": network_module,
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
