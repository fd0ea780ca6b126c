"""What every model family's loader shares: reading a part's config, building a module empty and filling it a tensor
at a time (a diffusers folder's part, or a converted single file), seeded weights for the built-in tiny models, the
cast and move at the end, and SD's training noise schedule. Below the families (sd.py, sdxl.py): it knows none."""

import json
import math
from pathlib import Path

import diffusers.utils.deprecation_utils
import torch
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .checkpoint import ModelLoadError, SafetensorsFile

ASSETS = Path(__file__).parents[1] / "assets"
DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
# diffusers took `dtype=` for the deprecated `torch_dtype=` with _resolve_dtype; older ones know only torch_dtype
DIFFUSERS_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


def make_noise_scheduler(v_parameterization=False):
    """The DDPM schedule SD was trained with (the same for 1.x, 2.x and SDXL); only the prediction target differs."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,  # as SD's own scheduler configs; only inference timesteps depend on it
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def read_config(folder, filename="config.json"):
    with open(Path(folder) / filename, encoding="utf-8") as f:
        return json.load(f)


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


def finish(module, dtype, device):
    # nn.Module.to, not diffusers' override, which warns about fp32-kept modules even when there are none
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval()


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


# ---------------------------------------------------------------------------------------------------------------
# A diffusers folder's parts


def load_part(folder, part, model_class, dtype, *, lean=True):
    """`folder`/`part` as a `model_class` in `dtype`: lean (load_part_lean) where it can be, else the library's
    from_pretrained, local files only (diffusers' and transformers' dtype keywords as each version names them)."""
    subfolder = Path(folder) / part
    module = load_part_lean(subfolder, dtype) if lean else None
    if module is not None:
        return module
    variant = weights_variant(subfolder)
    if issubclass(model_class, transformers.PreTrainedModel):
        return model_class.from_pretrained(str(subfolder), variant=variant, local_files_only=True,
                                           **{DTYPE_KWARG: dtype})
    return model_class.from_pretrained(folder, subfolder=part, variant=variant, local_files_only=True,
                                       **{DIFFUSERS_DTYPE_KWARG: dtype})


def folder_predicts_v(folder) -> bool:
    """Does the folder's scheduler/scheduler_config.json say prediction_type v_prediction?"""
    scheduler_dir = Path(folder) / "scheduler"
    if not (scheduler_dir / "scheduler_config.json").is_file():
        return False
    return read_config(scheduler_dir, "scheduler_config.json").get("prediction_type") == "v_prediction"


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
# A single checkpoint file, converted (the key names: convert.py)


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
