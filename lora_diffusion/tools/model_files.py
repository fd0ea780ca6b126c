"""Shared pieces of the model tools (convert, merge, resize, extract, inspect): a base model (SD1.x, SD2.x or SDXL)
read tensor by tensor, written tensor by tensor (as a single file in the original SD / SGM layout or as a diffusers
folder), and LoRA math on file tensors, independent of nn.Modules.

    model = open_model("v1-5-pruned-emaonly.safetensors")      # or a diffusers folder
    model.entries[("unet", "conv_in.weight")]                   # (shape, dtype), diffusers names
    model.read("unet", "conv_in.weight")                        # one tensor, as stored
    write_single_file("out.safetensors", model, get=model.read, dtype=torch.float16)

No whole model is ever held: each output tensor is produced, written and dropped before the next is read.
"""

import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from lora_diffusion.core import adapters
from lora_diffusion.core.targets import (
    SDXL_TEXT_ENCODER_PREFIXES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    canonical_kohya_name,
    canonical_text_encoder_path,
    kohya_name,
    sdxl_unet_module_name,
    written_kohya_name,
)
from lora_diffusion.formats.io import atomic_write
from lora_diffusion.formats.kohya import EMBEDDING_PREFIX, LoRAFileError, LoRAModules, ModuleWeights, read_lora_file
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


class ModelToolError(ValueError):
    """Bad input to a model tool; the message names the file or option, what was given and what was expected."""


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


SGM_UNET_NAME = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")


def is_sdxl_lora(modules, metadata):
    """Whether a LoRA file is for SDXL: a second text encoder's module (lora_te2_), a U-Net module by its SGM path
    (as kohya names SDXL's only), or SDXL in the metadata (kohya's ss_base_model_version, ModelSpec's)."""
    return (any(n.startswith("lora_te2_") or SGM_UNET_NAME.match(n) for n in modules)
            or metadata.get("ss_base_model_version", "").startswith("sdxl")
            or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-xl"))


def module_delta(weights: ModuleWeights, base: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
    """The update of one file module's base weight as an fp32 matrix [out, in * kh * kw] (reshape it to the base
    weight's shape), times `multiplier`, computed by the module's algorithm (adapters.ALGORITHMS: each knows its
    update, file_delta). iA3's and GLoRA's update is a function of the base weight, and DoRA's too (and not linear
    in the multiplier): pass `base` for them."""
    cls = adapters.ALGORITHMS[weights.algo]
    if base is None and (cls.delta_depends_on_base or weights.dora_scale is not None):
        what = "a DoRA" if weights.dora_scale is not None else f"an {cls.label}" if cls.label[0] in "iA" else \
            f"a {cls.label}"
        raise ModelToolError(f"{what} module's update depends on the base weight; module_delta needs `base`")
    delta = cls.file_delta(weights.module_tensors, weights.scale, base)
    delta = delta.reshape(delta.shape[0], -1)
    if weights.dora_scale is None:
        return delta * multiplier
    return adapters.DoRA.file_delta(base.float(), delta, weights.dora_scale, multiplier)


def module_bias_delta(weights: ModuleWeights, multiplier: float = 1.0) -> torch.Tensor | None:
    """The update of the base module's bias (norm layers: b_norm), times `multiplier`; None for the others."""
    delta = adapters.ALGORITHMS[weights.algo].file_bias_delta(weights.module_tensors)
    return None if delta is None else delta * multiplier


def on_meta(weights: ModuleWeights) -> ModuleWeights:
    """The file module with its tensors on the meta device (shapes only): its update's shape costs no arithmetic.
    Scalars (alpha) stay real."""
    def meta(t):
        return None if t is None else t if t.dim() == 0 else t.to("meta")

    return replace(weights, down=meta(weights.down), up=meta(weights.up), dora_scale=meta(weights.dora_scale),
                   tensors={k: meta(v) for k, v in weights.tensors.items()})


def check_module_fits(weights: ModuleWeights, shape, name, source):
    """ModelToolError unless the file module's update fits a base weight of `shape` (computed on the meta device:
    no arithmetic)."""
    try:
        delta = module_delta(on_meta(weights), base=torch.empty(shape, device="meta"))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ModelToolError(f"{source}: module {name} ({weights.label}) does not fit the base weight "
                             f"{tuple(shape)} ({e}); a LoRA for another model family?") from None
    if delta.shape[0] != shape[0] or delta.numel() != math.prod(shape):
        raise ModelToolError(f"{source}: module {name} is [out {delta.shape[0]}, in {delta.shape[1]}] but the base "
                             f"weight is {tuple(shape)}; a LoRA for another model family?")


def fit(delta, shape, name, source):
    if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
        raise ModelToolError(f"{source}: module {name} makes a {tuple(delta.shape)} update but the base weight is "
                             f"{tuple(shape)}; a LoRA for another model family (SD1.x, SD2.x, SDXL)?")
    return delta.reshape(shape)


def canonical_modules(modules):
    return LoRAModules({canonical_kohya_name(name): weights for name, weights in modules.items()},
                       embeddings=getattr(modules, "embeddings", None))


def bundled_embedding_tensors(files, dtype, embeddings_from=None):
    """The `bundle_emb.<token>.*` tensors of the files' bundled embeddings (A1111's pivotal-tuning vectors), for a
    LoRA file made from them, floats cast to `dtype` (as network.save_weights does). A token that two files bundle
    with different vectors is refused, unless `embeddings_from` names the input whose vectors to keep."""
    if embeddings_from is not None and not any(Path(p) == Path(embeddings_from) for p, _, _, _ in files):
        raise ModelToolError(f"--embeddings_from {embeddings_from}: not one of the --lora files")
    kept = {}  # token -> (path, {key: tensor})
    for path, _, modules, _ in files:
        for token, parts in modules.embeddings.items():
            if token in kept:
                first, theirs = kept[token]
                if theirs.keys() == parts.keys() and all(torch.equal(theirs[k], parts[k]) for k in parts):
                    continue
                if embeddings_from is None:
                    raise ModelToolError(
                        f"{first} and {path} both bundle an embedding for the token {token!r}, with different "
                        f"vectors; a LoRA file holds one per token: pass --embeddings_from with the file whose "
                        f"vectors to keep")
                if Path(path) != Path(embeddings_from):
                    continue
            kept[token] = (path, parts)
    return {f"{EMBEDDING_PREFIX}{token}.{key}": (t.to(dtype) if t.is_floating_point() else t).contiguous()
            for token, (_, parts) in sorted(kept.items()) for key, t in sorted(parts.items())}


def lowrank_factors(matrix, rank):
    """The best rank-`rank` approximation of a matrix (Eckart-Young): up = U_r S_r, down = V_r^T, and the singular
    values. Full SVD in fp32."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    rank = max(1, min(rank, len(s)))
    return u[:, :rank] * s[:rank], vh[:rank], s


def factored_svd(up, down):
    """SVD of up @ down ([out, r] @ [r, n]) without forming the product: QR of both factors, then the SVD of an
    r x r core. Exact (not an approximation), and r x r work instead of out x n."""
    q1, r1 = torch.linalg.qr(up.float())
    q2, r2 = torch.linalg.qr(down.float().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, (q2 @ vh.T).T


def lora_file_tensors(modules, shapes, dtype=torch.float16, sdxl=False):
    """Kohya file tensors from {name: (up [out, r], down [r, n], scale)}, `shapes[name]` the base weight's shape
    (to shape conv factors), the names spelled as files have them (`sdxl`: SDXL's, see written_kohya_name). One
    alpha for the whole file (the most common rank, so most modules have scale 1): each module's own scale is
    folded into lora_up, which leaves scale * up @ down unchanged."""
    ranks = [down.shape[0] for _, down, _ in modules.values()]
    alpha = float(Counter(ranks).most_common(1)[0][0]) if ranks else 1.0
    tensors = {}
    for name, (up, down, scale) in sorted(modules.items()):
        rank, shape = down.shape[0], shapes[name]
        up = up.float() * (scale * rank / alpha)
        if len(shape) == 4:
            down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
        name = written_kohya_name(name, sdxl)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors, alpha


def read_loras(specs):
    """[(path, ratio)] from `path` or `path:ratio` strings, with each file's modules (canonical names)."""
    loaded = []
    for spec in specs:
        path, ratio = spec, 1.0
        head, sep, tail = str(spec).rpartition(":")
        if sep and head and not Path(spec).exists():
            try:
                path, ratio = head, float(tail)
            except ValueError:
                raise ModelToolError(f"--lora {spec!r}: the ratio after ':' must be a number") from None
        if not math.isfinite(ratio):
            raise ModelToolError(f"--lora {spec!r}: the ratio must be finite")
        try:
            modules, metadata = read_lora_file(path, warn_embeddings=False)
        except LoRAFileError as e:
            raise ModelToolError(str(e)) from None
        loaded.append((path, ratio, canonical_modules(modules), metadata))
    return loaded
