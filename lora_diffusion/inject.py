"""cloneofsimo/lora's research API on top of LoRALayer:

    unet.requires_grad_(False)
    params, names = inject_trainable_lora(unet, r=8)
    optimizer = torch.optim.AdamW(itertools.chain(*params), lr=1e-4)

Modules are matched by their class name (the parents whose Linear children get a LoRA), with the renames that
diffusers and transformers made over the years treated as the same class.
"""

import re

from torch import nn

from .layer import LoRALayer
from .network import LoRANetwork
from .targets import TEXT_ENCODER_PREFIX, UNET_PREFIX, canonical_text_encoder_path, kohya_name

DEFAULT_TARGET_REPLACE = {"CrossAttention", "Attention", "GEGLU"}
UNET_DEFAULT_TARGET_REPLACE = DEFAULT_TARGET_REPLACE
TEXT_ENCODER_DEFAULT_TARGET_REPLACE = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"}
UNET_EXTENDED_TARGET_REPLACE = {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}

# Class names that denote the same module across library versions.
_ALIASES = [
    re.compile(r"^(Cross)?Attention$"),
    re.compile(r"^CLIP(Sdpa|Flash|FlashAttention2|Flex)?Attention\d?$"),
]


def _class_matches(module: nn.Module, names: set[str]) -> bool:
    cls = type(module).__name__
    if cls in names:
        return True
    return any(family.match(cls) and any(family.match(n) for n in names) for family in _ALIASES)


def _is_text_encoder(model: nn.Module) -> bool:
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return model_type.startswith("clip") or type(model).__name__.startswith("CLIP")


def inject_trainable_lora(model: nn.Module, target_replace_module=DEFAULT_TARGET_REPLACE, r: int = 4,
                          loras: str | None = None, verbose: bool = False, dropout_p: float = 0.0,
                          scale: float = 1.0):
    """Wrap every nn.Linear under a module whose class is in `target_replace_module` with a trainable LoRALayer.

    Returns `(params, names)`: `params` a list of lists of Parameters (pass `itertools.chain(*params)` to an
    optimizer, as often as you like), `names` the wrapped module paths. Afterwards only LoRA parameters require
    grad. `loras` is a kohya-format .safetensors to start from. The network is kept on the model:
    `lora_network(model)` returns it (to save, merge, change the multiplier or remove it)."""
    targets = set(target_replace_module)
    prefix = TEXT_ENCODER_PREFIX if _is_text_encoder(model) else UNET_PREFIX
    layers, seen = {}, set()
    for parent_path, parent in model.named_modules():
        if not _class_matches(parent, targets):
            continue
        for child_path, child in parent.named_modules(prefix=parent_path):
            if not isinstance(child, nn.Linear) or id(child) in seen:
                continue
            seen.add(id(child))
            path = canonical_text_encoder_path(child_path) if prefix == TEXT_ENCODER_PREFIX else child_path
            layers[kohya_name(prefix, path)] = (child_path, LoRALayer(child, r, r, multiplier=scale,
                                                                      dropout=dropout_p))
            if verbose:
                print(f"LoRA r={r} on {child_path} ({child.in_features} -> {child.out_features})")
    if not layers:
        raise ValueError(f"inject_trainable_lora found no nn.Linear under modules of class {sorted(targets)} in "
                         f"{type(model).__name__}; classes present include "
                         f"{sorted({type(m).__name__ for m in model.modules()})[:20]}")

    network = LoRANetwork({name: layer for name, (_, layer) in layers.items()}, rank=r, alpha=r)
    if loras is not None:
        network.load_weights(loras, strict=False)
    model.requires_grad_(False)
    network.requires_grad_(True)
    network.apply_to()
    _networks(model).append(network)

    params = []
    for _, layer in layers.values():
        params.append(list(layer.lora_up.parameters()))
        params.append(list(layer.lora_down.parameters()))
    return params, [path for path, _ in layers.values()]


def _networks(model: nn.Module) -> list[LoRANetwork]:
    if "_lora_networks" not in model.__dict__:
        object.__setattr__(model, "_lora_networks", [])
    return model.__dict__["_lora_networks"]


def lora_network(model: nn.Module) -> LoRANetwork:
    """The network that the last inject_trainable_lora call put on this model."""
    networks = _networks(model)
    if not networks:
        raise ValueError(f"no LoRA was injected into this {type(model).__name__}")
    return networks[-1]


def remove_lora(model: nn.Module):
    """Undo every inject_trainable_lora on this model (newest first)."""
    networks = _networks(model)
    while networks:
        networks.pop().remove()
