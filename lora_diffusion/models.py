"""Loading Stable Diffusion 1.x/2.x, offline: the built-in tiny model, a diffusers folder, or one checkpoint file.

    models = load_models("builtin:tiny")                        # tiny random SD1.x, same weights everywhere
    models = load_models("path/to/diffusers_folder")            # has model_index.json
    models = load_models("v1-5-pruned-emaonly.safetensors")     # original CompVis/Stability key layout
    models = load_models("v2-1_768-ema-pruned.ckpt", v_parameterization=True, dtype=torch.float16)

Single files are converted with the configs shipped in assets/ (v1, v2, v2-v) and the shipped CLIP tokenizer,
so nothing ever touches the network. Loading is lean on memory: modules are built on the meta device and each
tensor is read, cast to `dtype` and renamed one at a time, then assigned; no full fp32 copy is ever held when
`dtype` is half.
"""

import ctypes
import ctypes.util
import json
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .tokenizer import load_clip_tokenizer

ASSETS = Path(__file__).parent / "assets"
BUILTIN_TINY = "builtin:tiny"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1.x: OpenAI CLIP ViT-L/14 in transformers' layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2.x: OpenCLIP ViT-H/14 in open_clip's layout
DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def load_libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if os.name == "posix" else None
    except OSError:
        return None


LIBC = load_libc()
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if LIBC is not None else 4096
MADV_DONTNEED = 4  # Linux and macOS
SD2_CROSS_ATTENTION_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


class ModelLoadError(ValueError):
    """A model path or file that cannot be loaded; the message names the file and what was expected."""


@dataclass
class SDModels:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    v2: bool
    v_parameterization: bool
    name: str


def make_noise_scheduler(v_parameterization=False):
    """The DDPM schedule SD was trained with (the same for 1.x and 2.x); only the prediction target differs."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,  # as SD's own scheduler configs; only inference timesteps depend on it
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def load_models(name_or_path, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu", config_dir=None):
    """Load tokenizer, text encoder, VAE, U-Net and the training noise scheduler.

    v2: None detects SD2.x (from the weights or the folder's configs); True/False forces it.
    v_parameterization: None means False for single files (it cannot be read from the weights: pass True for
        SD2.x 768-v models) and the folder's scheduler prediction_type for diffusers folders.
    config_dir: for single files only, a folder with unet/, vae/, text_encoder/ configs (and optionally
        tokenizer/) to convert with instead of the shipped assets/v1, assets/v2 or assets/v2-v.
    """
    name = str(name_or_path)
    if name == BUILTIN_TINY:
        if v2:
            raise ModelLoadError(f"{BUILTIN_TINY} is an SD1.x-style model; --v2 does not apply to it")
        models = build_tiny_models(seed=0, dtype=dtype, device=device)
        models.v_parameterization = bool(v_parameterization)
        models.noise_scheduler = make_noise_scheduler(models.v_parameterization)
        return models
    path = Path(name).expanduser()
    if not path.exists():
        looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name)
        hint = " (nothing is downloaded: fetch the model first and pass its local path)" if looks_like_hub_id else ""
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {name} not found; expected a diffusers folder with model_index.json, "
            f"a .safetensors/.ckpt SD1.x/2.x checkpoint, or {BUILTIN_TINY}{hint}"
        )
    if path.is_dir():
        return load_diffusers_folder(path, v2=v2, v_parameterization=v_parameterization, dtype=dtype, device=device)
    return load_single_file(
        path, v2=v2, v_parameterization=v_parameterization, dtype=dtype, device=device, config_dir=config_dir
    )


# ---------------------------------------------------------------------------------------------------------------
# The built-in tiny model: SD1.x topology, narrow channels, deterministic random weights.


def read_config(folder, filename="config.json"):
    with open(Path(folder) / filename, encoding="utf-8") as f:
        return json.load(f)


def empty_modules(config_dir):
    """Text encoder, VAE and U-Net from `config_dir`'s configs, parameters on the meta device (no memory)."""
    config_dir = Path(config_dir)
    with init_empty_weights():
        te_config = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"), local_files_only=True)
        text_encoder = CLIPTextModel(te_config)
        vae = AutoencoderKL.from_config(read_config(config_dir / "vae"))
        unet = UNet2DConditionModel.from_config(read_config(config_dir / "unet"))
    return text_encoder, vae, unet


def deterministic_state_dict(module, seed):
    """Weights drawn from a seeded generator in a fixed (sorted-name) order, on CPU in fp32: the same on every
    machine and independent of the libraries' own init code. Biases 0, norm scales 1, embeddings N(0, 0.02),
    other weights N(0, 1/fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in sorted(module.state_dict().items()):
        if name.endswith("bias"):
            state[name] = torch.zeros(meta.shape)
        elif meta.dim() == 1:
            state[name] = torch.ones(meta.shape)
        else:
            std = 0.02 if "embedding" in name else math.prod(meta.shape[1:]) ** -0.5
            state[name] = torch.empty(meta.shape).normal_(0.0, std, generator=generator)
    return state


def build_tiny_models(seed=0, dtype=torch.float32, device="cpu"):
    """The `builtin:tiny` pipeline from assets/tiny-sd: real CLIP tokenizer, random but reproducible weights."""
    text_encoder, vae, unet = empty_modules(ASSETS / "tiny-sd")
    for offset, module in enumerate((text_encoder, vae, unet)):
        module.load_state_dict(deterministic_state_dict(module, seed * 1000 + offset), assign=True)
    return SDModels(
        tokenizer=load_clip_tokenizer(v2=False),
        text_encoder=finish(text_encoder, dtype, device),
        vae=finish(vae, dtype, device),
        unet=finish(unet, dtype, device),
        noise_scheduler=make_noise_scheduler(False),
        v2=False,
        v_parameterization=False,
        name=BUILTIN_TINY,
    )


def finish(module, dtype, device):
    # nn.Module.to, not diffusers' override, which warns about fp32-kept modules even when there are none
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval()


def save_tiny_diffusers_folder(path, seed=0):
    """Write the tiny model as a diffusers folder (save_pretrained + model_index.json), atomically."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new folder for the tiny diffusers model")
    models = build_tiny_models(seed=seed)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    models.unet.save_pretrained(staging / "unet")
    models.vae.save_pretrained(staging / "vae")
    models.text_encoder.save_pretrained(staging / "text_encoder")
    models.tokenizer.save_pretrained(staging / "tokenizer")
    models.noise_scheduler.save_pretrained(staging / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.replace(staging, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# A diffusers folder.


def load_diffusers_folder(folder, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu"):
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {folder} is a folder but not a diffusers model folder: model_index.json "
            "is missing (expected model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/ subfolders)"
        )
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise ModelLoadError(f"diffusers folder {folder} has no {part}/ subfolder")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=dtype, variant=weights_variant(folder / "unet"), local_files_only=True
        )
        vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=dtype, variant=weights_variant(folder / "vae"), local_files_only=True
        )
        text_encoder = CLIPTextModel.from_pretrained(
            str(folder / "text_encoder"), variant=weights_variant(folder / "text_encoder"), local_files_only=True,
            **{DTYPE_KWARG: dtype},
        )
        if v2 is None:
            v2 = unet.config.cross_attention_dim == 1024
        if (folder / "tokenizer").is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        else:
            tokenizer = load_clip_tokenizer(v2=v2)
        if v_parameterization is None:
            scheduler_dir = folder / "scheduler"
            has_config = (scheduler_dir / "scheduler_config.json").is_file()
            prediction = read_config(scheduler_dir, "scheduler_config.json").get("prediction_type") if has_config else None
            v_parameterization = prediction == "v_prediction"
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {error}") from error
    return SDModels(
        tokenizer=tokenizer,
        text_encoder=finish(text_encoder, dtype, device),
        vae=finish(vae, dtype, device),
        unet=finish(unet, dtype, device),
        noise_scheduler=make_noise_scheduler(v_parameterization),
        v2=bool(v2),
        v_parameterization=bool(v_parameterization),
        name=str(folder),
    )


def weights_variant(subfolder):
    """"fp16" when a subfolder holds only fp16-variant weights (model.fp16.safetensors), as some downloads do."""
    files = [f.name for f in Path(subfolder).iterdir() if f.suffix in (".safetensors", ".bin")]
    plain = [f for f in files if len(f.split(".")) == 2]
    return "fp16" if not plain and any(".fp16." in f for f in files) else None


# ---------------------------------------------------------------------------------------------------------------
# A single checkpoint file in the original (CompVis / Stability) layout.


class CheckpointReader:
    """Key names of a checkpoint file, and each tensor on demand, cast to `dtype`."""

    def __init__(self, path, dtype):
        self.path, self.dtype = Path(path), dtype
        suffix = self.path.suffix.lower()
        if suffix not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(
                f"{self.path} is not a model checkpoint: expected a .safetensors or .ckpt/.pt file "
                "in the original SD1.x/2.x layout"
            )
        try:
            if suffix == ".safetensors":
                self.file, self.mapped = SafetensorsFile(self.path), False
                self.names = list(self.file.entries)
            else:
                self.file, self.mapped = read_torch_checkpoint(self.path)
                self.names = list(self.file)
        except ModelLoadError:
            raise
        except Exception as error:  # json, zipfile and pickle each raise their own kinds
            reason = f"{self.path} could not be read (corrupt, truncated or not a checkpoint?): {error}"
            raise ModelLoadError(reason) from error

    def get(self, name):
        tensor = self.file[name]
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        if not self.mapped:
            return tensor.to(dtype)
        owned = tensor.to(dtype, copy=True)  # the model must not keep pages of the file
        release_file_pages(tensor)
        return owned


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class SafetensorsFile:
    """Reads one tensor at a time with plain file reads. Memory-mapping (safe_open) would leave every page it
    touched resident and counted in the process's memory until the file is closed: a 4 GB fp32 file loaded as
    fp16 would peak at 6 GB instead of 2 GB. The format: 8-byte little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if not 2 <= header_size <= size - 8:
                raise ValueError(f"header size {header_size} does not fit a file of {size} bytes")
            header = json.loads(f.read(header_size))
        self.data_start = 8 + header_size
        header.pop("__metadata__", None)
        self.entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name} has unsupported dtype {entry['dtype']}")
            if self.data_start + end > size:
                raise ValueError(f"the data of {name} ends past the end of the file (truncated?)")
            if end - begin != math.prod(entry["shape"]) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize:
                raise ValueError(f"the data size of {name} does not match its shape {entry['shape']}")

    def __getitem__(self, name):
        entry = self.entries[name]
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def read_torch_checkpoint(path):
    """(state dict, memory-mapped?) of a .ckpt/.pt file, read with weights_only=True: pickled code never runs."""
    try:
        try:
            checkpoint, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            checkpoint, mapped = torch.load(path, map_location="cpu", weights_only=True), False  # legacy format
    except pickle.UnpicklingError as error:
        detail = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
        if detail:
            raise ModelLoadError(
                f"{path} contains pickled objects other than tensors ({detail[0].split(' was not')[0]}), "
                "which are not loaded for safety (torch.load weights_only=True). "
                "Convert it to .safetensors with a tool you trust, then load that"
            ) from error
        raise
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{path} does not hold a state dict (found {type(checkpoint).__name__})")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}, mapped


def release_file_pages(tensor):
    """Drop the pages of a memory-mapped (read-only, file-backed) tensor from this process's resident memory;
    they are re-read from the file if touched again. Without this, every page read stays counted, and a 4 GB
    fp32 .ckpt loaded as fp16 would peak at 6 GB. Only for tensors from torch.load(mmap=True): on ordinary
    memory MADV_DONTNEED would zero the data."""
    if LIBC is None:
        return
    storage = tensor.untyped_storage()
    start = storage.data_ptr() & ~(PAGE_SIZE - 1)
    end = storage.data_ptr() + storage.nbytes()
    if end > start:
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def check_is_sd_checkpoint(path, names):
    has = lambda prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    parts = {"U-Net": has(UNET_PREFIX), "VAE": has(VAE_PREFIX), "text encoder": has(CLIP_PREFIX) or has(OPEN_CLIP_PREFIX)}
    if all(parts.values()):
        return
    if any(n.startswith(("lora_unet_", "lora_te_")) for n in names):
        found = "it looks like a LoRA file, not a base model"
    elif has("conditioner.embedders."):
        found = "it looks like an SDXL checkpoint, which is not supported"
    elif any(parts.values()):
        found = "missing: " + ", ".join(p for p, ok in parts.items() if not ok)
    else:
        found = "found keys such as " + ", ".join(sorted(names)[:3]) if names else "it holds no tensors"
    raise ModelLoadError(
        f"{path} is not a recognised SD1.x/2.x checkpoint ({found}); expected keys starting with {UNET_PREFIX} (U-Net), "
        f"{VAE_PREFIX} (VAE) and {CLIP_PREFIX} (SD1.x CLIP) or {OPEN_CLIP_PREFIX} (SD2.x OpenCLIP)"
    )


def detect_v2(reader):
    if any(n.startswith(OPEN_CLIP_PREFIX) for n in reader.names):
        return True
    if SD2_CROSS_ATTENTION_KEY in reader.names:
        return reader.get(SD2_CROSS_ATTENTION_KEY).shape[1] == 1024
    return False


def load_single_file(path, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu", config_dir=None):
    reader = CheckpointReader(path, dtype)
    check_is_sd_checkpoint(path, reader.names)
    detected_v2 = detect_v2(reader)
    if v2 is not None and bool(v2) != detected_v2:
        found = "SD2.x (OpenCLIP text encoder, 1024-wide cross-attention)" if detected_v2 else "SD1.x (CLIP text encoder)"
        flag = "given" if v2 else "set to false"
        raise ModelLoadError(f"{path} holds {found} weights but --v2 was {flag}; drop the flag to let it be detected")
    v2 = detected_v2
    v_parameterization = bool(v_parameterization)
    if config_dir is None:
        config_dir = ASSETS / ("v1" if not v2 else "v2-v" if v_parameterization else "v2")
    config_dir = Path(config_dir)

    text_encoder, vae, unet = empty_modules(config_dir)
    unet_config = read_config(config_dir / "unet")
    convert_into(unet, reader, unet_names(reader.names, unet_config["layers_per_block"]), path, "U-Net")
    convert_into(vae, reader, vae_names(reader.names, len(read_config(config_dir / "vae")["up_block_types"])), path, "VAE")
    text_names = clip_names(reader.names, hasattr(text_encoder, "text_model"), text_encoder.config.num_hidden_layers)
    convert_into(text_encoder, reader, text_names, path, "text encoder")

    tokenizer_dir = config_dir / "tokenizer"
    if tokenizer_dir.is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    else:
        tokenizer = load_clip_tokenizer(v2=v2)
    return SDModels(
        tokenizer=tokenizer,
        text_encoder=finish(text_encoder, dtype, device),
        vae=finish(vae, dtype, device),
        unet=finish(unet, dtype, device),
        noise_scheduler=make_noise_scheduler(v_parameterization),
        v2=v2,
        v_parameterization=v_parameterization,
        name=str(path),
    )


def convert_into(module, reader, names, path, part):
    """Fill `module` (on meta) from `names` = {original key: [(diffusers key, chunk index or None)] or None}."""
    expected = module.state_dict()
    state, unexpected = {}, []
    for original, targets in names.items():
        if targets is None or any(target not in expected for target, _ in targets):
            unexpected.append(original)
            continue
        tensor = reader.get(original)
        for target, chunk in targets:
            value = tensor.chunk(3)[chunk].clone() if chunk is not None else tensor
            state[target] = fit_shape(value, expected[target].shape, original, target, path)
        del tensor
    missing = [k for k in expected if k not in state]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: the {part} weights do not match the {part} config after conversion: "
            f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'})"
        )
    module.load_state_dict(state, strict=True, assign=True)


def fit_shape(tensor, shape, original, target, path):
    """Same tensor in the diffusers shape: 1x1 convolutions of the original become linear weights and back."""
    if tensor.shape == shape:
        return tensor
    strip = lambda s: tuple(s[:2]) if all(d == 1 for d in s[2:]) else tuple(s)  # noqa: E731
    if strip(tensor.shape) == strip(shape):
        return tensor.reshape(shape)
    raise ModelLoadError(
        f"{path}: {original} has shape {tuple(tensor.shape)} but {target} in the config expects {tuple(shape)}; "
        "is this the right model family (--v2) or config?"
    )


# Key names: original layout -> diffusers layout. Each maps the keys under one prefix; a key that has no place
# maps to None (reported as unexpected); keys known to carry nothing we need are left out.

UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
               ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]


def replace_all(text, pairs):
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def unet_name(key, layers_per_block):
    """One U-Net key (without prefix) in diffusers' naming, or None. Input/output blocks are numbered flat in the
    original: per resolution `layers_per_block` res(+attn) blocks then one down/up-sampler."""
    per_level = layers_per_block + 1
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    head, _, leaf = key.rpartition(".")
    if head in fixed:
        return f"{fixed[head]}.{leaf}"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", key):
        i, j, rest = int(m[1]) - 1, m[2], m[3]
        level, layer = divmod(i, per_level)
        if i < 0:
            return None
        if layer == layers_per_block:
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if j == "0" and rest.startswith("op.") else None
        if j == "0":
            return f"down_blocks.{level}.resnets.{layer}.{replace_all(rest, UNET_RESNET)}"
        return f"down_blocks.{level}.attentions.{layer}.{rest}" if j == "1" else None
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", key):
        j, rest = m[1], m[2]
        mid = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}.get(j)
        return mid and f"mid_block.{mid}.{replace_all(rest, UNET_RESNET) if j != '1' else rest}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", key):
        level, layer = divmod(int(m[1]), per_level)
        j, rest = m[2], m[3]
        if j == "0":
            return f"up_blocks.{level}.resnets.{layer}.{replace_all(rest, UNET_RESNET)}"
        if rest.startswith("conv."):  # the upsampler: slot 1 in blocks without attention, else slot 2
            return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
        return f"up_blocks.{level}.attentions.{layer}.{rest}" if j == "1" else None
    return None


def unet_names(names, layers_per_block):
    return {n: wrap(unet_name(n[len(UNET_PREFIX):], layers_per_block)) for n in names if n.startswith(UNET_PREFIX)}


VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_name(key, num_levels):
    """One VAE key (without prefix) in diffusers' naming, or None. The original decoder counts its levels from
    the lowest resolution up (up.3 runs first), diffusers in running order."""
    key = key.replace("nin_shortcut", "conv_shortcut")
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key):
        return f"{m[1]}.{'conv_norm_out' if m[2] == 'norm_out' else m[2]}.{m[3]}"
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
        return key
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
    if (m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)) and m[2] in VAE_ATTENTION:
        return f"{m[1]}.mid_block.attentions.0.{VAE_ATTENTION[m[2]]}.{m[3]}"
    return None


def vae_names(names, num_levels):
    return {
        n: wrap(vae_name(n[len(VAE_PREFIX):], num_levels))
        for n in names
        if n.startswith(VAE_PREFIX) and not n.startswith(VAE_PREFIX + "loss.")  # training-loss weights, unused
    }


OPEN_CLIP_LAYER = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                   ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}  # not part of a CLIPTextModel


def clip_names(names, nested, num_layers):
    """Text-encoder keys. SD1.x stores transformers' CLIPTextModel (with or without the `text_model.` level);
    SD2.x stores open_clip's text tower, whose fused q/k/v is split in three, and whose last block SD2 skips
    (it uses the penultimate layer), so diffusers' config has one layer fewer."""
    level = "text_model." if nested else ""
    result = {}
    for n in names:
        if n.startswith(CLIP_PREFIX):
            key = n[len(CLIP_PREFIX):].removeprefix("text_model.")
            if key != "embeddings.position_ids":  # a buffer, rebuilt by the model
                result[n] = wrap(level + key)
        elif n.startswith(OPEN_CLIP_PREFIX):
            key = n[len(OPEN_CLIP_PREFIX):]
            if key in OPEN_CLIP_UNUSED or key.startswith("visual."):
                continue
            if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key):
                index, rest = int(m[1]), m[2]
                if index == num_layers:
                    continue
                layer = f"{level}encoder.layers.{index}."
                if m := re.fullmatch(r"attn\.in_proj_(weight|bias)", rest):
                    result[n] = [(f"{layer}self_attn.{q}_proj.{m[1]}", chunk) for chunk, q in enumerate("qkv")]
                else:
                    result[n] = wrap(layer + replace_all(rest, OPEN_CLIP_LAYER))
                continue
            fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
                     "positional_embedding": "embeddings.position_embedding.weight",
                     "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
            result[n] = wrap(fixed.get(key) and level + fixed[key])
    return result


def wrap(target):
    return None if target is None else [(target, None)]
