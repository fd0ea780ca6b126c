"""LoRANetwork: the set of LoRALayers over a U-Net and a text encoder, and the two ways to make one.

    network = create_network(unet, text_encoder, rank=16, alpha=8)       # new, trainable, applied
    network = load_network("x.safetensors", unet, text_encoder)           # from any kohya-format file

Its state_dict is the kohya file's tensors (module names are the kohya names), so saving is a dtype cast. A network
can also carry new tokens' embeddings (TokenEmbeddings, pivotal tuning), saved in the file the way AUTOMATIC1111
reads bundled embeddings: `bundle_emb.<token>.string_to_param.*` [vectors, dim], on SDXL `bundle_emb.<token>.clip_l`
and `.clip_g` (one per text encoder).
"""

import functools
import json
import os
import re
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from lora_diffusion.formats.io import atomic_write

from . import adapters, kohya
from .adapters import AdapterLayer, LoRALayer, blocks, freeze_base
from .adapters.base import shapes as _shapes
from .spec import NetworkSpec
from .targets import (
    SDXL_TEXT_ENCODER_PREFIXES,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    Target,
    all_named_modules,
    canonical_kohya_name,
    filter_targets,
    is_sdxl_unet,
    text_encoder_list,
    text_encoder_targets,
    unet_norm_targets,
    unet_targets,
)


class LoRANetwork(nn.Module):
    """`network_module` is what the file's ss_network_module says: networks.lora (kohya) or lycoris.kohya."""

    def __init__(self, layers: dict[str, AdapterLayer], *, rank: int, alpha: float, network_args: dict | None = None,
                 network_module: str = "networks.lora", sdxl: bool = False):
        super().__init__()
        self.sdxl = sdxl  # describes the base model in the saved file's metadata
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.rank = rank
        self.alpha = alpha
        self.network_args = dict(network_args or {})
        self.network_module = network_module
        self.block_lr_weights: list[float] | None = None  # kohya's down/mid/up_lr_weight, one per U-Net block
        self.loraplus_ratios: dict[str, float] = {}  # LoRA+: "unet" / "text_encoder" -> lr ratio of lora_up

    # -- the layers ---------------------------------------------------------------------------------------------

    def layers(self) -> dict[str, AdapterLayer]:
        return {n: m for n, m in self.named_children() if isinstance(m, AdapterLayer)}

    @property
    def unet_layers(self) -> list[AdapterLayer]:
        return [m for n, m in self.layers().items() if n.startswith(UNET_PREFIX + "_")]

    @property
    def text_encoder_layers(self) -> list[AdapterLayer]:
        return self.text_encoder_layers_of(TEXT_ENCODER_PREFIX)

    def text_encoder_layers_of(self, prefix: str) -> list[AdapterLayer]:
        """The layers whose names start with `prefix`: lora_te (every text encoder's), lora_te1, lora_te2."""
        return [m for n, m in self.layers().items() if n.startswith(prefix)]

    def apply_to(self) -> "LoRANetwork":
        for layer in self.layers().values():
            layer.apply_to()
        return self

    def remove(self):
        """Restore every wrapped module exactly as it was (unmerging first if merged). Added tokens stay in the
        tokenizer, but their embeddings are no longer read."""
        for layer in reversed(list(self.layers().values())):
            layer.unmerge()
            layer.remove()
        for embedding in self.embeddings.values():
            embedding.remove()

    def set_multiplier(self, multiplier: float):
        for layer in self.layers().values():
            if layer.merged:
                raise RuntimeError("unmerge() before changing the multiplier of a merged network")
            layer.multiplier = multiplier

    @contextmanager
    def bypassed(self):
        """The base model alone for the calls inside (peft's disable_adapter): every layer adds nothing, whatever
        its multiplier or variant (a DoRA layer at multiplier 0 still computes W + dW in LyCORIS' formula, so a
        multiplier of 0 is not the base model). A new token's vectors stay in the text encoder's table."""
        layers = list(self.layers().values())
        if any(layer.merged for layer in layers):
            raise RuntimeError("unmerge() before bypassing a merged network: its update is in the base weights")
        before = [layer.bypassed for layer in layers]
        for layer in layers:
            layer.bypassed = True
        try:
            yield self
        finally:
            for layer, was in zip(layers, before):
                layer.bypassed = was

    def merge(self):
        """Bake multiplier * delta into the base weights; the LoRA branch then costs nothing at inference."""
        for layer in self.layers().values():
            layer.merge()

    def unmerge(self):
        for layer in self.layers().values():
            layer.unmerge()

    @property
    def embeddings(self) -> dict[str, "TokenEmbeddings"]:
        """token -> the new tokens' embeddings this network carries (pivotal tuning); state_dict keys
        `bundle_emb.<token>.weight` (SDXL: `.clip_l`, `.clip_g`)."""
        return self._modules.get("bundle_emb", {})

    def add_embedding(self, embedding: "TokenEmbeddings") -> "TokenEmbeddings":
        """Carry (train, save, resume) a new token's embedding with this network."""
        if "bundle_emb" not in self._modules:  # only then: code that reads children() as LoRALayers keeps working
            self.add_module("bundle_emb", nn.ModuleDict())
        self._modules["bundle_emb"][embedding.name] = embedding
        return embedding

    def expand_prompt(self, text: str) -> str:
        """A prompt with each multi-vector token written out as its tokens (`sks` -> `sks sks_1`)."""
        for embedding in self.embeddings.values():
            text = embedding.expand(text)
        return text

    # -- training -----------------------------------------------------------------------------------------------

    def param_groups(self, *, unet_lr: float | None = None, text_encoder_lr=None,
                     default_lr: float | None = None, embedding_lr: float | None = None) -> list[dict]:
        """Optimizer parameter groups: one for the U-Net LoRA, one for the text encoder's, one for the new tokens'
        embeddings, each with its own lr. A part whose lr is 0 is left out (frozen), as in kohya. On SDXL,
        `text_encoder_lr` may be a pair (TE1's, TE2's): then each encoder's LoRA is a group of its own
        ("text_encoder", "text_encoder_2")."""
        if isinstance(text_encoder_lr, (list, tuple)):
            if len(text_encoder_lr) != 2 or not self.sdxl:
                raise ValueError(f"text_encoder_lr {list(text_encoder_lr)}: a pair (TE1, TE2) is for an SDXL network "
                                 f"(two text encoders); give one number")
            encoders = [("text_encoder", self.text_encoder_layers_of(SDXL_TEXT_ENCODER_PREFIXES[0]),
                         text_encoder_lr[0]),
                        ("text_encoder_2", self.text_encoder_layers_of(SDXL_TEXT_ENCODER_PREFIXES[1]),
                         text_encoder_lr[1])]
        else:
            encoders = [("text_encoder", self.text_encoder_layers, text_encoder_lr)]
        groups = []
        for name, layers, lr in (("unet", self.unet_layers, unet_lr), *encoders,
                                 ("embeddings", list(self.embeddings.values()), embedding_lr)):
            lr = default_lr if lr is None else lr
            ratio = self.loraplus_ratios.get("unet" if name == "unet" else "text_encoder") \
                if name != "embeddings" else None
            parts = [(name, layers, lr)]
            if name == "unet" and self.block_lr_weights is not None:
                parts = self._block_parts(layers, lr)
            for part, part_layers, part_lr in parts:
                groups += _lora_groups(part, part_layers, part_lr, ratio)
        return groups

    def _block_parts(self, layers: list[AdapterLayer], lr: float | None) -> list[tuple[str, list, float]]:
        """kohya's block-wise lr: the U-Net's layers by block (in the order they come), each at lr x its weight."""
        if lr is None:
            raise ValueError("block-wise learning rates (down/mid/up_lr_weight) multiply a learning rate: pass "
                             "unet_lr= or default_lr= to param_groups")
        names = {id(layer): name for name, layer in self.layers().items()}
        by_block: dict[int | None, list] = {}
        for layer in layers:
            by_block.setdefault(blocks.block_index(names[id(layer)], self.sdxl), []).append(layer)
        return [(f"unet_block{i}" if i is not None else "unet", block_layers,
                 lr * (self.block_lr_weights[i] if i is not None else 1.0)) for i, block_layers in by_block.items()]

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[int, float, float]:
        """kohya's --scale_weight_norms (networks.lora apply_max_norm_regularization), after an optimizer step: per
        module, the Frobenius norm of its update dW (alpha / r included, multiplier not); where it exceeds `max_norm`
        the module's factors are scaled so that it is `max_norm` (LoRA: up and down each by sqrt(ratio), as kohya;
        LoHa/LoKr: each of their n tensors by ratio^(1/n)). iA3 modules are left alone (LyCORIS has no max norm for
        them). Returns (modules scaled, mean and max of the norms after scaling, over all modules it applies to),
        kohya's three numbers (LyCORIS returns 0, 0, 0 when nothing was scaled). One device sync in all."""
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a number > 0 (kohya's --scale_weight_norms, e.g. 1.0), got "
                             f"{max_norm!r}")
        scaled, norms = [], []
        for name, layer in self.layers().items():
            factors = layer.max_norm_factors()
            if factors is None:
                continue
            if layer.merged:
                raise RuntimeError(f"apply_max_norm on a merged network ({name}): unmerge() first")
            norm = layer.delta_weight().norm()
            ratio = torch.clamp(max_norm / norm, max=1.0)  # 1 when the norm is within max_norm (or 0)
            for factor in factors:
                factor.mul_((ratio ** (1.0 / len(factors))).to(factor.dtype))
            norms.append(norm * ratio)
            scaled.append(ratio < 1)
        if not norms:
            return 0, 0.0, 0.0
        device = norms[0].device
        norms = torch.stack([n.to(device) for n in norms])
        count = torch.stack([s.to(device) for s in scaled]).sum()
        return int(count), float(norms.mean()), float(norms.max())

    def set_trainable(self, unet: bool = True, text_encoder: bool = True):
        for layer in self.unet_layers:
            layer.requires_grad_(unet)
        for layer in self.text_encoder_layers:
            layer.requires_grad_(text_encoder)

    # -- files --------------------------------------------------------------------------------------------------

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors of the kohya file, each module's by its algorithm (adapters/), with ONE alpha for all plain
        LoRA modules.

        diffusers applies the file's most common alpha to every module, so a LoRA module whose alpha differs from
        the network's (LoCon convs with their own conv_alpha, or a loaded file with mixed alphas) has its scale
        folded into lora_up: up * (alpha_m / alpha), which leaves alpha_m / r_m * up @ down unchanged. LoHa, LoKr
        and DoRA modules keep their own alpha, as LyCORIS writes them; iA3 has none."""
        tensors = {}
        file_alpha = float(self.alpha)
        for name, layer in self.layers().items():
            save_dtype = dtype or next(layer.parameters()).dtype
            for key, tensor in layer.file_tensors(save_dtype, file_alpha).items():
                tensors[f"{name}.{key}"] = tensor
            if layer.variant is not None:
                for key, tensor in layer.variant.file_tensors(layer, save_dtype).items():
                    tensors[f"{name}.{key}"] = tensor
        for name, embedding in self.embeddings.items():
            for key, vectors in embedding.file_tensors(bundled=True).items():
                tensors[f"{kohya.EMBEDDING_PREFIX}{name}.{key}"] = vectors.to(dtype or vectors.dtype)
        return tensors

    def save_weights(self, path: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None, *,
                     output_name: str | None = None, **base_model):
        """Write a kohya-format .safetensors (atomically) that diffusers, ComfyUI, A1111 and kohya load unchanged.

        `base_model` describes what it was trained on (`v2`, `v_parameterization`, `sdxl`, `resolution`; SD1.x
        512 px by default, SDXL 1024 px for a network on SDXL models), `output_name` defaults to the file's stem;
        `metadata` adds to / overrides the network keys."""
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            raise ValueError(f"save_weights writes .safetensors files, got {path}")
        base_model.setdefault("sdxl", self.sdxl)
        full = kohya.network_metadata(rank=self.rank, alpha=self.alpha, network_args=self.network_args,
                                      network_module=self.network_module,
                                      output_name=output_name or os.path.splitext(os.path.basename(path))[0],
                                      **base_model)
        full.update(metadata or {})
        kohya.write_lora_file(path, self.file_tensors(dtype), full)

    def load_weights(self, path: str, strict: bool = True):
        """Load a kohya file into this network's existing modules (shapes must match), e.g. to start training from
        it. strict=False loads the modules both have, but at least one must match. Bundled embeddings of this
        network's tokens are loaded too."""
        modules, _ = kohya.read_lora_file(path, warn_embeddings=False)
        bundled = modules.embeddings
        modules = {canonical_kohya_name(name): weights for name, weights in modules.items()}
        own = self.layers()
        missing = sorted(set(own) - set(modules))
        unexpected = sorted(set(modules) - set(own))
        shared = set(own) & set(modules)
        if (strict and (missing or unexpected)) or not shared:
            raise kohya.LoRAFileError(
                f"{path} does not match this network: missing {_preview(missing)}, unexpected {_preview(unexpected)}")
        for name in shared:
            _copy_into(own[name], modules[name], name, path)
        for name, embedding in self.embeddings.items():
            if name in bundled:
                embedding.load_vectors(bundled_vectors(bundled[name], name, path), path)


def _lora_groups(name: str, layers: list, lr: float | None, ratio: float | None) -> list[dict]:
    """One optimizer group of these layers' parameters, or two with LoRA+ (`ratio`): the `lora_up` weights at
    lr x ratio in `<name>_plus` (kohya's and LyCORIS' rule: parameters named lora_up; LoHa/LoKr/iA3 have none). A
    group whose lr is 0 is left out."""
    plain, plus = [], []
    for layer in layers:
        for param_name, p in layer.named_parameters():
            (plus if ratio is not None and "lora_up" in param_name else plain).append(p)
    if plus and lr is None:
        raise ValueError(f"LoRA+ (loraplus_*lr_ratio) multiplies a learning rate: pass {name}'s lr or default_lr= to "
                         f"param_groups")
    groups = []
    for group_name, params, group_lr in ((name, plain, lr), (f"{name}_plus", plus, lr * ratio if plus else None)):
        if not params or group_lr == 0:
            continue
        group = {"params": params, "name": group_name}
        if group_lr is not None:
            group["lr"] = group_lr
        groups.append(group)
    return groups


def _preview(names: list[str], n: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _copy_into(layer: AdapterLayer, weights: kohya.ModuleWeights, name: str, source: str):
    """Copy file tensors into a layer of the same algorithm, folding the file's alpha into lora_up (LoRA) when the
    layer's alpha differs."""
    variant = layer.variant
    if (layer.file_algo or layer.kind) != weights.algo or (variant is None) != (weights.dora_scale is None):
        raise kohya.LoRAFileError(f"{source}: {name} is a {weights.label} module in the file, a "
                                  f"{'' if variant is None else variant.label + ' '}{layer.label} one in this "
                                  f"network (a network made with other options?)")
    layer.load_file(weights, f"{source}: {name}")
    if variant is not None:
        variant.load_file(layer, weights.dora_scale, f"{source}: {name}")


def layer_from_file(module: nn.Module, weights: kohya.ModuleWeights, name: str, source,
                    multiplier: float = 1.0) -> AdapterLayer:
    """A layer of the file module's algorithm (adapters.ALGORITHMS: LoRA, LoHa, LoKr, iA3; DoRA or not) around
    `module`, holding its tensors."""
    try:
        layer = adapters.ALGORITHMS[weights.algo].from_file(module, weights, multiplier=multiplier,
                                                            source=f"{source}: {name}")
    except (ValueError, TypeError) as e:
        raise kohya.LoRAFileError(f"{source}: {name} cannot be placed on {type(module).__name__}: {e}") from None
    _copy_into(layer, weights, name, source)
    return layer


# -- making networks ----------------------------------------------------------------------------------------------


ALGOS = tuple(adapters.algo_names())  # lora, loha, lokr, ia3, locon (= lora)


def create_network(unet: nn.Module | None, text_encoder, rank: int = 4, alpha: float = 1.0,
                   conv_rank: int | None = None, conv_alpha: float | None = None, *, spec: NetworkSpec | None = None,
                   **options) -> LoRANetwork:
    """Inject and activate LoRA on kohya's default targets (SD1.5: 192 U-Net + 72 text-encoder modules; SDXL, with
    `text_encoder=(text_encoder, text_encoder_2)`: 722 U-Net + 72 `lora_te1` + 192 `lora_te2` modules). The given
    models are frozen except for adapters (freeze_base): only the new layers (and adapters already there) train.
    The options are NetworkSpec's fields, as keywords or as `spec=NetworkSpec(...)`.

    `conv_rank` adds LoCon on the ResNet and sampler convs (3x3 convs at conv_rank/conv_alpha; the other modules of
    those blocks at rank/alpha, as kohya). `include`/`exclude` are regexes over module paths or kohya names;
    `train_unet=False` / `train_text_encoder=False` make a U-Net-only or text-encoder-only network.

    `algo` (adapters.ALGORITHMS: "lora"/"locon", "loha", "lokr", "ia3") makes a LyCORIS network (ss_network_module
    lycoris.kohya) as `lycoris.kohya.create_network` does: its targets (kohya's with the convs, plus conv_in,
    conv_out and the time embedding), convs always (conv_rank defaults to rank, conv_alpha to alpha), and its
    options: `dora_wd` (DoRA), `use_tucker` (Tucker form of kxk convs, LoHa/LoKr), `factor`, `decompose_both`,
    `full_matrix` (LoKr), `wd_on_output` (DoRA's magnitude per output row, True: LyCORIS' default and the DoRA
    authors'; False: per input column, dora_scale [1, in(, 1, 1)], the only kind ComfyUI's loader applies as
    trained, see docs/format.md), `train_on_input` (iA3: scale the input channels, not the output ones),
    `train_norm` (also train the U-Net blocks' LayerNorm/GroupNorm weights and biases, adapters.NormLayer),
    `use_scalar` and `rank_dropout_scale` (LoRA, LoHa, LoKr; see AdapterLayer), `bypass_mode` (accepted and
    recorded: LyCORIS' other way to compute the same outputs; the forward here is already the input-side one for
    LoRA). An algorithm takes the options it declares (`OPTIONS`) and ignores the others, as LyCORIS does; `dropout`
    applies to LoRA only (LyCORIS has none for LoHa/LoKr; iA3 refuses it).

    kohya networks.lora's network options, in kohya's `--network_args` string forms or as lists (adapters/blocks.py):
    `block_dims`/`block_alphas` (rank/alpha per U-Net block, 25 values on SD1.x/2.x, 23 on SDXL),
    `conv_block_dims`/`conv_block_alphas` (the same for kxk convs), `down_lr_weight`/`mid_lr_weight`/
    `up_lr_weight` ("1,1,0.5,..." or "sine+.5"-style presets) and `block_lr_zero_threshold` (block lr weights,
    applied by param_groups; blocks at weight 0 get no module). LoRA+: `loraplus_lr_ratio`,
    `loraplus_unet_lr_ratio`, `loraplus_text_encoder_lr_ratio` (lora_up weights train at lr x ratio, in
    param_groups; with LyCORIS algorithms too, as LyCORIS).

    DyLoRA: `algo="dylora", block_size=4` (LyCORIS', 4 by default) or, without algo, `dylora_unit=1` (kohya's
    networks.dylora's `unit`, its targets and ss_network_module); the rank must be a multiple of the block size.
    Its files are LoRA files."""
    encoders = text_encoder_list(text_encoder)
    if unet is None and not encoders:
        raise ValueError("create_network needs a unet, a text_encoder, or both")
    if spec is None:
        spec = NetworkSpec.of(rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha, **options)
    elif options or (rank, alpha, conv_rank, conv_alpha) != (4, 1.0, None, None):
        raise TypeError("create_network: pass the options either as keywords or as spec=, not both")
    spec = spec.resolved()
    sdxl = is_sdxl(unet, encoders)
    lr_weights = per_block = None
    if spec.blockwise:
        lr_weights = blocks.parse_lr_weights(spec.down_lr_weight, spec.mid_lr_weight, spec.up_lr_weight,
                                             float(spec.block_lr_zero_threshold or 0.0), sdxl=sdxl)
        per_block = blocks.block_ranks(sdxl, spec.rank, spec.alpha, spec.conv_rank, spec.conv_alpha,
                                       block_dims=spec.block_dims, block_alphas=spec.block_alphas,
                                       conv_block_dims=spec.conv_block_dims, conv_block_alphas=spec.conv_block_alphas,
                                       lr_weights=lr_weights)
    train_unet = unet is not None and spec.train_unet
    targets: list[Target] = []
    if train_unet:
        convs = bool(spec.conv_rank) or (per_block is not None and per_block[2] is not None)
        targets += unet_targets(unet, conv=convs, lycoris=spec.lycoris)
    if spec.train_text_encoder:
        for prefix, encoder in encoders:
            targets += text_encoder_targets(encoder, prefix=prefix)
    targets = filter_targets(targets, spec.include, spec.exclude)
    if not targets:
        raise ValueError("create_network matched no module: check the models and the include/exclude patterns")

    cls, own = spec.layer_class, spec.layer_options()
    layers = {}
    for target in targets:
        r, a = (spec.conv_rank, spec.conv_alpha) if target.is_conv_kxk else (spec.rank, spec.alpha)
        if per_block is not None and target.name.startswith(UNET_PREFIX + "_"):
            r, a = _block_rank(per_block, target, sdxl, r, a)
            if not r:
                continue  # kohya: rank 0, or a block whose lr weight is 0, has no module
        layers[target.name] = cls(target.module, r, a, multiplier=spec.multiplier, rank_dropout=spec.rank_dropout,
                                  module_dropout=spec.module_dropout, dora_wd=spec.variant or False, **own)
    if spec.train_norm and train_unet:
        for target in filter_targets(unet_norm_targets(unet), spec.include, spec.exclude):
            layers[target.name] = adapters.NormLayer(target.module, multiplier=spec.multiplier,
                                                     module_dropout=spec.module_dropout)
    for model in (unet, *(encoder for _, encoder in encoders)):
        if model is not None:
            freeze_base(model)  # only the adapters train (as inject_trainable_lora and peft)
    if not layers:
        raise ValueError("create_network made no module: every target's block has rank 0 (block_dims) or lr weight 0")
    network = LoRANetwork(layers, rank=spec.rank, alpha=spec.alpha, network_args=spec.network_args(
        block_lr_weights=lr_weights), network_module=spec.network_module, sdxl=sdxl)
    network.block_lr_weights = lr_weights
    network.loraplus_ratios = spec.loraplus_ratios()
    return network.apply_to()


def _block_rank(per_block, target: Target, sdxl: bool, rank, alpha):
    """kohya's rank and alpha of a U-Net module from the per-block lists (Linear and 1x1 convs: block_dims; kxk
    convs: conv_block_dims, none without them)."""
    index = blocks.block_index(target.name, sdxl)
    if index is None:
        return rank, alpha
    dims, alphas, conv_dims, conv_alphas = per_block
    if target.is_conv_kxk:
        return (conv_dims[index], conv_alphas[index]) if conv_dims is not None else (0, 0)
    return dims[index], alphas[index]


def is_sdxl(unet: nn.Module | None, encoders: list[tuple[str, nn.Module]]) -> bool:
    return is_sdxl_unet(unet) or any(prefix == "lora_te2" for prefix, _ in encoders) or \
        [p for p, _ in encoders] == ["lora_te1"]


def load_network(path: str, unet: nn.Module | None, text_encoder,
                 multiplier: float = 1.0, *, tokenizer=None) -> LoRANetwork:
    """Build and apply LoRA modules for exactly the names in a kohya-format file (ours, kohya sd-scripts',
    LyCORIS plain LoRA/LoCon, OneTrainer, diffusers' kohya export); rank per module from the shapes.

    Embeddings bundled in the file (A1111's `bundle_emb.*`) are added to `tokenizer` and `text_encoder` when both
    are given (`network.embeddings`; use `network.expand_prompt` for multi-vector tokens), else left out with a
    warning. `network.bundled_embeddings` holds them as {token: [vectors, dim]} (SDXL: {token: {"clip_l": ...,
    "clip_g": ...}}) either way. For SDXL pass `text_encoder=(text_encoder, text_encoder_2)` and
    `tokenizer=(tokenizer, tokenizer_2)`: an embedding goes into both."""
    modules, metadata = kohya.read_lora_file(path, warn_embeddings=False)
    encoders = text_encoder_list(text_encoder)
    available = all_named_modules(unet, text_encoder)
    unplaced = sorted(name for name in modules if name not in available)
    if unplaced:
        hint = ""
        if any(n.startswith("lora_te2_") for n in unplaced) and len(encoders) < 2:
            hint = " (an SDXL file: pass text_encoder=(text_encoder, text_encoder_2) and an SDXL U-Net)"
        elif unet is None or text_encoder is None:
            hint = " (a model was passed as None)"
        raise kohya.LoRAFileError(f"{path}: {len(unplaced)} module(s) match nothing in the given models{hint}: "
                                  f"{_preview(unplaced)}")
    layers = {}
    for name, weights in modules.items():
        target = available[name]
        if target.name in layers:  # read_lora_file refuses two text-encoder spellings; SGM and diffusers U-Net too
            raise kohya.LoRAFileError(f"{path}: {name} and another key name the same module {target.path} "
                                      f"({target.name}); a file may hold each module once")
        layers[target.name] = layer_from_file(target.module, weights, name, path, multiplier)
    rank = _metadata_number(metadata, "ss_network_dim", int) or max(w.rank for w in modules.values())
    alpha = _metadata_number(metadata, "ss_network_alpha", float) or _most_common_alpha(modules)
    try:
        args = json.loads(metadata.get("ss_network_args", "{}")) or {}
    except json.JSONDecodeError:
        args = {}
    module = metadata.get("ss_network_module") or (
        "networks.lora" if all(w.label in ("LoRA", "LoCon") for w in modules.values()) else "lycoris.kohya")
    network = LoRANetwork(layers, rank=rank, alpha=alpha, network_args=args, network_module=module,
                          sdxl=is_sdxl(unet, encoders)).apply_to()
    network.bundled_embeddings = {name: bundled_vectors(parts, name, path)
                                  for name, parts in modules.embeddings.items()}
    if network.bundled_embeddings and (tokenizer is None or not encoders):
        names = ", ".join(repr(n) for n in sorted(network.bundled_embeddings))
        warnings.warn(f"{path}: the bundled embedding(s) {names} were not loaded (pass tokenizer= and text_encoder= "
                      f"to load_network to add them); the LoRA was, and the trigger words are read as plain text",
                      kohya.LoRAFileWarning, stacklevel=2)
    elif network.bundled_embeddings:
        for name, vectors in network.bundled_embeddings.items():
            network.add_embedding(TokenEmbeddings(name, vectors).apply_to(tokenizer, text_encoder))
    return network


def dim_from_weights(path: str, unet: nn.Module | None, text_encoder, *, multiplier: float = 1.0,
                     dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0) -> LoRANetwork:
    """kohya's --dim_from_weights (networks.lora create_network_from_weights): a new, trainable network with exactly
    the modules of a LoRA file, each with the file's rank and alpha, freshly initialised (up = 0: it changes
    nothing); the models are frozen as in create_network. Load the file's weights into it with
    `network.load_weights(path)` (--network_weights). Plain LoRA/LoCon files only, as kohya's networks.lora."""
    modules, metadata = kohya.read_lora_file(path, warn_embeddings=False)
    other = sorted({w.label for w in modules.values()} - {"LoRA", "LoCon"})
    if other:
        raise kohya.LoRAFileError(f"{path} holds {', '.join(other)} modules; dim_from_weights takes the ranks of a "
                                  f"plain LoRA/LoCon file (kohya networks.lora)")
    available = all_named_modules(unet, text_encoder)
    unplaced = sorted(name for name in modules if name not in available)
    if unplaced:
        raise kohya.LoRAFileError(f"{path}: {len(unplaced)} module(s) match nothing in the given models: "
                                  f"{_preview(unplaced)}")
    encoders = text_encoder_list(text_encoder)
    layers = {}
    for name, weights in modules.items():
        target = available[name]
        layers[target.name] = LoRALayer(target.module, weights.rank, weights.alpha, multiplier=multiplier,
                                        dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
    for model in (unet, *(encoder for _, encoder in encoders)):
        if model is not None:
            freeze_base(model)
    rank = _metadata_number(metadata, "ss_network_dim", int) or max(w.rank for w in modules.values())
    alpha = _metadata_number(metadata, "ss_network_alpha", float) or _most_common_alpha(modules)
    return LoRANetwork(layers, rank=rank, alpha=alpha, sdxl=is_sdxl(unet, encoders)).apply_to()


def merge_base_weights(paths, unet: nn.Module | None, text_encoder, multipliers=None) -> None:
    """kohya's --base_weights / --base_weights_multiplier: add each LoRA file's update (any algorithm this library
    reads) into the models' weights for good, at its multiplier (missing multipliers are 1, as kohya), before
    training a new network on top. The models keep no trace of the files (no hooks, no `.lora` children)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    multipliers = list(multipliers or [])
    if len(multipliers) > len(paths):
        raise ValueError(f"multipliers {multipliers}: {len(multipliers)} values for {len(paths)} base weight file(s)")
    for i, path in enumerate(paths):
        multiplier = float(multipliers[i]) if i < len(multipliers) else 1.0
        network = load_network(path, unet, text_encoder, multiplier=multiplier)
        for layer in network.layers().values():
            layer.merge()
            layer.remove()
            layer.merged_multiplier = None  # final: nothing to unmerge later
            object.__setattr__(layer, "_merged_delta", None)


def bundled_vectors(parts: dict[str, torch.Tensor], name: str, source) -> torch.Tensor | dict[str, torch.Tensor]:
    """The [vectors, dim] tensor of one bundled embedding (A1111's `string_to_param.*`, or its only tensor), or an
    SDXL embedding's {"clip_l": ..., "clip_g": ...}."""
    if sorted(parts) == sorted(SDXL_EMBEDDING_KEYS):
        return {key: bundled_vectors({key: parts[key]}, name, source) for key in SDXL_EMBEDDING_KEYS}
    tensor = parts.get("string_to_param.*")
    if tensor is None and len(parts) == 1:
        tensor = next(iter(parts.values()))
    if tensor is None or tensor.dim() not in (1, 2) or not tensor.is_floating_point():
        raise kohya.LoRAFileError(f"{source}: the bundled embedding {name!r} has keys {sorted(parts)}; expected "
                                  f"bundle_emb.{name}.string_to_param.* holding [vectors, dim], or SDXL's "
                                  f"bundle_emb.{name}.clip_l and .clip_g")
    if not torch.isfinite(tensor).all():
        raise kohya.LoRAFileError(f"{source}: the bundled embedding {name!r} holds NaN or infinite values")
    return tensor.reshape(-1, tensor.shape[-1]).float()


# -- new tokens (textual inversion / pivotal tuning) ---------------------------------------------------------------


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # kohya's sdxl_train_textual_inversion, A1111, ComfyUI, OneTrainer


def embedding_slots(tokenizer, text_encoder) -> list[tuple[str, object, nn.Module]]:
    """(the vectors' name, tokenizer, text encoder) for each encoder a new token goes into: SD1.x/2.x's one
    (`weight`), or SDXL's two (`clip_l`: CLIP ViT-L, `clip_g`: OpenCLIP bigG)."""
    if isinstance(text_encoder, nn.Module):
        return [("weight", tokenizer, text_encoder)]
    encoders = list(text_encoder or ())
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    if len(encoders) != 2 or len(tokenizers) != 2 or any(x is None for x in encoders + tokenizers):
        raise ValueError("a new token on SDXL goes into both text encoders: pass text_encoder=(text_encoder, "
                         "text_encoder_2) and tokenizer=(tokenizer, tokenizer_2)")
    return list(zip(SDXL_EMBEDDING_KEYS, tokenizers, encoders))


class TokenEmbeddings(nn.Module):
    """The embedding vectors of one new token: `name` for one vector, `name name_1 ...` for several (the names
    diffusers' load_textual_inversion gives them), in every text encoder: `weight` [vectors, dim] on SD1.x/2.x,
    `clip_l` and `clip_g` on SDXL (see embedding_slots). `apply_to` adds the tokens to each tokenizer and a forward
    hook on each text encoder's token-embedding table that reads the new ids' rows from the vectors (fp32,
    trainable): the rest of the vocabulary is never written, and no optimizer sees it."""

    def __init__(self, name: str, vectors: torch.Tensor | dict[str, torch.Tensor]):
        super().__init__()
        self.name = name
        for key, tensor in (vectors if isinstance(vectors, dict) else {"weight": vectors}).items():
            self.register_parameter(key, nn.Parameter(tensor.detach().float().reshape(-1, tensor.shape[-1]).clone()))
        if len({len(v) for v in self.vectors.values()}) != 1:
            raise ValueError(f"the embedding {name!r} has {_shapes(self.vectors)}: expected as many vectors in "
                             f"each text encoder")
        object.__setattr__(self, "_hooks", [])

    @property
    def vectors(self) -> dict[str, nn.Parameter]:
        return dict(self._parameters)

    @property
    def num_vectors(self) -> int:
        return len(next(iter(self._parameters.values())))

    @property
    def tokens(self) -> list[str]:
        return [self.name] + [f"{self.name}_{i}" for i in range(1, self.num_vectors)]

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def freeze(self):
        """Keep the vectors as they are from now on (an optimizer skips a parameter without a gradient)."""
        for p in self.parameters():
            p.requires_grad_(False)
            p.grad = None

    @classmethod
    def create(cls, tokenizer, text_encoder, name: str, init_word: str | None = None,
               num_vectors: int = 1) -> "TokenEmbeddings":
        """New vectors started from `init_word`'s token embeddings (one per vector, cycling, as kohya), or from the
        mean of the vocabulary, in each text encoder (SDXL: pass both tokenizers and both encoders), and applied."""
        check_token_name(name)
        vectors = {}
        for key, tok, encoder in embedding_slots(tokenizer, text_encoder):
            table = encoder.get_input_embeddings().weight.detach()
            if init_word:
                ids = tok.encode(init_word, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"init_word {init_word!r} gives no token")
                vectors[key] = table[[ids[i % len(ids)] for i in range(num_vectors)]]
            else:
                vectors[key] = table.float().mean(0, keepdim=True).expand(num_vectors, -1)
        return cls(name, vectors).apply_to(tokenizer, text_encoder)

    def apply_to(self, tokenizer, text_encoder) -> "TokenEmbeddings":
        slots = embedding_slots(tokenizer, text_encoder)
        if sorted(key for key, _, _ in slots) != sorted(self._parameters):
            raise ValueError(f"the embedding {self.name!r} has {_shapes(self.vectors)}, this model's text encoders "
                             f"take {', '.join(key for key, _, _ in slots)} (an embedding for another base model?)")
        for key, tok, encoder in slots:
            dim = encoder.get_input_embeddings().embedding_dim
            if self._parameters[key].shape[1] != dim:
                raise ValueError(f"the embedding {self.name!r} has {_shapes(self.vectors)}, this text encoder's "
                                 f"tokens have {dim} dimensions (an embedding for another base model?)")
            vocab = tok.get_vocab()
            taken = [t for t in self.tokens if t in vocab or t.lower() in vocab]
            if taken:
                raise ValueError(f"the token {taken[0]!r} is already in the tokenizer (a word of its vocabulary, or "
                                 f"an embedding added before); choose another token name")
        for key, tok, encoder in slots:
            first = len(tok)
            added = tok.add_tokens(self.tokens)
            # Read back through the tokenizer, as a prompt is: CLIP lower-cases text, so `<V>` is the token `<v>`.
            ids = [tok.encode(t, add_special_tokens=False) for t in self.tokens]
            if added != len(self.tokens) or ids != [[first + i] for i in range(len(self.tokens))]:
                raise ValueError(f"the token name {self.name!r} is not read back as one new token by this tokenizer "
                                 f"(it reads {self.tokens[0]!r} as {tok.tokenize(self.tokens[0])}); choose a name "
                                 f"without spaces such as sks or <v>")
            encoder.resize_token_embeddings(len(tok), mean_resizing=False)
            pool_at_eos(encoder, tok)
            table = encoder.get_input_embeddings()
            with torch.no_grad():  # the rows too, for code that reads the table directly
                table.weight[first:first + self.num_vectors] = self._parameters[key].to(table.weight)
            self._hooks.append(table.register_forward_hook(functools.partial(self._replace_rows, key, first)))
        return self

    def _replace_rows(self, key, first_id, table, args, out):
        vectors = self._parameters[key]
        offset = args[0] - first_id
        new = (offset >= 0) & (offset < len(vectors))
        rows = vectors.to(out.dtype)[offset.clamp(0, len(vectors) - 1)]
        return torch.where(new.unsqueeze(-1), rows, out)

    def remove(self):
        while self._hooks:
            self._hooks.pop().remove()

    def expand(self, text: str) -> str:
        if self.num_vectors == 1:
            return text
        return re.sub(rf"(?<![\w]){re.escape(self.name)}(?![\w])", " ".join(self.tokens), text, flags=re.IGNORECASE)

    def file_tensors(self, *, bundled: bool) -> dict[str, torch.Tensor]:
        """The vectors under the keys the ecosystem reads: SD1.x/2.x `string_to_param.*` bundled in a LoRA file
        (A1111), `emb_params` in an embedding file (kohya); SDXL `clip_l` and `clip_g` in both (kohya's
        sdxl_train_textual_inversion, A1111, ComfyUI, OneTrainer; diffusers loads each with load_textual_inversion)."""
        if "weight" in self._parameters:
            return {"string_to_param.*" if bundled else "emb_params": self.weight.detach()}
        return {key: vectors.detach() for key, vectors in self._parameters.items()}

    def save_textual_inversion(self, path, metadata: dict[str, str] | None = None):
        """A textual-inversion .safetensors (see file_tensors), with the token in its metadata."""
        from safetensors.torch import save as save_safetensors_bytes

        tensors = {k: v.float().cpu().contiguous() for k, v in self.file_tensors(bundled=False).items()}
        data = save_safetensors_bytes(tensors, {"token": self.name, **(metadata or {})})
        atomic_write(path, lambda f: f.write(data))

    def load_vectors(self, vectors: torch.Tensor | dict[str, torch.Tensor], source):
        """Copy vectors read from a file (bundled_vectors) into these, which must have the same shapes."""
        theirs = vectors if isinstance(vectors, dict) else {"weight": vectors}
        if {k: v.shape for k, v in theirs.items()} != {k: v.shape for k, v in self._parameters.items()}:
            raise kohya.LoRAFileError(f"{source}: the embedding {self.name!r} has {_shapes(theirs)}, this run's has "
                                      f"{_shapes(self.vectors)} (another number of vectors per token, or another "
                                      f"base model?)")
        with torch.no_grad():
            for key, tensor in theirs.items():
                self._parameters[key].copy_(tensor)

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}"


def pool_at_eos(text_encoder, tokenizer):
    """Make transformers' CLIP pool at the EOS token. With the legacy `eos_token_id` 2 of SD's and SDXL's configs it
    pools at the highest id, which is a new token's once one is added; SDXL's pooled embedding would then be the new
    token's state. kohya (pool_workaround) and ComfyUI pool at the EOS; the tokenizer's id does it here
    (transformers' own fix for configs with added tokens), in every pipeline built on the encoder."""
    model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4.x's CLIPTextTransformer, 5.x's model
    model.eos_token_id = text_encoder.config.eos_token_id = tokenizer.eos_token_id


def check_token_name(name: str):
    """A new token's name: any text without whitespace, e.g. `sks`, `<v>`, `<V>` (cloneofsimo, diffusers' textual
    inversion, Mix-of-Show). Whether a tokenizer reads it back as one token is checked when it is added
    (TokenEmbeddings.apply_to). CLIP lower-cases prompts, so `<V>` and `<v>` are the same token there."""
    if not isinstance(name, str) or not name or re.search(r"\s", name):
        raise ValueError(f"token name {name!r}: expected a non-empty text without whitespace (e.g. sks or <v>), "
                         f"which the tokenizer adds as one new token")


def _metadata_number(metadata: dict, key: str, kind):
    try:
        return kind(float(metadata[key]))
    except (KeyError, ValueError, TypeError):
        return None


def _most_common_alpha(modules: dict[str, kohya.ModuleWeights]) -> float:
    alphas = [w.alpha for w in modules.values()]
    return max(set(alphas), key=alphas.count)
