"""Which modules of a Stable Diffusion U-Net / CLIP text encoder get a LoRA, and their kohya names.

The only place that knows module paths. Modules are selected by structure (an nn.Linear or nn.Conv2d under a parent
at a known path), never by class name alone: diffusers and transformers renamed their classes several times, and a
silent "0 modules injected" is the classic failure.

kohya name = `<prefix>_<module path with "." replaced by "_">`. Text-encoder names are always written in the
transformers-4 layout (`lora_te_text_model_encoder_layers_0_...`); transformers 5 drops the `text_model.` level.

SDXL (a U-Net with `addition_embed_type="text_time"`, two text encoders) is named as kohya's SDXL networks are:
the U-Net by its original (SGM) module paths, which kohya's SDXL U-Net has (`lora_unet_input_blocks_4_1_...` for
diffusers' `down_blocks.1.attentions.0...`), the text encoders `lora_te1_*` and `lora_te2_*`. Files that name the
SDXL U-Net by diffusers paths (`lora_unet_down_blocks_1_...`) are read too.
"""

import re
from dataclasses import dataclass

from torch import nn

from lora_diffusion.models.convert import unet_original_name

from .adapters import AdapterLayer

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
SDXL_TEXT_ENCODER_PREFIXES = ("lora_te1", "lora_te2")
KNOWN_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")

# kohya "LierLa": every Linear / 1x1 conv inside a Transformer2DModel.
_UNET_TRANSFORMER = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.")
# kohya "C3Lier" adds the ResNet blocks and the up/down-sampler convs.
_UNET_CONV_PARENT = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|downsamplers|upsamplers)\.\d+\.")
# LyCORIS' default ("full" preset) also targets these U-Net modules by name.
_LYCORIS_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
_TEXT_ENCODER = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass(frozen=True)
class Target:
    name: str  # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str  # module path inside the model
    module: nn.Module

    @property
    def is_conv_kxk(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and self.module.kernel_size != (1, 1)


def kohya_name(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def canonical_text_encoder_path(path: str) -> str:
    """transformers 5 CLIPTextModel paths lack the `text_model.` level that kohya names carry."""
    if path.startswith(("embeddings.", "encoder.", "final_layer_norm")):
        return "text_model." + path
    return path


def canonical_kohya_name(name: str) -> str:
    """The one spelling of a module name. Text-encoder names come as `lora_te_text_model_encoder_...`, as
    `lora_te_encoder_...` (transformers 5 paths) and as `lora_te1_...` (SDXL's first encoder, which ComfyUI and
    A1111 also accept for SD1's only one); all become `lora_te_text_model_encoder_...`. SDXL's second encoder's
    `lora_te2_encoder_...` becomes `lora_te2_text_model_encoder_...`."""
    for prefix, canonical in (("lora_te1_", TEXT_ENCODER_PREFIX), ("lora_te_", TEXT_ENCODER_PREFIX),
                              ("lora_te2_", "lora_te2")):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return f"{canonical}_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)
    return name


def is_sdxl_unet(unet: nn.Module | None) -> bool:
    """An SDXL U-Net: diffusers' UNet2DConditionModel with the added time/text embeddings."""
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


def text_encoder_list(text_encoder) -> list[tuple[str, nn.Module]]:
    """[(kohya prefix, module)] of what create_network/load_network were given: one text encoder (`lora_te`), or a
    (text_encoder, text_encoder_2) pair for SDXL (`lora_te1`, `lora_te2`); None (or a None in the pair) is left out."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, nn.Module):
        return [(TEXT_ENCODER_PREFIX, text_encoder)]
    encoders = list(text_encoder)
    if len(encoders) == 1:
        return text_encoder_list(encoders[0])
    if len(encoders) != 2 or not all(e is None or isinstance(e, nn.Module) for e in encoders):
        raise TypeError(f"text_encoder must be a module, None, or a (text_encoder, text_encoder_2) pair for SDXL; "
                        f"got {len(encoders)} items of types {[type(e).__name__ for e in encoders]}")
    return [(prefix, e) for prefix, e in zip(SDXL_TEXT_ENCODER_PREFIXES, encoders) if e is not None]


def unet_module_name(unet: nn.Module, path: str) -> str:
    """The kohya name of a U-Net module: its diffusers path, or for SDXL its original (SGM) path, as kohya's SDXL
    U-Net names its modules (modules with no original place keep the diffusers path)."""
    return sdxl_unet_module_name(unet.config, path) if is_sdxl_unet(unet) else kohya_name(UNET_PREFIX, path)


def sdxl_unet_module_name(config, path: str) -> str:
    """kohya's name of an SDXL U-Net module from the U-Net's config (a mapping, as config.json holds it)."""
    original = unet_original_name(path + ".weight", config["layers_per_block"],
                                  ["Attn" in t for t in config["up_block_types"]])
    return kohya_name(UNET_PREFIX, original.removesuffix(".weight") if original else path)


def written_kohya_name(name: str, sdxl: bool) -> str:
    """A canonical name (canonical_kohya_name) as a file spells it: SDXL's first text encoder is kohya's
    `lora_te1_`, SD1.x/2.x's only one `lora_te_`."""
    prefix = TEXT_ENCODER_PREFIX + "_"
    return SDXL_TEXT_ENCODER_PREFIXES[0] + "_" + name[len(prefix):] if sdxl and name.startswith(prefix) else name


def _lora_capable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def _addressable(module: nn.Module) -> bool:
    """What a file's module may name: a Linear/Conv2d, or an affine norm layer (LyCORIS' train_norm)."""
    return _lora_capable(module) or (isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None)


def base_modules(model: nn.Module):
    """named_modules() without the LoRAs already applied to the model (and their own Linear/Conv2d inside)."""
    return model.named_modules(memo={m for layer in model.modules() if isinstance(layer, AdapterLayer)
                                     for m in layer.modules()})


def unet_targets(unet: nn.Module, *, conv: bool = False, lycoris: bool = False) -> list[Target]:
    """kohya's default U-Net targets; with `conv`, also the LoCon ResNet and sampler modules; with `lycoris`, also
    LyCORIS' extra names (conv_in, conv_out, the time embedding's two Linears)."""
    targets = []
    for path, module in base_modules(unet):
        if not _lora_capable(module):
            continue
        in_transformer = _UNET_TRANSFORMER.match(path) and (
            isinstance(module, nn.Linear) or module.kernel_size == (1, 1))
        if in_transformer or (conv and _UNET_CONV_PARENT.match(path)) or (lycoris and path in _LYCORIS_NAMES):
            targets.append(Target(unet_module_name(unet, path), path, module))
    return targets


def unet_norm_targets(unet: nn.Module) -> list[Target]:
    """The affine LayerNorm/GroupNorm layers inside the U-Net's transformer and ResNet blocks: what LyCORIS'
    `train_norm=True` trains (CLIP's attention and MLP blocks, its text-encoder targets, hold no norm layer)."""
    return [Target(unet_module_name(unet, path), path, module) for path, module in base_modules(unet)
            if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and module.weight is not None
            and (_UNET_TRANSFORMER.match(path) or _UNET_CONV_PARENT.match(path))]


def text_encoder_targets(text_encoder: nn.Module, *, prefix: str = TEXT_ENCODER_PREFIX) -> list[Target]:
    """The q/k/v/out projections and both MLP layers of every CLIP encoder layer."""
    targets = []
    for path, module in base_modules(text_encoder):
        if isinstance(module, nn.Linear) and _TEXT_ENCODER.match(path):
            targets.append(Target(kohya_name(prefix, canonical_text_encoder_path(path)), path, module))
    return targets


def all_named_modules(unet: nn.Module | None, text_encoder) -> dict[str, Target]:
    """Every Linear/Conv2d (and affine norm layer) of the models by kohya name: what a foreign file may address.
    `text_encoder` is one module or SDXL's (text_encoder, text_encoder_2) pair (see text_encoder_list).

    Text-encoder modules are reachable under every spelling canonical_kohya_name accepts: `lora_te_text_model_...`,
    `lora_te_...`, `lora_te1_text_model_...` and `lora_te1_...` (SDXL's second encoder: `lora_te2_text_model_...`,
    `lora_te2_...`). An SDXL U-Net's modules are reachable by their original (SGM) and their diffusers paths; the
    Target's name is the one written (kohya's: SGM for SDXL, `lora_te1`/`lora_te2` for the pair).
    """
    names = {}
    if unet is not None:
        for path, module in base_modules(unet):
            if _addressable(module):
                target = Target(unet_module_name(unet, path), path, module)
                names[target.name] = target
                names.setdefault(kohya_name(UNET_PREFIX, path), target)
    for prefix, encoder in text_encoder_list(text_encoder):
        for path, module in base_modules(encoder):
            if _addressable(module):
                canonical = canonical_text_encoder_path(path)
                target = Target(kohya_name(prefix, canonical), path, module)
                names[target.name] = target
                short = canonical.removeprefix("text_model.")
                aliases = ((prefix, short),) if prefix == "lora_te2" else (
                    ("lora_te", canonical), ("lora_te", short), ("lora_te1", canonical), ("lora_te1", short))
                for alias_prefix, rest in aliases:
                    names.setdefault(kohya_name(alias_prefix, rest), target)
    return names


def filter_targets(targets: list[Target], include: list[str] | None = None,
                   exclude: list[str] | None = None) -> list[Target]:
    """Keep targets whose module path or kohya name matches any `include` regex and no `exclude` regex."""
    def matches(target, patterns):
        return any(re.search(p, target.path) or re.search(p, target.name) for p in patterns)

    if include:
        targets = [t for t in targets if matches(t, include)]
    if exclude:
        targets = [t for t in targets if not matches(t, exclude)]
    return targets
