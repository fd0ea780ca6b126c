"""Loading Stable Diffusion 1.x/2.x, offline: the built-in tiny model, a diffusers folder, or one checkpoint file.

    models = load_models("builtin:mini")                        # pretrained mini SD1.x of the shapes world
    models = load_models("builtin:tiny")                        # tiny random SD1.x, same weights everywhere
    models = load_models("path/to/diffusers_folder")            # has model_index.json
    models = load_models("v1-5-pruned-emaonly.safetensors")     # original CompVis/Stability key layout
    models = load_models("v2-1_768-ema-pruned.ckpt", v_parameterization=True, dtype=torch.float16)

Single files are converted with the configs shipped in assets/ (v1, v2, v2-v) and the shipped CLIP tokenizer,
so nothing ever touches the network. Loading is lean on memory: modules are built on the meta device and each
tensor is read, cast to `dtype` and renamed one at a time, then assigned; no full fp32 copy is ever held when
`dtype` is half. Reading a file lives in base_checkpoint.py, renaming its keys to diffusers' names in convert.py.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import diffusers.utils.deprecation_utils
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lora_diffusion.formats.io import build_folder_atomically

from .checkpoint import CheckpointReader, ModelLoadError, SafetensorsFile
from .convert import check_is_sd_checkpoint, clip_names, detect_v2, unet_names, vae_names
from .tokenizer import load_clip_tokenizer, save_tokenizer

ASSETS = Path(__file__).parents[1] / "assets"
BUILTIN_TINY = "builtin:tiny"
BUILTIN_MINI = "builtin:mini"
BUILTIN_TINY_XL = "builtin:tiny-xl"  # SDXL topology, lora_diffusion/models/sdxl.py
MINI_FOLDER = ASSETS / "mini"  # written by `lora-diffusion pretrain-mini`
DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
# diffusers took `dtype=` for the deprecated `torch_dtype=` with _resolve_dtype; older ones know only torch_dtype
DIFFUSERS_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


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
    text_encoder_2: CLIPTextModel | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection); sdxl.py
    tokenizer_2: CLIPTokenizer | None = None
    sdxl: bool = False

    @property
    def text_encoders(self):
        """What create_network/load_network take: the text encoder, or SDXL's (text_encoder, text_encoder_2)."""
        return (self.text_encoder, self.text_encoder_2) if self.sdxl else self.text_encoder

    @property
    def tokenizers(self):
        """The tokenizer of each of text_encoders: the tokenizer, or SDXL's (tokenizer, tokenizer_2)."""
        return (self.tokenizer, self.tokenizer_2) if self.sdxl else self.tokenizer


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
    if name in (BUILTIN_TINY, BUILTIN_TINY_XL):  # built from configs with seeded random weights
        from .sdxl import build_tiny_xl_models

        kind, build = (("an SDXL", build_tiny_xl_models) if name == BUILTIN_TINY_XL
                       else ("an SD1.x-style", build_tiny_models))
        if v2:
            raise ModelLoadError(f"{name} is {kind} model; --v2 does not apply to it")
        models = build(seed=0, dtype=dtype, device=device)
        models.v_parameterization = bool(v_parameterization)
        models.noise_scheduler = make_noise_scheduler(models.v_parameterization)
        return models
    if name == BUILTIN_MINI:
        if not (MINI_FOLDER / "model_index.json").is_file():
            raise ModelLoadError(f"{BUILTIN_MINI} is not in this install ({MINI_FOLDER} is missing); "
                                 "build it with `lora-diffusion pretrain-mini`")
        if v2:
            raise ModelLoadError(f"{BUILTIN_MINI} is an SD1.x-style model; --v2 does not apply to it")
        models = load_diffusers_folder(MINI_FOLDER, v_parameterization=v_parameterization, dtype=dtype,
                                       device=device)
        models.name = BUILTIN_MINI
        return models
    path = Path(name).expanduser()
    if not path.exists():
        looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", name)
        hint = " (nothing is downloaded: fetch the model first and pass its local path)" if looks_like_hub_id else ""
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {name} not found; expected a diffusers folder with model_index.json, "
            f"a .safetensors/.ckpt SD1.x/2.x/SDXL checkpoint, {BUILTIN_MINI}, {BUILTIN_TINY} or {BUILTIN_TINY_XL}{hint}"
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
    return assemble(load_clip_tokenizer(v2=False), text_encoder, vae, unet, dtype=dtype, device=device, v2=False,
                    v_parameterization=False, name=BUILTIN_TINY)


def assemble(tokenizer, text_encoder, vae, unet, *, dtype, device, v2, v_parameterization, name) -> SDModels:
    """The loaded parts, cast and moved, in eval mode, with SD's training noise schedule."""
    return SDModels(tokenizer=tokenizer, text_encoder=finish(text_encoder, dtype, device),
                    vae=finish(vae, dtype, device), unet=finish(unet, dtype, device),
                    noise_scheduler=make_noise_scheduler(v_parameterization), v2=bool(v2),
                    v_parameterization=bool(v_parameterization), name=name)


def finish(module, dtype, device):
    # nn.Module.to, not diffusers' override, which warns about fp32-kept modules even when there are none
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval()


def save_tiny_diffusers_folder(path, seed=0):
    """Write the tiny model as a diffusers folder (save_pretrained + model_index.json), atomically."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new folder for the tiny diffusers model")
    models = build_tiny_models(seed=seed)

    def fill(staging):
        models.unet.save_pretrained(staging / "unet")
        models.vae.save_pretrained(staging / "vae")
        models.text_encoder.save_pretrained(staging / "text_encoder")
        declare_fp32_load(staging / "text_encoder" / "config.json")
        save_tokenizer(models.tokenizer, staging / "tokenizer")
        models.noise_scheduler.save_pretrained(staging / "scheduler")
        write_model_index(staging, "DDPMScheduler")

    build_folder_atomically(path, fill)
    return path


def declare_fp32_load(config_path):
    """Make a text encoder's config.json say float32, whatever its weights' precision. A plain
    `StableDiffusionPipeline.from_pretrained(folder)` builds the U-Net and VAE in fp32 (diffusers casts fp16 weights
    up), but transformers 5 builds the text encoder in the dtype its config names, and its save_pretrained names
    the saved dtype: fp16 weights then meet an fp32 U-Net at the first prompt. transformers 5 reads `dtype`, 4.x
    `torch_dtype` (only for dtype="auto"); both say float32, so fp16 weights keep a folder small and load as fp32."""
    config_path = Path(config_path)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = config["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model_index(folder, scheduler_class):
    """The model_index.json of an SD1.x StableDiffusionPipeline folder without safety checker."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# A diffusers folder.


def load_diffusers_folder(folder, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu"):
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"--pretrained_model_name_or_path {folder} is a folder but not a diffusers model folder: model_index.json "
            "is missing (expected model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/ subfolders)"
        )
    if (folder / "text_encoder_2").is_dir():  # SDXL
        from .sdxl import load_sdxl_folder

        if v2:
            raise ModelLoadError(f"{folder} is an SDXL model (it has text_encoder_2/); --v2 does not apply to it")
        return load_sdxl_folder(folder, v_parameterization=v_parameterization, dtype=dtype, device=device)
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise ModelLoadError(f"diffusers folder {folder} has no {part}/ subfolder")
    try:
        unet = load_part_lean(folder / "unet", dtype) or UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", variant=weights_variant(folder / "unet"), local_files_only=True,
            **{DIFFUSERS_DTYPE_KWARG: dtype},
        )
        vae = load_part_lean(folder / "vae", dtype) or AutoencoderKL.from_pretrained(
            folder, subfolder="vae", variant=weights_variant(folder / "vae"), local_files_only=True,
            **{DIFFUSERS_DTYPE_KWARG: dtype},
        )
        text_encoder = load_part_lean(folder / "text_encoder", dtype) or CLIPTextModel.from_pretrained(
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
            prediction = None
            if (scheduler_dir / "scheduler_config.json").is_file():
                prediction = read_config(scheduler_dir, "scheduler_config.json").get("prediction_type")
            v_parameterization = prediction == "v_prediction"
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {error}") from error
    return assemble(tokenizer, text_encoder, vae, unet, dtype=dtype, device=device, v2=bool(v2),
                    v_parameterization=bool(v_parameterization), name=str(folder))


def load_part_lean(subfolder, dtype):
    """One part of a diffusers folder built empty from its config and filled tensor by tensor, each cast to `dtype`
    as it is read. `from_pretrained` memory-maps the whole file, and every page it touched stays counted in the
    process's memory: an fp32 SD1.5 folder loaded as bf16 then peaks at the fp32 size. Returns None (the caller
    uses from_pretrained) for anything but one plain .safetensors whose keys match the config's module."""
    stem = "model" if subfolder.name == "text_encoder" else "diffusion_pytorch_model"
    variant = weights_variant(subfolder)
    weights = subfolder / (f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")
    if not weights.is_file():
        return None
    with init_empty_weights():
        if subfolder.name == "text_encoder":
            module = CLIPTextModel(CLIPTextConfig.from_pretrained(str(subfolder), local_files_only=True))
        else:
            model_class = UNet2DConditionModel if subfolder.name == "unet" else AutoencoderKL
            module = model_class.from_config(read_config(subfolder))
    expected = module.state_dict()
    reader = SafetensorsFile(weights)
    renamed = {}
    for name in reader.entries:  # transformers 4 and 5 write CLIP keys with and without `text_model.`
        for key in (name, name.removeprefix("text_model."), "text_model." + name):
            if key in expected:
                renamed[key] = name
                break
        else:
            if not name.endswith("position_ids"):
                return None
    if set(renamed) != set(expected):
        return None
    state = {key: reader[name].to(dtype) for key, name in renamed.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module


def weights_variant(subfolder):
    """"fp16" when a subfolder holds only fp16-variant weights (model.fp16.safetensors), as some downloads do."""
    files = [f.name for f in Path(subfolder).iterdir() if f.suffix in (".safetensors", ".bin")]
    plain = [f for f in files if len(f.split(".")) == 2]
    return "fp16" if not plain and any(".fp16." in f for f in files) else None


# ---------------------------------------------------------------------------------------------------------------
# A single checkpoint file in the original (CompVis / Stability) layout.


def load_single_file(path, *, v2=None, v_parameterization=None, dtype=torch.float32, device="cpu", config_dir=None):
    reader = CheckpointReader(path, dtype)
    from .sdxl import is_sdxl_checkpoint, load_sdxl_single_file

    if is_sdxl_checkpoint(reader.names):
        if v2:
            raise ModelLoadError(f"{path} holds SDXL weights (conditioner.embedders.* keys) but --v2 was given; "
                                 "drop the flag")
        return load_sdxl_single_file(path, reader, v_parameterization=v_parameterization, dtype=dtype,
                                     device=device, config_dir=config_dir)
    check_is_sd_checkpoint(path, reader.names)
    detected_v2 = detect_v2(reader)
    if v2 is not None and bool(v2) != detected_v2:
        found = ("SD2.x (OpenCLIP text encoder, 1024-wide cross-attention)" if detected_v2
                 else "SD1.x (CLIP text encoder)")
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
    vae_levels = len(read_config(config_dir / "vae")["up_block_types"])
    convert_into(vae, reader, vae_names(reader.names, vae_levels), path, "VAE")
    text_names = clip_names(reader.names, hasattr(text_encoder, "text_model"), text_encoder.config.num_hidden_layers)
    convert_into(text_encoder, reader, text_names, path, "text encoder")

    tokenizer_dir = config_dir / "tokenizer"
    if tokenizer_dir.is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    else:
        tokenizer = load_clip_tokenizer(v2=v2)
    return assemble(tokenizer, text_encoder, vae, unet, dtype=dtype, device=device, v2=v2,
                    v_parameterization=v_parameterization, name=str(path))


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

