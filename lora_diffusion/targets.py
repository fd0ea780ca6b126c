"""Which modules of a Stable Diffusion U-Net / CLIP text encoder get a LoRA, and their kohya names.

The only place that knows module paths. Modules are selected by structure (an nn.Linear or nn.Conv2d under a parent
at a known path), never by class name alone: diffusers and transformers renamed their classes several times, and a
silent "0 modules injected" is the classic failure.

kohya name = `<prefix>_<module path with "." replaced by "_">`. Text-encoder names are always written in the
transformers-4 layout (`lora_te_text_model_encoder_layers_0_...`); transformers 5 drops the `text_model.` level.
"""

import re
from dataclasses import dataclass

from torch import nn

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
KNOWN_PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")

# kohya "LierLa": every Linear / 1x1 conv inside a Transformer2DModel.
_UNET_TRANSFORMER = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.")
# kohya "C3Lier" adds the ResNet blocks and the up/down-sampler convs.
_UNET_CONV_PARENT = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|downsamplers|upsamplers)\.\d+\.")
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
    A1111 also accept for SD1's only one); all become `lora_te_text_model_encoder_...`."""
    for prefix in ("lora_te1_", "lora_te_"):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return f"{TEXT_ENCODER_PREFIX}_" + (rest if rest.startswith("text_model_") else "text_model_" + rest)
    return name


def _lora_capable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def base_modules(model: nn.Module):
    """named_modules() without the LoRAs already applied to the model (and their own Linear/Conv2d inside)."""
    from .layer import AdapterLayer

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
            targets.append(Target(kohya_name(UNET_PREFIX, path), path, module))
    return targets


def text_encoder_targets(text_encoder: nn.Module, *, prefix: str = TEXT_ENCODER_PREFIX) -> list[Target]:
    """The q/k/v/out projections and both MLP layers of every CLIP encoder layer."""
    targets = []
    for path, module in base_modules(text_encoder):
        if isinstance(module, nn.Linear) and _TEXT_ENCODER.match(path):
            targets.append(Target(kohya_name(prefix, canonical_text_encoder_path(path)), path, module))
    return targets


def all_named_modules(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, Target]:
    """Every Linear/Conv2d of both models by kohya name: what a foreign file may address.

    Text-encoder modules are reachable under every spelling canonical_kohya_name accepts: `lora_te_text_model_...`,
    `lora_te_...`, `lora_te1_text_model_...` and `lora_te1_...`.
    """
    names = {}
    if unet is not None:
        for path, module in base_modules(unet):
            if _lora_capable(module):
                target = Target(kohya_name(UNET_PREFIX, path), path, module)
                names[target.name] = target
    if text_encoder is not None:
        for path, module in base_modules(text_encoder):
            if _lora_capable(module):
                canonical = canonical_text_encoder_path(path)
                target = Target(kohya_name(TEXT_ENCODER_PREFIX, canonical), path, module)
                names[target.name] = target
                short = canonical.removeprefix("text_model.")
                for prefix, rest in (("lora_te", short), ("lora_te1", canonical), ("lora_te1", short)):
                    names.setdefault(kohya_name(prefix, rest), target)
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
