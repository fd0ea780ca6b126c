"""Shared pieces of the model tools (convert, merge, resize, extract, inspect): a base model (SD1.x, SD2.x or SDXL)
read tensor by tensor, written tensor by tensor (as a single file in the original SD / SGM layout or as a diffusers
folder); with the LoRA math on file tensors, independent of nn.Modules, that lives in core/deltas.py (its names are
importable from here too).

    model = open_model("v1-5-pruned-emaonly.safetensors")      # or a diffusers folder
    model.entries[("unet", "conv_in.weight")]                   # (shape, dtype), diffusers names
    model.read("unet", "conv_in.weight")                        # one tensor, as stored
    write_single_file("out.safetensors", model, get=model.read, dtype=torch.float16)

No whole model is ever held: each output tensor is produced, written and dropped before the next is read.
"""

import json
import math
import os
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from lora_diffusion.core.deltas import (  # noqa: F401 (the LoRA file math, here since 0.1: core/deltas.py)
    SGM_UNET_NAME,
    ModelToolError,
    bundled_embedding_tensors,
    canonical_modules,
    check_module_fits,
    factored_svd,
    fit,
    is_sdxl_lora,
    lora_file_tensors,
    lowrank_factors,
    module_bias_delta,
    module_delta,
    on_meta,
    read_loras,
)
from lora_diffusion.core.targets import (
    SDXL_TEXT_ENCODER_PREFIXES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    canonical_kohya_name,
    canonical_text_encoder_path,
    kohya_name,
    sdxl_unet_module_name,
)
from lora_diffusion.formats.io import atomic_write
from lora_diffusion.models import (
    ASSETS,
    convert,
    declare_fp32_load,
    empty_modules,
    make_noise_scheduler,
    write_model_index,
)
from lora_diffusion.models.checkpoint import PRECISION_DTYPES, SAFETENSORS_DTYPES, CheckpointReader, release_file_pages
from lora_diffusion.models.sdxl import (
    SDXL_CONFIGS,
    check_sdxl_parts,
    empty_sdxl_modules,
    folder_tokenizers,
    is_sdxl_checkpoint,
    is_sdxl_folder,
    text_encoder_names,
    write_sdxl_model_index,
)
from lora_diffusion.models.tokenizer import load_clip_tokenizer, save_tokenizer

from . import build_folder_atomically, check_output_apart

PARTS = ("unet", "vae", "text_encoder")
SDXL_PARTS = PARTS + ("text_encoder_2",)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def precision(name):
    """'fp16' -> torch.float16; None keeps each tensor's stored dtype."""
    if name is None:
        return None
    if name not in PRECISION_DTYPES:
        raise ModelToolError(f"precision {name!r} is not one of {', '.join(PRECISION_DTYPES)}")
    return PRECISION_DTYPES[name]


def check_output(output, inputs, overwrite=False):
    """The output is never an input (nor inside or around one), and is not replaced unless `overwrite`."""
    output = Path(output).expanduser()
    for source in inputs:
        source = Path(str(source)).expanduser()
        if source.exists() and output.exists() and os.path.samefile(output, source):
            raise ModelToolError(f"output '{output}' is the input '{source}'; choose another output (nothing was "
                                 f"changed)")
        if source.is_dir() or output.is_dir() or output.suffix == "":
            check_output_apart(output, [source] if source.exists() else [])
    if output.exists() and not overwrite:
        raise ModelToolError(f"output '{output}' exists; choose a new path or pass --overwrite")
    return output


# -- reading a base model -------------------------------------------------------------------------------------


class BaseModel:
    """An SD1.x/2.x or SDXL model, a single file or a diffusers folder, seen in diffusers' names:
    `entries` {(part, key): (shape, dtype)}, `read(part, key)`, the parts' configs (SDXL: text_encoder_2 too), and
    for single files the original keys (`original`: {original key: [(part, key, chunk)]}) and the keys that are no
    model weight (`extras`: EMA copies, schedule buffers, SD2's unused last text block)."""

    def __init__(self, path, kind, configs, v2, sdxl=False):
        self.path, self.kind, self.configs, self.v2, self.sdxl = Path(path), kind, configs, v2, sdxl
        self.entries, self.readers, self.original, self.extras = {}, {}, {}, []

    @property
    def parts(self):
        return SDXL_PARTS if self.sdxl else PARTS

    def read(self, part, key):
        reader, name, chunk = self.readers[(part, key)]
        tensor = read_stored(reader, name)
        if chunk is not None:
            tensor = tensor.chunk(3)[chunk].clone()
        if name in convert.TRANSPOSED_KEYS:
            tensor = tensor.T.contiguous()
        return tensor.reshape(self.entries[(part, key)][0])

    def read_original(self, name):
        return read_stored(self.single, name)

    def describe(self):
        family = "SDXL" if self.sdxl else "SD2.x" if self.v2 else "SD1.x"
        return f"{self.path} ({family} {'single file' if self.kind == 'single' else 'diffusers folder'})"


def read_stored(reader, name):
    """One tensor in its stored dtype (CheckpointReader.get casts; this does not)."""
    tensor = reader.file[name]
    if not reader.mapped:
        return tensor
    owned = tensor.clone()
    release_file_pages(tensor)
    return owned


def open_model(path, *, config_dir=None, v2=None):
    """A base model from a diffusers folder or a single .safetensors/.ckpt file; `config_dir` gives a single
    file's configs (unet/, vae/, text_encoder/, SDXL's text_encoder_2/), by default the shipped SD1.x / SD2.x /
    SDXL ones (the family is detected from the keys)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelToolError(f"model '{path}' not found; expected a diffusers folder or a .safetensors/.ckpt file")
    return open_folder(path) if path.is_dir() else open_single_file(path, config_dir, v2)


def diffusers_key(part, key):
    """A weight's key as the tools name it: a text encoder's with its `text_model.` level (transformers 4's)."""
    return canonical_text_encoder_path(key) if part in TEXT_ENCODERS else key


def open_folder(path):

    if not (path / "model_index.json").is_file():
        raise ModelToolError(f"'{path}' is a folder but not a diffusers model (model_index.json is missing)")
    sdxl = is_sdxl_folder(path)
    model = BaseModel(path, "folder", {}, v2=False, sdxl=sdxl)
    for part in model.parts:
        folder = path / part
        files = sorted(folder.glob(f"{WEIGHT_FILES[part]}*.safetensors")) + sorted(folder.glob("*.bin"))
        if not (folder / "config.json").is_file() or not files:
            raise ModelToolError(f"diffusers folder '{path}' has no {part}/config.json with "
                                 f"{WEIGHT_FILES[part]}.safetensors")
        model.configs[part] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        weights = next((f for f in files if f.name == f"{WEIGHT_FILES[part]}.safetensors"), files[0])
        reader = CheckpointReader(weights, torch.float32)
        for name in reader.names:
            if name.endswith("position_ids"):
                continue
            key = diffusers_key(part, name)
            model.entries[(part, key)] = (stored_shape(reader, name), stored_dtype(reader, name))
            model.readers[(part, key)] = (reader, name, None)
    # SD2's OpenCLIP text tower uses gelu where OpenAI's CLIP (SD1) uses quick_gelu; 1024 is SD2's full width
    configs = model.configs
    model.v2 = not sdxl and (configs["unet"].get("cross_attention_dim") == 1024
                             or configs["text_encoder"].get("hidden_act") == "gelu")
    return model


def stored_dtype(reader, name):
    if reader.mapped:
        return reader.file[name].dtype
    return SAFETENSORS_DTYPES[reader.file.entries[name]["dtype"]]


def stored_shape(reader, name):
    return tuple(reader.file[name].shape) if reader.mapped else tuple(reader.file.entries[name]["shape"])


def open_single_file(path, config_dir, v2):

    reader = CheckpointReader(path, torch.float32)
    sdxl = is_sdxl_checkpoint(reader.names)
    if sdxl:
        check_sdxl_parts(path, reader.names)
    else:
        convert.check_is_sd_checkpoint(path, reader.names)
    detected = not sdxl and convert.detect_v2(reader)
    if v2 is not None and bool(v2) != detected:
        family = "SDXL" if sdxl else "SD2.x" if detected else "SD1.x"
        raise ModelToolError(f"{path} holds {family} weights but --v2 was {'given' if v2 else 'set to false'}")
    config_dir = Path(config_dir) if config_dir else SDXL_CONFIGS if sdxl else ASSETS / ("v2" if detected else "v1")
    configs = {part: json.loads((config_dir / part / "config.json").read_text(encoding="utf-8"))
               for part in (SDXL_PARTS if sdxl else PARTS)}
    model = BaseModel(path, "single", configs, detected, sdxl)
    model.single, model.config_dir = reader, config_dir
    maps = {"unet": convert.unet_names(reader.names, configs["unet"]["layers_per_block"]),
            "vae": convert.vae_names(reader.names, len(configs["vae"]["up_block_types"]))}
    if sdxl:  # on the meta device: the expected names and shapes
        text_encoder, text_encoder_2, vae, unet = empty_sdxl_modules(config_dir)
        maps["text_encoder"], maps["text_encoder_2"] = text_encoder_names(reader.names, text_encoder, text_encoder_2)
        modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    else:
        text_encoder, vae, unet = empty_modules(config_dir)
        maps["text_encoder"] = convert.clip_names(reader.names, True, configs["text_encoder"]["num_hidden_layers"])
        modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    expected = {part: {diffusers_key(part, k): v for k, v in module.state_dict().items()
                       if not k.endswith("position_ids")} for part, module in modules.items()}
    mapped = set()
    for part, names in maps.items():
        for original, targets in names.items():
            targets = targets and [(diffusers_key(part, t), c) for t, c in targets]
            if targets is None or any(t not in expected[part] for t, _ in targets):
                model.extras.append(original)
                continue
            mapped.add(original)
            model.original[original] = [(part, t, c) for t, c in targets]
            for target, chunk in targets:
                shape = tuple(expected[part][target].shape)
                stored = stored_shape(reader, original)
                if chunk is not None:
                    stored = (stored[0] // 3,) + stored[1:]
                if math.prod(stored) != math.prod(shape):
                    raise ModelToolError(f"{path}: {original} has shape {stored} but {part} {target} in the configs "
                                         f"of {config_dir} expects {shape}; pass the right --config (or --v2)")
                model.entries[(part, target)] = (shape, stored_dtype(reader, original))
                model.readers[(part, target)] = (reader, original, chunk)
    model.extras += [n for n in reader.names if n not in mapped and n not in model.extras]
    missing = [f"{part}.{k}" for part in model.parts for k in expected[part] if (part, k) not in model.entries]
    if missing:
        raise ModelToolError(f"{path}: {len(missing)} weight(s) of the configs in {config_dir} are not in the file "
                             f"(e.g. {', '.join(missing[:3])}); a model of another architecture? pass its --config")
    return model


# -- writing ----------------------------------------------------------------------------------------------------


def write_safetensors(path, plan, metadata=None, desc=None):
    """Stream tensors into one .safetensors file: `plan` is [(name, shape, dtype, produce)], where produce() returns
    the tensor (of that shape; cast to dtype here). The header is computed from the plan, then each tensor is
    produced, written and dropped: memory holds one tensor at a time. Written atomically."""
    header, offset = {}, 0
    for name, shape, dtype, _ in plan:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def fill(f):
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape, dtype, produce in tqdm(plan, desc=desc or Path(path).name, unit="tensor", leave=False):
            tensor = produce().to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced shape {tuple(tensor.shape)}, planned {tuple(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
            del tensor

    atomic_write(path, fill)
    return Path(path)


def out_dtype(stored, dtype):
    return dtype if dtype is not None and stored.is_floating_point else stored


def single_file_plan(model, get, dtype, keep_extras=False):
    """[(original key, shape, dtype, produce)] of a single file in the original layout, from diffusers names."""
    keys = {part: [k for p, k in model.entries if p == part] for part in model.parts}
    unet_config = model.configs["unet"]
    names = convert.original_names(
        keys["unet"], keys["vae"], keys["text_encoder"], layers_per_block=unet_config["layers_per_block"],
        up_has_attention=["Attn" in t for t in unet_config["up_block_types"]],
        vae_levels=len(model.configs["vae"]["up_block_types"]), open_clip=model.v2,
        text_encoder_2_keys=keys.get("text_encoder_2"))
    plan = []
    for original, targets in names.items():
        shapes = [model.entries[(p, k)][0] for p, k, _ in targets]
        stored = model.entries[targets[0][:2]][1]
        if len(targets) == 1:
            shape = convert.original_shape(original, shapes[0])
            produce = lambda o=original, t=targets[0]: convert.original_tensor(o, get(t[0], t[1]))  # noqa: E731
        else:
            shape = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
            produce = lambda ts=targets: torch.cat([get(p, k) for p, k, _ in ts])  # noqa: E731
        plan.append((original, shape, out_dtype(stored, dtype), produce))
    if keep_extras and model.kind == "single":
        for name in model.extras:
            if not name.startswith("model_ema."):  # EMA copies of the weights would not carry the change
                plan.append((name, stored_shape(model.single, name), stored_dtype(model.single, name),
                             lambda n=name: model.read_original(n)))
    elif not model.v2:
        clip = convert.SDXL_CLIP_L_PREFIX if model.sdxl else convert.CLIP_PREFIX
        plan.append((clip + "text_model.embeddings.position_ids", (1, 77), torch.int64, lambda: torch.arange(77)[None]))
        if model.sdxl:  # OpenCLIP's, unused by SDXL; as Stability's file has it
            plan.append(logit_scale(convert.SDXL_OPEN_CLIP_G_PREFIX, dtype))
    else:
        plan += sd2_placeholders(model, keys["text_encoder"], dtype, get)
    return plan


def logit_scale(prefix, dtype):
    """open_clip's `logit_scale` (ln 100, its trained value), which loaders that build the full tower expect."""
    return prefix + "logit_scale", (), dtype or torch.float32, lambda: torch.tensor(math.log(100.0))


def sd2_placeholders(model, te_keys, dtype, get):
    """SD2 uses the penultimate layer of open_clip's text tower, so diffusers folders lack the last one, and the
    projection. Loaders that build the full tower (A1111, ComfyUI) expect them: as kohya's converter, write the last
    block as a copy of the one before it, and an identity projection. Neither is ever used by SD2."""
    layers = 1 + max(int(k.split(".")[3]) for k in te_keys if k.startswith("text_model.encoder.layers."))
    prefix, plan = convert.OPEN_CLIP_PREFIX, []
    for original, targets in convert.clip_original_names(
            [k for k in te_keys if k.startswith(f"text_model.encoder.layers.{layers - 1}.")], True).items():
        last = original.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")
        shapes = [model.entries[("text_encoder", k)][0] for k, _ in targets]
        shape = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
        stored = model.entries[("text_encoder", targets[0][0])][1]
        plan.append((last, shape, out_dtype(stored, dtype),
                     lambda ts=targets: torch.cat([get("text_encoder", k) for k, _ in ts])))
    width = model.entries[("text_encoder", "text_model.final_layer_norm.weight")][0][0]
    plan.append((prefix + "text_projection", (width, width), dtype or torch.float32, lambda: torch.eye(width)))
    plan.append(logit_scale(prefix, dtype))
    return plan


def write_single_file(path, model, get, dtype=None, keep_extras=False, metadata=None):
    if Path(path).suffix != ".safetensors":
        raise ModelToolError(f"output '{path}': single files are written as .safetensors (never pickled .ckpt)")
    return write_safetensors(path, single_file_plan(model, get, dtype, keep_extras), metadata or {"format": "pt"},
                             desc=f"writing {Path(path).name}")


def write_diffusers_folder(path, model, get, dtype=None, v_parameterization=False):
    """A diffusers folder (configs, weights per part, tokenizer, scheduler, model_index.json), staged next to
    `path` and renamed into place."""

    def fill(folder):
        for part in model.parts:
            (folder / part).mkdir()
            source_config = (model.path if model.kind == "folder" else model.config_dir) / part / "config.json"
            shutil.copyfile(source_config, folder / part / "config.json")
            if part in TEXT_ENCODERS:
                declare_fp32_load(folder / part / "config.json")
            plan = [(key, shape, out_dtype(stored, dtype), lambda p=part, k=key: get(p, k))
                    for (p, key), (shape, stored) in model.entries.items() if p == part]
            write_safetensors(folder / part / f"{WEIGHT_FILES[part]}.safetensors", plan, {"format": "pt"},
                              desc=f"writing {part}")
        if model.kind == "folder":
            for extra in ("tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
                source = model.path / extra
                if source.is_dir():
                    shutil.copytree(source, folder / extra)
                elif source.is_file():
                    shutil.copyfile(source, folder / extra)
            return
        make_noise_scheduler(v_parameterization).save_pretrained(folder / "scheduler")
        if model.sdxl:
            for name, tokenizer in zip(("tokenizer", "tokenizer_2"), folder_tokenizers(model.config_dir)):
                save_tokenizer(tokenizer, folder / name)
            write_sdxl_model_index(folder)
        else:
            save_tokenizer(load_clip_tokenizer(v2=model.v2), folder / "tokenizer")
            write_model_index(folder, "DDPMScheduler")

    build_folder_atomically(path, fill)
    return Path(path)


def write_model(output, model, get, dtype=None, keep_extras=False, v_parameterization=False):
    """A .safetensors output path is a single file in the original layout, anything else a diffusers folder."""
    if Path(output).suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelToolError(f"output '{output}': write .safetensors (pickled checkpoints are not written) or a "
                             f"folder path for a diffusers folder")
    if Path(output).suffix == ".safetensors":
        return write_single_file(output, model, get, dtype, keep_extras)
    return write_diffusers_folder(output, model, get, dtype, v_parameterization)


# -- LoRA math on file tensors ----------------------------------------------------------------------------------


def module_key_name(model, part, key):
    """The kohya module name of a diffusers weight key (`unet`, `down_blocks.0...proj_in.weight`) as kohya writes
    it (an SDXL U-Net's by its original SGM path, SDXL's encoders as lora_te1 / lora_te2), or None."""
    if not key.endswith(".weight") or part == "vae":
        return None
    path = key[: -len(".weight")]
    if part == "unet":
        return sdxl_unet_module_name(model.configs["unet"], path) if model.sdxl else kohya_name(UNET_PREFIX, path)
    prefix = SDXL_TEXT_ENCODER_PREFIXES[TEXT_ENCODERS.index(part)] if model.sdxl else TEXT_ENCODER_PREFIX
    return kohya_name(prefix, path)


def addressable_weights(model):
    """{module name: (part, key)} of every weight a LoRA file can address, by the names read_loras gives
    (canonical_kohya_name's); an SDXL U-Net's also by their diffusers paths, which some exporters write."""
    weights = {}
    for part, key in model.entries:
        name = module_key_name(model, part, key)
        if name:
            weights[canonical_kohya_name(name)] = (part, key)
            if model.sdxl and part == "unet":
                weights.setdefault(kohya_name(UNET_PREFIX, key[: -len(".weight")]), (part, key))
    return weights
