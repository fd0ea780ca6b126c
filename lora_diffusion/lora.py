"""cloneofsimo/lora's research API at its module path (`from lora_diffusion.lora import monkeypatch_lora`), on the
LoraInjectedLinear / LoraInjectedConv2d of lora_diffusion/core/inject.py; its files (`.pt` lists, safeloras) are read
and checked in lora_diffusion/formats/cloneofsimo.py.

Where the original had bugs, this one differs: `.pt` files are read with weights_only=True; `loras=` of
inject_trainable_lora works; a file that does not fit the model is a clear error rather than a misplaced LoRA;
monkeypatched LoRAs have no dropout and follow the model's train/eval mode; collapse_lora marks the LoRA merged, so
it is not added a second time before monkeypatch_remove_lora; patch_pipe skips a missing `.text_encoder.pt`/`.ti.pt`.
"""

import json
import logging
import os

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lora_diffusion.core.adapters import LoRALayer
from lora_diffusion.core.inject import (
    DEFAULT_TARGET_REPLACE,
    INJECTED,
    TEXT_ENCODER_DEFAULT_TARGET_REPLACE,
    TEXT_ENCODER_EXTENDED_TARGET_REPLACE,
    UNET_DEFAULT_TARGET_REPLACE,
    UNET_EXTENDED_TARGET_REPLACE,
    LoraInjectedConv2d,
    LoraInjectedLinear,
    _networks,
    find_modules,
    inject_trainable_lora,
    inject_trainable_lora_extended,
    injected_layer,
    lora_network,
    lora_tensor_list,  # noqa: F401  (lora_diffusion.cloneofsimo.lora_tensor_list of 0.1.0)
    merge_and_unload,
    network_name,
    register_network,
    remove_lora,
)
from lora_diffusion.core.network import LoRANetwork
from lora_diffusion.formats.cloneofsimo import (
    EMBED_FLAG,
    check_fit,
    check_pairs,
    load_safeloras,
    load_safeloras_both,
    load_safeloras_embeds,
    parse_safeloras,
    parse_safeloras_embeds,
    read_pt,
    tensor_list,
)
from lora_diffusion.formats.errors import LoRAFileError
from lora_diffusion.formats.io import atomic_write

logger = logging.getLogger(__name__)
safetensors_available = True

__all__ = [
    "LoraInjectedLinear", "LoraInjectedConv2d", "inject_trainable_lora", "inject_trainable_lora_extended",
    "extract_lora_ups_down", "extract_lora_as_tensor", "save_lora_weight", "monkeypatch_lora",
    "monkeypatch_or_replace_lora", "monkeypatch_or_replace_lora_extended", "monkeypatch_remove_lora",
    "monkeypatch_add_lora", "tune_lora_scale", "collapse_lora", "save_safeloras", "save_safeloras_with_embeds",
    "parse_safeloras", "parse_safeloras_embeds", "load_safeloras", "load_safeloras_embeds", "load_safeloras_both",
    "monkeypatch_or_replace_safeloras", "apply_learned_embed_in_clip", "load_learned_embed_in_clip", "patch_pipe",
    "inspect_lora", "save_all", "lora_network", "remove_lora", "merge_and_unload", "EMBED_FLAG",
    "safetensors_available",
    "DEFAULT_TARGET_REPLACE", "UNET_DEFAULT_TARGET_REPLACE", "UNET_EXTENDED_TARGET_REPLACE",
    "TEXT_ENCODER_DEFAULT_TARGET_REPLACE", "TEXT_ENCODER_EXTENDED_TARGET_REPLACE",
]

# -- putting LoRAs from files on a model ----------------------------------------------------------------------------


def _place(model: nn.Module, pairs: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]):
    """Replace the LoraInjected* LoRAs of each module with one holding (up, down); the rank comes from the tensors."""
    layers = {}
    for path, module, up, down in pairs:
        for old in [m for m in module.children() if isinstance(m, INJECTED)]:
            old.remove()
        layer = injected_layer(module, down.shape[0])
        with torch.no_grad():
            layer.lora_up.weight.copy_(up)
            layer.lora_down.weight.copy_(down)
        layers[network_name(model, path)] = layer.train(module.training).apply_to()
    if layers:
        rank = max(layer.rank for layer in layers.values())
        register_network(model, LoRANetwork(layers, rank=rank, alpha=rank))


def monkeypatch_or_replace_lora(model, loras, target_replace_module=DEFAULT_TARGET_REPLACE, r=4):
    """Put the LoRAs of a `.pt` list (or path) on the nn.Linear modules under `target_replace_module`, replacing
    LoRAs already there. The ranks come from the tensors; `r` is accepted for compatibility."""
    tensors, source = tensor_list(loras)
    found = find_modules(model, target_replace_module, nn.Linear)
    check_pairs(tensors, found, source)
    _place(model, [(path, m, tensors[2 * i], tensors[2 * i + 1]) for i, (path, m) in enumerate(found)])


def monkeypatch_lora(model, loras, target_replace_module=DEFAULT_TARGET_REPLACE, r=4):
    """cloneofsimo's older name: on a model without LoRA, the same as monkeypatch_or_replace_lora."""
    monkeypatch_or_replace_lora(model, loras, target_replace_module, r)


def monkeypatch_or_replace_lora_extended(model, loras, target_replace_module=DEFAULT_TARGET_REPLACE, r=4):
    """As monkeypatch_or_replace_lora over nn.Linear and nn.Conv2d modules. As in cloneofsimo, a module whose kind
    does not match the next pair (2-D for Linear, 4-D for Conv2d) has no LoRA in the file and is skipped."""
    tensors, source = tensor_list(loras)
    pairs, i = [], 0
    for path, module in find_modules(model, target_replace_module, (nn.Linear, nn.Conv2d)):
        if i == len(tensors):
            break
        if tensors[i].dim() != (4 if isinstance(module, nn.Conv2d) else 2):
            continue
        check_fit(tensors[i], tensors[i + 1], module, path, source)
        pairs.append((path, module, tensors[i], tensors[i + 1]))
        i += 2
    if i != len(tensors):
        raise LoRAFileError(f"{source}: {(len(tensors) - i) // 2} of its {len(tensors) // 2} LoRAs found no module "
                            f"under {sorted(target_replace_module)} in {type(model).__name__}")
    _place(model, pairs)


def monkeypatch_or_replace_safeloras(models, safeloras):
    """Put each model's LoRAs of a safeloras file (a path, an open safe_open handle or load_safeloras' result) on
    `getattr(models, name)`, e.g. a pipeline's `unet` and `text_encoder`."""
    if isinstance(safeloras, dict):
        loras = safeloras
    elif isinstance(safeloras, (str, os.PathLike)):
        loras = load_safeloras(safeloras)
    else:
        loras = parse_safeloras(safeloras)
    for name, (weights, ranks, target) in loras.items():
        model = getattr(models, name, None)
        if model is None:
            logger.warning("no model %r to patch; its LoRA in the file is skipped", name)
            continue
        monkeypatch_or_replace_lora_extended(model, weights, target, ranks)


def monkeypatch_remove_lora(model):
    """Take every LoraInjected* LoRA off the model. What collapse_lora baked into the weights stays there."""
    for layer in [m for m in model.modules() if isinstance(m, INJECTED)]:
        layer.remove()
        layer.merged_multiplier = None  # collapsed weights are the model's now: a later unmerge must not undo them
    networks = _networks(model)
    networks[:] = [n for n in networks if any(layer.applied for layer in n.layers().values())]


def monkeypatch_add_lora(model, loras, target_replace_module=DEFAULT_TARGET_REPLACE, alpha: float = 1.0,
                         beta: float = 1.0):
    """cloneofsimo's LoRA mix: for each LoraInjectedLinear, up = alpha * up_file + beta * up and likewise down."""
    tensors, source = tensor_list(loras)
    found = find_modules(model, target_replace_module, LoraInjectedLinear)
    check_pairs(tensors, [(path, layer.base) for path, layer in found], source)
    with torch.no_grad():
        for i, (_, layer) in enumerate(found):
            for weight, new in ((layer.lora_up.weight, tensors[2 * i]), (layer.lora_down.weight, tensors[2 * i + 1])):
                if new.shape != weight.shape:
                    raise LoRAFileError(f"{source}: rank {new.shape} differs from the injected {tuple(weight.shape)}")
                weight.copy_(new.to(weight) * alpha + weight * beta)


def tune_lora_scale(model, alpha: float = 1.0):
    """Set the multiplier (cloneofsimo's `scale`) of every LoRA in the model."""
    for module in model.modules():
        if isinstance(module, LoRALayer):
            module.multiplier = float(alpha)


@torch.no_grad()
def collapse_lora(model, alpha: float = 1.0):
    """Add alpha * up @ down of every LoraInjected* LoRA into its module's weight, and mark the LoRA merged (its
    branch stops adding); monkeypatch_remove_lora then leaves the collapsed weights."""
    for layer in [m for m in model.modules() if isinstance(m, INJECTED) and m.applied]:
        layer.unmerge()
        layer._add_to_base(layer.delta_weight() * alpha)
        layer.merged_multiplier = float(alpha)


def _lora_layers(model, target_replace_module) -> list[LoRALayer]:
    layers = [m for _, m in find_modules(model, target_replace_module, LoRALayer)]
    if not layers:
        raise ValueError(f"No lora injected: no LoRA under modules of class {sorted(target_replace_module)} in "
                         f"{type(model).__name__}")
    return layers


def extract_lora_ups_down(model, target_replace_module=DEFAULT_TARGET_REPLACE):
    """[(lora_up, lora_down)] modules of the LoRAs under `target_replace_module`, in module order."""
    return [(layer.lora_up, layer.lora_down) for layer in _lora_layers(model, target_replace_module)]


def extract_lora_as_tensor(model, target_replace_module=DEFAULT_TARGET_REPLACE, as_fp16=True):
    """[(up * scale, down)] tensors, the form safeloras files hold."""
    pairs = []
    for layer in _lora_layers(model, target_replace_module):
        up = layer.lora_up.weight.detach() * (layer.multiplier * layer.scaling)
        down = layer.lora_down.weight.detach()
        pairs.append((up.half(), down.half()) if as_fp16 else (up, down))
    return pairs


def save_lora_weight(model, path="./lora.pt", target_replace_module=DEFAULT_TARGET_REPLACE):
    """cloneofsimo's `.pt`: [up, down, ...] in fp16, module order; a LoRA's alpha / rank is folded into up."""
    weights = []
    for layer in _lora_layers(model, target_replace_module):
        weights.append((layer.lora_up.weight.detach().float() * layer.scaling).cpu().half())
        weights.append(layer.lora_down.weight.detach().cpu().half())
    atomic_write(path, lambda f: torch.save(weights, f))


def save_safeloras_with_embeds(modelmap=None, embeds=None, outpath="./lora.safetensors"):
    """One safeloras file for several models: modelmap = {"unet": (unet, target_replace_module), ...}, embeds =
    {token: embedding} for textual-inversion tokens."""
    weights, metadata = {}, {}
    for name, (model, target_replace_module) in (modelmap or {}).items():
        metadata[name] = json.dumps(list(target_replace_module))
        for i, (up, down) in enumerate(extract_lora_as_tensor(model, target_replace_module)):
            metadata[f"{name}:{i}:rank"] = str(down.shape[0])
            weights[f"{name}:{i}:up"] = up.cpu().contiguous()
            weights[f"{name}:{i}:down"] = down.cpu().contiguous()
    for token, tensor in (embeds or {}).items():
        metadata[token] = EMBED_FLAG
        weights[token] = tensor.detach().cpu().contiguous()
    atomic_write(outpath, lambda f: f.write(safetensors_bytes(weights, metadata)))


def save_safeloras(modelmap=None, outpath="./lora.safetensors"):
    save_safeloras_with_embeds(modelmap=modelmap, outpath=outpath)


def apply_learned_embed_in_clip(learned_embeds, text_encoder, tokenizer, token=None, idempotent=False):
    """Add each {token: embedding} to the tokenizer and the text encoder's embedding table; returns the (last)
    token. `token` renames: a string for a one-entry dict, or a list in the dict's order. A token the tokenizer
    already has is overwritten when `idempotent`, else added as `<tok-1>`, `<tok-2>`, ..."""
    if isinstance(token, str):
        if token in learned_embeds:
            items = [(token, learned_embeds[token])]
        elif len(learned_embeds) == 1:
            items = [(token, next(iter(learned_embeds.values())))]
        else:
            raise KeyError(f"token {token!r} is not among the learned embeddings {sorted(learned_embeds)}")
    elif isinstance(token, (list, tuple)):
        if len(token) != len(learned_embeds):
            raise ValueError(f"{len(token)} tokens given for {len(learned_embeds)} learned embeddings")
        items = list(zip(token, learned_embeds.values()))
    else:
        items = list(learned_embeds.items())
    table = text_encoder.get_input_embeddings()
    for name, embedding in items:
        if embedding.numel() != table.weight.shape[1]:
            raise ValueError(f"the embedding for {name!r} has shape {tuple(embedding.shape)}, expected "
                             f"({table.weight.shape[1]},) for this text encoder")
        added, base, n = tokenizer.add_tokens(name), name, 0
        while added == 0 and not idempotent:
            n += 1
            name = f"{base[:-1]}-{n}>" if base.endswith(">") else f"{base}-{n}"
            added = tokenizer.add_tokens(name)
        if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:
            try:
                text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            except TypeError:  # transformers before 4.46
                text_encoder.resize_token_embeddings(len(tokenizer))
        table = text_encoder.get_input_embeddings()
        with torch.no_grad():
            table.weight[tokenizer.convert_tokens_to_ids(name)] = embedding.reshape(-1).to(table.weight)
        token = name
    return token


def load_learned_embed_in_clip(learned_embeds_path, text_encoder, tokenizer, token=None, idempotent=False):
    embeds = read_pt(learned_embeds_path)
    if not isinstance(embeds, dict):
        raise LoRAFileError(f"{learned_embeds_path} holds a {type(embeds).__name__}, expected {{token: embedding}}")
    return apply_learned_embed_in_clip(embeds, text_encoder, tokenizer, token, idempotent)


def _text_lora_path(path: str) -> str:
    if not path.endswith(".pt"):
        raise ValueError(f"expected a .pt path, got {path}")
    return path[:-3] + ".text_encoder.pt"


def _ti_lora_path(path: str) -> str:
    if not path.endswith(".pt"):
        raise ValueError(f"expected a .pt path, got {path}")
    return path[:-3] + ".ti.pt"


def patch_pipe(pipe, maybe_unet_path, token=None, r: int = 4, patch_unet=True, patch_text=True, patch_ti=True,
               idempotent_token=True, unet_target_replace_module=DEFAULT_TARGET_REPLACE,
               text_target_replace_module=TEXT_ENCODER_DEFAULT_TARGET_REPLACE):
    """Put a cloneofsimo LoRA on a diffusers pipeline: `x.pt` (with `x.text_encoder.pt` and `x.ti.pt` beside it;
    any of the three may be given) or a safeloras `x.safetensors`. Returns the {token: embedding} it held."""
    path = os.fspath(maybe_unet_path)
    if path.endswith(".pt"):
        for suffix in (".ti.pt", ".text_encoder.pt"):
            if path.endswith(suffix):
                path = path[:-len(suffix)] + ".pt"
        text_path, ti_path = _text_lora_path(path), _ti_lora_path(path)
        if patch_unet:
            monkeypatch_or_replace_lora(pipe.unet, read_pt(path), unet_target_replace_module, r)
        if patch_text and os.path.isfile(text_path):
            monkeypatch_or_replace_lora(pipe.text_encoder, read_pt(text_path), text_target_replace_module, r)
        elif patch_text:
            logger.warning("no %s: the text encoder is not patched", text_path)
        embeds = {}
        if patch_ti and os.path.isfile(ti_path):
            embeds = read_pt(ti_path)
            apply_learned_embed_in_clip(embeds, pipe.text_encoder, pipe.tokenizer, token, idempotent_token)
        return embeds
    if path.endswith(".safetensors"):
        loras, embeds = load_safeloras_both(path)
        wanted = {"unet": patch_unet, "text_encoder": patch_text}
        monkeypatch_or_replace_safeloras(pipe, {k: v for k, v in loras.items() if wanted.get(k, True)})
        if patch_ti and embeds:
            apply_learned_embed_in_clip(embeds, pipe.text_encoder, pipe.tokenizer, token, idempotent_token)
        return embeds
    raise ValueError(f"patch_pipe reads cloneofsimo's .pt or safeloras .safetensors files, got {path}")


@torch.no_grad()
def inspect_lora(model) -> dict[str, list[float]]:
    """{LoRA path: [mean |up @ down|]}: how far each LoRA has moved."""
    return {name: [(m.lora_up.weight.flatten(1) @ m.lora_down.weight.flatten(1)).float().abs().mean().item()]
            for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def save_all(unet, text_encoder, save_path, placeholder_token_ids=None, placeholder_tokens=None, save_lora=True,
             save_ti=True, target_replace_module_text=TEXT_ENCODER_DEFAULT_TARGET_REPLACE,
             target_replace_module_unet=DEFAULT_TARGET_REPLACE, safe_form=True):
    """cloneofsimo's end-of-training save: a safeloras file, or `x.pt` + `x.text_encoder.pt` + `x.ti.pt`."""
    embeds = {}
    if save_ti:
        table = text_encoder.get_input_embeddings().weight
        embeds = {tok: table[i].detach().cpu() for tok, i in zip(placeholder_tokens, placeholder_token_ids)}
    if safe_form:
        if not save_path.endswith(".safetensors"):
            raise ValueError(f"save_all with safe_form=True writes a .safetensors file, got {save_path}")
        modelmap = {"unet": (unet, target_replace_module_unet),
                    "text_encoder": (text_encoder, target_replace_module_text)} if save_lora else {}
        save_safeloras_with_embeds(modelmap, embeds, save_path)
        return
    if save_ti:
        atomic_write(_ti_lora_path(save_path), lambda f: torch.save(embeds, f))
    if save_lora:
        save_lora_weight(unet, save_path, target_replace_module=target_replace_module_unet)
        save_lora_weight(text_encoder, _text_lora_path(save_path), target_replace_module=target_replace_module_text)
