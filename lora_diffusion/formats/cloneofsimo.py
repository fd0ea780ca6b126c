"""cloneofsimo/lora's files, as it writes and reads them (its research API on these files is lora_diffusion.lora):
- `.pt` (save_lora_weight): torch.save of a list [up_0, down_0, up_1, down_1, ...] in fp16, one pair per LoRA in the
  model's module order; up is (out, r) or (out, r, 1, 1), down (r, in) or (r, in, k, k), and the update is up @ down
  (no alpha). `x.text_encoder.pt` (the text encoder's) and `x.ti.pt` ({token: embedding}) sit beside `x.pt`.
- safeloras `.safetensors` (save_safeloras): tensors `<model>:<i>:up` (times the scale) and `<model>:<i>:down` in
  fp16; metadata `<model>` = JSON list of the target class names, `<model>:<i>:rank` = the rank, and
  `<token>` = "<embed>" for each textual-inversion embedding, stored as the tensor `<token>`.

`.pt` files are read with weights_only=True (the original unpickles them); a file that does not fit the model is a
clear error rather than a misplaced LoRA.
"""

import json
import os
import pickle

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lora_diffusion.formats.errors import LoRAFileError
from lora_diffusion.formats.io import refused_pickle_detail

EMBED_FLAG = "<embed>"


def read_pt(path) -> object:
    """torch.load with weights_only=True: tensors, lists and dicts load, pickled code is refused."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoRAFileError(f"LoRA file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = refused_pickle_detail(error)
        if "weights only" in str(error).lower() and "global" in detail.lower():
            raise LoRAFileError(f"{path} is refused for safety: it holds pickled objects other than tensors "
                                f"({detail}), and loading those can run arbitrary code") from None
        raise LoRAFileError(f"{path} could not be read as a .pt file (corrupt, truncated or not a .pt?)") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise LoRAFileError(f"{path} could not be read as a .pt file (corrupt or truncated?): "
                            f"{str(error).splitlines()[0]}") from None


def tensor_list(loras, source: str | None = None) -> tuple[list[torch.Tensor], str]:
    """(the [up, down, ...] list, a name for messages) from a list of tensors or a `.pt` path."""
    if isinstance(loras, (list, tuple)):
        tensors, source = list(loras), source or "the given LoRA list"
    else:
        source = os.fspath(loras)
        tensors = read_pt(source)
    if not isinstance(tensors, list) or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise LoRAFileError(f"{source} does not hold a list of tensors (found {type(tensors).__name__}); expected "
                            "cloneofsimo's [up, down, up, down, ...] list as save_lora_weight writes it")
    if len(tensors) % 2:
        raise LoRAFileError(f"{source} holds {len(tensors)} tensors, expected an even number (up, down pairs)")
    return tensors, source


def check_pairs(tensors: list[torch.Tensor], found: list[tuple[str, nn.Module]], source):
    """Each (up, down) pair fits its module, and there is exactly one pair per module."""
    source = source if isinstance(source, str) else "the given LoRA list"
    if len(tensors) != 2 * len(found):
        raise LoRAFileError(
            f"{source} holds {len(tensors)} tensors, expected {2 * len(found)} (an up and a down for each of the "
            f"{len(found)} modules matched, first {found[0][0] if found else 'none'}); was it saved with another "
            "target_replace_module, or for another model?")
    for i, (path, module) in enumerate(found):
        check_fit(tensors[2 * i], tensors[2 * i + 1], module, path, source)


def check_fit(up: torch.Tensor, down: torch.Tensor, module: nn.Module, path: str, source: str):
    r = down.shape[0] if down.dim() else 0
    if isinstance(module, nn.Conv2d):
        want_up, want_down = (module.out_channels, r, 1, 1), (r, module.in_channels, *module.kernel_size)
    else:
        want_up, want_down = (module.out_features, r), (r, module.in_features)
    if tuple(up.shape) != want_up or tuple(down.shape) != want_down:
        raise LoRAFileError(f"{source}: the pair for {path} has up {tuple(up.shape)} / down {tuple(down.shape)}, "
                            f"expected {want_up} / {want_down} (a LoRA for another model or target set?)")


def open_file(path, device="cpu"):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoRAFileError(f"LoRA file not found: {path}")
    try:
        return safe_open(path, framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise LoRAFileError(f"{path} is not a readable .safetensors file ({e})") from None


def is_safeloras(handle) -> bool:
    metadata = handle.metadata() or {}
    keys = list(handle.keys())
    return bool(keys) and all(key.split(":")[0] in metadata for key in keys)


def parse_safeloras(safeloras, *, source: str = "the safeloras file") -> dict:
    """{model name: ([up_0, down_0, ...] as Parameters, [rank_0, ...], [target class names])} of an open file."""
    metadata = safeloras.metadata() or {}
    grouped: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in safeloras.keys():
        name = key.split(":")[0]
        info = metadata.get(name)
        if info is None:
            raise LoRAFileError(f"{source}: tensor {key!r} has no metadata entry {name!r}; not a cloneofsimo "
                                "safeloras file (kohya-format files load with load_network)")
        if info == EMBED_FLAG:
            continue
        parts = key.split(":")
        if len(parts) != 3 or parts[2] not in ("up", "down") or not parts[1].isdigit():
            raise LoRAFileError(f"{source}: unexpected tensor name {key!r}; expected <model>:<index>:up|down")
        grouped.setdefault(name, {}).setdefault(int(parts[1]), {})[parts[2]] = safeloras.get_tensor(key)
    loras = {}
    for name, pairs in grouped.items():
        if sorted(pairs) != list(range(len(pairs))) or any(len(p) != 2 for p in pairs.values()):
            raise LoRAFileError(f"{source}: the {name} LoRAs are incomplete (each index 0..n-1 needs :up and :down)")
        weights = [nn.Parameter(pairs[i][d]) for i in range(len(pairs)) for d in ("up", "down")]
        ranks = [int(metadata.get(f"{name}:{i}:rank", pairs[i]["down"].shape[0])) for i in range(len(pairs))]
        try:
            target = json.loads(metadata[name])
        except json.JSONDecodeError:
            raise LoRAFileError(f"{source}: metadata {name!r} is {metadata[name]!r}, expected a JSON list of "
                                "class names") from None
        loras[name] = (weights, ranks, target)
    return loras


def parse_safeloras_embeds(safeloras) -> dict[str, torch.Tensor]:
    metadata = safeloras.metadata() or {}
    return {key: safeloras.get_tensor(key) for key in safeloras.keys() if metadata.get(key) == EMBED_FLAG}


def load_safeloras(path, device="cpu"):
    with open_file(path, device) as f:
        return parse_safeloras(f, source=os.fspath(path))


def load_safeloras_embeds(path, device="cpu"):
    with open_file(path, device) as f:
        return parse_safeloras_embeds(f)


def load_safeloras_both(path, device="cpu"):
    with open_file(path, device) as f:
        return parse_safeloras(f, source=os.fspath(path)), parse_safeloras_embeds(f)
