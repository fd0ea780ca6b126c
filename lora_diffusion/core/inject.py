"""cloneofsimo/lora's injection API on top of LoRALayer:

    unet.requires_grad_(False)
    params, names = inject_trainable_lora(unet, r=8)
    optimizer = torch.optim.AdamW(itertools.chain(*params), lr=1e-4)

Each wrapped module gets a LoraInjectedLinear / LoraInjectedConv2d: a LoRALayer with alpha = rank (so alpha / rank
is 1) and cloneofsimo's attribute names, `scale` being the multiplier. Like every LoRALayer it is a child of the
module it wraps, so the model's parameters(), state_dict(), .to() and .eval() include it. Modules are matched by the
class name of an ancestor, with the renames that diffusers and transformers made over the years treated as the same
class. cloneofsimo's file formats and monkeypatch_* functions are in cloneofsimo.py.
"""

import os
import re

import torch
from torch import nn

from lora_diffusion.formats.cloneofsimo import check_pairs, is_safeloras, open_file, parse_safeloras, tensor_list
from lora_diffusion.formats.errors import LoRAFileError

from .adapters import AdapterLayer, LoRALayer, freeze_base
from .network import LoRANetwork
from .targets import TEXT_ENCODER_PREFIX, UNET_PREFIX, canonical_text_encoder_path, kohya_name

DEFAULT_TARGET_REPLACE = {"CrossAttention", "Attention", "GEGLU"}
UNET_DEFAULT_TARGET_REPLACE = DEFAULT_TARGET_REPLACE
UNET_EXTENDED_TARGET_REPLACE = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}
# cloneofsimo's sets: attention only (q, k, v, out); add "CLIPMLP" for the MLP too (kohya's text-encoder targets).
TEXT_ENCODER_DEFAULT_TARGET_REPLACE = {"CLIPAttention"}
TEXT_ENCODER_EXTENDED_TARGET_REPLACE = {"CLIPAttention"}

# Class names that denote the same module across library versions.
_ALIASES = [
    re.compile(r"^(Cross)?Attention$"),
    re.compile(r"^CLIP(Sdpa|Flash|FlashAttention2|Flex)?Attention\d?$"),
]


class _CloneofsimoNames:
    """cloneofsimo's attribute names on a LoRALayer whose alpha equals its rank."""

    @property
    def scale(self) -> float:
        return self.multiplier

    @scale.setter
    def scale(self, value: float):
        self.multiplier = float(value)

    @property
    def r(self) -> int:
        return self.rank

    def realize_as_lora(self):
        """(up * scale, down): the weights whose product is this layer's update."""
        return self.lora_up.weight.data * (self.multiplier * self.scaling), self.lora_down.weight.data


class LoraInjectedLinear(_CloneofsimoNames, LoRALayer):
    """A LoRA on an nn.Linear (`.linear`): base(x) + scale * up(dropout(down(x)))."""

    def __init__(self, base: nn.Linear, r: int = 4, dropout_p: float = 0.0, scale: float = 1.0):
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoraInjectedLinear wraps an nn.Linear, got {type(base).__name__}")
        _check_rank(r, base.in_features, base.out_features)
        super().__init__(base, r, r, multiplier=scale, dropout=dropout_p)
        nn.init.normal_(self.lora_down.weight, std=1 / r)  # cloneofsimo's initialisation

    @property
    def linear(self) -> nn.Linear:
        return self.base


class LoraInjectedConv2d(_CloneofsimoNames, LoRALayer):
    """A LoRA on an nn.Conv2d (`.conv`): down has the base's kernel, stride and padding, up is 1x1."""

    def __init__(self, base: nn.Conv2d, r: int = 4, dropout_p: float = 0.0, scale: float = 1.0):
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoraInjectedConv2d wraps an nn.Conv2d, got {type(base).__name__}")
        _check_rank(r, base.in_channels, base.out_channels)
        super().__init__(base, r, r, multiplier=scale, dropout=dropout_p)
        nn.init.normal_(self.lora_down.weight, std=1 / r)

    @property
    def conv(self) -> nn.Conv2d:
        return self.base


INJECTED = (LoraInjectedLinear, LoraInjectedConv2d)


def _check_rank(r: int, n_in: int, n_out: int):
    if r > min(n_in, n_out):
        raise ValueError(f"LoRA rank {r} must be less or equal than {min(n_in, n_out)} (the module is {n_in} -> "
                         f"{n_out})")


def injected_layer(module: nn.Module, r: int, dropout_p: float = 0.0, scale: float = 1.0) -> LoRALayer:
    cls = LoraInjectedConv2d if isinstance(module, nn.Conv2d) else LoraInjectedLinear
    return cls(module, r, dropout_p, scale)


# -- finding modules ------------------------------------------------------------------------------------------------


def _class_matches(module: nn.Module, names: set[str]) -> bool:
    cls = type(module).__name__
    if cls in names:
        return True
    return any(family.match(cls) and any(family.match(n) for n in names) for family in _ALIASES)


def _descendants(module: nn.Module, path: str):
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        yield child_path, child
        if not isinstance(child, AdapterLayer):  # an adapter's own lora_down / lora_up are not layers of the model
            yield from _descendants(child, child_path)


def find_modules(model: nn.Module, target_replace_module, classes) -> list[tuple[str, nn.Module]]:
    """(path, module) for every instance of `classes` below a module whose class is in `target_replace_module`
    (None: anywhere in the model), once each, in the model's module order (the order of cloneofsimo's files)."""
    if target_replace_module is None:
        ancestors = [("", model)]
    else:
        targets = set(target_replace_module)
        ancestors = [(path, m) for path, m in model.named_modules() if _class_matches(m, targets)]
    found = {}
    for path, ancestor in ancestors:
        for child_path, child in _descendants(ancestor, path):
            if isinstance(child, classes) and id(child) not in found:
                found[id(child)] = (child_path, child)
    return list(found.values())


def _is_text_encoder(model: nn.Module) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return model_type.startswith("clip") or type(model).__name__.startswith("CLIP")


def network_name(model: nn.Module, path: str) -> str:
    """The kohya name of the module at `path` in `model` (the name the LoRANetwork and kohya files use)."""
    if _is_text_encoder(model):
        return kohya_name(TEXT_ENCODER_PREFIX, canonical_text_encoder_path(path))
    return kohya_name(UNET_PREFIX, path)


# -- injecting ------------------------------------------------------------------------------------------------------


def inject_trainable_lora(model: nn.Module, target_replace_module=DEFAULT_TARGET_REPLACE, r: int = 4, loras=None,
                          verbose: bool = False, dropout_p: float = 0.0, scale: float = 1.0):
    """Give every nn.Linear under a module whose class is in `target_replace_module` a trainable LoRA.

    Returns `(params, names)`: `params` a list of lists of Parameters, up then down for each module (pass
    `itertools.chain(*params)` to an optimizer, as often as you like), `names` the wrapped module paths. Afterwards
    only LoRA parameters require grad. `loras` starts from a file: cloneofsimo's `.pt` or safeloras
    `.safetensors`, or a kohya-format `.safetensors`. `lora_network(model)` returns the injected network."""
    return _inject(model, target_replace_module, r, loras, verbose, dropout_p, scale, nn.Linear)


def inject_trainable_lora_extended(model: nn.Module, target_replace_module=UNET_EXTENDED_TARGET_REPLACE,
                                   r: int = 4, loras=None):
    """inject_trainable_lora on the nn.Linear and nn.Conv2d modules (ResNet blocks included by default)."""
    return _inject(model, target_replace_module, r, loras, False, 0.0, 1.0, (nn.Linear, nn.Conv2d))


def _inject(model, target_replace_module, r, loras, verbose, dropout_p, scale, classes):
    found = find_modules(model, target_replace_module, classes)
    if not found:
        kinds = " or ".join(c.__name__ for c in (classes if isinstance(classes, tuple) else (classes,)))
        raise ValueError(f"inject_trainable_lora found no nn.{kinds} under modules of class "
                         f"{sorted(target_replace_module)} in {type(model).__name__}; classes present include "
                         f"{sorted({type(m).__name__ for m in model.modules()})[:20]}")
    tensors = lora_tensor_list(loras, model) if loras is not None else None
    if tensors is not None:
        check_pairs(tensors, found, loras)
    layers, names = {}, []
    for i, (path, module) in enumerate(found):
        rank = r if tensors is None else tensors[2 * i + 1].shape[0]
        layer = injected_layer(module, rank, dropout_p, scale)
        if tensors is not None:
            with torch.no_grad():
                layer.lora_up.weight.copy_(tensors[2 * i])
                layer.lora_down.weight.copy_(tensors[2 * i + 1])
        layers[network_name(model, path)] = layer
        names.append(path)
        if verbose:
            print(f"LoRA r={rank} on {path} ({type(module).__name__} {tuple(module.weight.shape)})")

    network = LoRANetwork(layers, rank=r, alpha=r)
    if loras is not None and tensors is None:
        network.load_weights(loras, strict=False)  # a kohya-format file
    freeze_base(model)
    network.requires_grad_(True)
    network.apply_to()
    register_network(model, network)
    params = []
    for layer in layers.values():
        params += [[layer.lora_up.weight], [layer.lora_down.weight]]
    return params, names


# -- the networks on a model ----------------------------------------------------------------------------------------


def _networks(model: nn.Module) -> list[LoRANetwork]:
    if "_lora_networks" not in model.__dict__:
        object.__setattr__(model, "_lora_networks", [])  # not a submodule: the layers are already in the tree
    return model.__dict__["_lora_networks"]


def register_network(model: nn.Module, network: LoRANetwork):
    """Keep `network` as the model's newest; forget networks whose layers were all removed since."""
    networks = _networks(model)
    networks[:] = [n for n in networks if any(layer.applied for layer in n.layers().values())] + [network]


def lora_network(model: nn.Module) -> LoRANetwork:
    """The network that the last inject_trainable_lora (or monkeypatch_*) call put on this model: save it as a
    kohya file, merge it, change its multiplier or remove it."""
    networks = [n for n in _networks(model) if any(layer.applied for layer in n.layers().values())]
    if not networks:
        raise ValueError(f"no LoRA was injected into this {type(model).__name__}")
    return networks[-1]


def remove_lora(model: nn.Module):
    """Undo every inject_trainable_lora / monkeypatch_* on this model (newest first), unmerging merged ones."""
    networks = _networks(model)
    while networks:
        networks.pop().remove()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """peft's merge_and_unload: bake every LoRA on the model into its weights (at its multiplier) and take the LoRAs
    off; state_dict() keys are the plain model's again. Final: a later network.remove() does not undo it."""
    for layer in [m for m in model.modules() if isinstance(m, AdapterLayer) and m.applied]:
        layer.merge()
        layer.remove()
        layer.merged_multiplier = None
        object.__setattr__(layer, "_merged_delta", None)
    _networks(model).clear()
    return model


def lora_tensor_list(loras, model: nn.Module) -> list[torch.Tensor] | None:
    """What `loras=` of inject_trainable_lora denotes for `model`: the [up, down, ...] list of a `.pt` file, a list
    or a safeloras file ("unet" or "text_encoder" entry), or None for a kohya-format `.safetensors`."""
    if isinstance(loras, (list, tuple)) or not os.fspath(loras).endswith(".safetensors"):
        return tensor_list(loras)[0]
    path = os.fspath(loras)
    with open_file(path) as f:
        if not is_safeloras(f):
            return None
        parsed = parse_safeloras(f, source=path)
    name = "text_encoder" if _is_text_encoder(model) else "unet"
    if name not in parsed and len(parsed) == 1:
        name = next(iter(parsed))
    if name not in parsed:
        raise LoRAFileError(f"{path} holds LoRAs for {sorted(parsed)}, none named {name!r}")
    return [t.detach() for t in parsed[name][0]]
