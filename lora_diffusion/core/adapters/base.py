"""AdapterLayer: what every algorithm shares (wrapping one nn.Linear / nn.Conv2d, the hook, alpha, multiplier,
dropouts, its variant (DoRA, dora.py), merging) and the file contract each algorithm declares; TensorLayer for
algorithms whose parameters are LyCORIS' named tensors (LoHa, LoKr, iA3).

The base module keeps its place, its class and its weight (never copied). `apply_to()` makes the layer part of the
model: it becomes a child of the base module, named `lora` (`lora_1`, ... when several are stacked), and a forward
hook on the base adds its output. So the model's `parameters()`, `state_dict()`, `.to()`, `.train()/.eval()`,
`requires_grad_`, DDP and `torch.compile` all see it. `remove()` takes the hook and the child away: the model is
exactly as before.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.formats.errors import LoRAFileError

from .dora import (  # noqa: F401 (row_norms, column_norms, dora_merged, dora_on_input: importable here as in 0.1)
    DoRA,
    column_norms,
    dora_merged,
    dora_on_input,
    row_norms,
    variant_of,
)


class AdapterLayer(nn.Module):
    """What every algorithm (LoRA here, LoHa/LoKr in lycoris_layers.py) shares: it wraps one nn.Linear or nn.Conv2d
    without copying its weight, becomes the base's child + forward hook on `apply_to()`, carries `alpha` (a buffer;
    scale = alpha / rank), `multiplier`, the dropouts, and merges into / unmerges from the base weight.

    A subclass creates its parameters, then calls `_finish_init`, and defines `delta_weight()` (the fp32 update
    shaped like the base weight, multiplier not applied) and `adapter_output(x)` (multiplier * the update applied to
    x). With `dora_wd=True` (or a dora.DoRA) the layer is DoRA (LyCORIS' weight decomposition): `variant` holds the
    DoRA object that changes its weight, merging and file tensor; None for the plain algorithm."""

    kind = "adapter"  # the algorithm's name: create_network(algo=), ModuleWeights.algo, the registry's key
    label = "adapter"  # its name in messages
    file_keys: tuple[str, ...] = ()  # the file keys after "<module>." (besides alpha and dora_scale)
    detect_keys: tuple[str, ...] = ()  # any of these in a module's keys means this algorithm (LyCORIS' algo_check)
    delta_depends_on_base = False  # the update is a function of the base weight (iA3): merge keeps it to unmerge
    OPTIONS: tuple[str, ...] = ()  # create_network keywords passed to this algorithm (besides the shared ones)
    file_algo: str | None = None  # the algorithm its file modules are, when not its own `kind` (DyLoRA: "lora")
    creatable = True  # an `algo=` of create_network (the norm layers of train_norm are not)

    def _check_base(self, base: nn.Module) -> tuple[int, int]:
        """(in, out) of a base this layer can wrap."""
        if isinstance(base, AdapterLayer):
            raise TypeError(f"{type(self).__name__} cannot wrap another LoRA layer; wrap its base module")
        if isinstance(base, nn.Linear):
            return base.in_features, base.out_features
        if isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.dilation not in ((1, 1), 1):
                raise ValueError(f"{type(self).__name__} supports Conv2d with groups=1 and dilation=1, got {base}")
            return base.in_channels, base.out_channels
        raise TypeError(f"{type(self).__name__} wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")

    def _finish_init(self, base: nn.Module, rank: int, alpha: float | None, *, multiplier: float, dropout: float,
                     rank_dropout: float, module_dropout: float, dora_wd: "bool | DoRA" = False,
                     use_scalar: bool = False, rank_dropout_scale: bool = False):
        """`alpha=None`: an algorithm without one (iA3): no `alpha` buffer, scale 1. `use_scalar` (LyCORIS): a
        trainable 0-dim `scalar`, starting at 0, multiplies the update (the algorithm then starts its zero factor
        at random values) and is folded into one factor in the file. `rank_dropout_scale` (LyCORIS): the rank
        dropout mask is divided by its mean."""
        if alpha is not None:
            self.register_buffer("alpha", torch.tensor(float(alpha)))
            # The forward reads alpha as a Python float: `.item()` on a GPU tensor would sync the device in every
            # module on every step. Loading a state dict refreshes it.
            self.register_load_state_dict_post_hook(_refresh_alpha)
        else:
            self.alpha = None
        self._alpha_value = 1.0 if alpha is None else float(alpha)
        self.variant = variant_of(dora_wd)
        self.dora_scale = None  # the variant's magnitude, a parameter of the layer (its state dict key)
        if self.variant is not None:
            self.variant.init(self, base)
        self.scalar = nn.Parameter(torch.tensor(0.0)) if use_scalar else None
        self.rank_dropout_scale = rank_dropout_scale
        if base.weight.device.type != "meta":
            self.to(base.weight.device)
        self.rank = rank
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.merged_multiplier = None  # set while the delta is baked into the base weight
        self.bypassed = False  # LoRANetwork.bypassed(): the base module's output alone, whatever the variant
        # A plain attribute, not a submodule: the base belongs to its model, and the layer becomes the base's child.
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "_hook", None)
        object.__setattr__(self, "_merged_delta", None)
        self.child_name = None

    @property
    def scaling(self) -> float:
        """alpha / rank (peft's name; cloneofsimo's `.scale` is the multiplier, see LoraInjectedLinear)."""
        return self._alpha_value / self.rank

    @property
    def is_dora(self) -> bool:
        return self.variant is not None

    @property
    def applied(self) -> bool:
        return self._hook is not None

    @property
    def merged(self) -> bool:
        return self.merged_multiplier is not None

    def apply_to(self) -> "AdapterLayer":
        """Make this layer part of the base module: its child `lora` (or `lora_<n>`) and a forward hook."""
        if not self.applied:
            name, n = "lora", 0
            while name in self.base._modules:
                n += 1
                name = f"lora_{n}"
            self.base.add_module(name, self)
            self.child_name = name
            object.__setattr__(self, "_hook", self.base.register_forward_hook(self._add_delta))
        return self

    def remove(self):
        """Take the hook and the child away: the base module is exactly as it was (unless merged)."""
        if not self.applied:
            return
        self._hook.remove()
        object.__setattr__(self, "_hook", None)
        del self.base._modules[self.child_name]
        self.child_name = None

    def _add_delta(self, base, args, out):
        # A variant may compute at multiplier 0 too (DoRA: W + dW in LyCORIS' formula, not the base model).
        if self.merged or self.bypassed or (self.multiplier == 0 and (self.variant is None or
                                                                      self.variant.inactive_at_zero)):
            return None
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return None
        return out + self._output(args[0]).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + the update, for this layer alone (the base's own computation, without its hooks)."""
        out = self.base.forward(x)
        return out if self.merged else out + self._output(x).to(out.dtype)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant is not None:
            return self.variant.forward(self, x)
        return self.adapter_output(x)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * the update applied to x. This default builds the full update weight (LoHa, LoKr)."""
        return self._weight_op(x, self.training_delta() * self.multiplier)

    def training_delta(self) -> torch.Tensor:
        """delta_weight, with LyCORIS' rank dropout in training (whole output rows dropped)."""
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout).to(delta.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean().clamp(min=1e-6)
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        return delta

    def _weight_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base's own op (linear or conv with its stride/padding) with another weight, in x's dtype."""
        weight = weight.to(x.dtype)
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight)
        return self.base._conv_forward(x, weight, None)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def with_scalar(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor * the use_scalar scalar (unchanged without one)."""
        return tensor if self.scalar is None else tensor * self.scalar.to(tensor.dtype)

    def dora_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """A DoRA layer's weight W' (dora.dora_merged: m * (W + dW) / |W + dW| at multiplier 1)."""
        return self.variant.merged_weight(self, multiplier)

    # -- merging into the base weight ------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if self.variant is not None:
            # The variant's update depends on the base weight, which merging changes: keep it to take it back.
            delta = self.variant.delta(self, self.multiplier)
            object.__setattr__(self, "_merged_delta", delta)
        else:
            delta = self.delta_weight() * self.multiplier
            if self.delta_depends_on_base:
                object.__setattr__(self, "_merged_delta", delta)
        self._add_to_base(delta)
        self.merged_multiplier = self.multiplier

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self._merged_delta is not None:
            self._add_to_base(-self._merged_delta)
            object.__setattr__(self, "_merged_delta", None)
        else:
            self._add_to_base(self.delta_weight() * -self.merged_multiplier)
        self.merged_multiplier = None

    def _add_to_base(self, delta: torch.Tensor):
        weight = self.base.weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def max_norm_factors(self) -> list[torch.Tensor] | None:
        """The tensors the update is linear in, each (kohya's --scale_weight_norms scales each by ratio^(1/n) to
        scale the update by `ratio`); None for an algorithm it does not apply to."""
        return None

    # -- the file contract: what each algorithm declares (adapters/__init__.py lists them) ----------------------

    @classmethod
    def check_file_tensors(cls, name: str, tensors: dict[str, torch.Tensor], source: str):
        """Raise LoRAFileError unless `tensors` (a module's file keys of this algorithm) make a complete module."""
        raise NotImplementedError

    @classmethod
    def file_rank(cls, tensors: dict[str, torch.Tensor]) -> int:
        """The r of alpha / r, from the file tensors (1 where the algorithm has no rank)."""
        raise NotImplementedError

    @classmethod
    def file_scale(cls, tensors: dict[str, torch.Tensor], alpha: float) -> float:
        return alpha / cls.file_rank(tensors)

    @classmethod
    def file_label(cls, tensors: dict[str, torch.Tensor]) -> str:
        return cls.label

    @classmethod
    def from_file(cls, base: nn.Module, weights, *, multiplier: float, source: str) -> "AdapterLayer":
        """A layer around `base` made for a file module (a kohya.ModuleWeights of this algorithm): its shapes (and,
        for TensorLayers, its tensors); network.layer_from_file then loads the tensors with load_file."""
        raise NotImplementedError

    def load_file(self, weights, source: str):
        """Copy a file module's tensors into this layer; LoRAFileError when they do not fit it."""
        raise NotImplementedError

    @classmethod
    def file_delta(cls, tensors: dict[str, torch.Tensor], scale: float,
                   base: torch.Tensor | None = None) -> torch.Tensor:
        """The update of the base weight that a file module of this algorithm makes at multiplier 1 (DoRA not
        applied: see dora.DoRA.file_delta), in fp32, as [out, ...] (reshape it to the base weight's shape). `scale`
        is the file's (ModuleWeights.scale); `base` the base weight, needed where `delta_depends_on_base` (iA3, GLoRA).
        The model tools (merge, inspect) compute every module's update through this."""
        raise NotImplementedError

    @classmethod
    def file_bias_delta(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The update of the base module's bias, for an algorithm that changes it (norm layers), else None."""
        return None

    # LoRA + LoRA merges and resize work on up @ down factors: the algorithms whose file modules are such a pair
    lowrank_file = False

    def file_tensors(self, dtype: torch.dtype, file_alpha: float) -> dict[str, torch.Tensor]:
        """This layer's tensors under its file keys (alpha included where the algorithm has one; not its variant's,
        which LoRANetwork adds for every algorithm). `file_alpha` is the network's (see LoRALayer)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        dora = ", dora" if self.variant is not None else ""
        alpha = "" if self.alpha is None else f", alpha={self.alpha.item():g}"
        return f"rank={self.rank}{alpha}, multiplier={self.multiplier:g}{dora}"



class TensorLayer(AdapterLayer):
    """An algorithm whose parameters are named tensors, created by its init or from a file's (LoHa, LoKr, iA3: their
    parameter names are LyCORIS' file keys, so the state dict is the file's)."""

    PARAMS: tuple[str, ...] = ()

    def _finish_tensor_init(self, base, tensors, rank, alpha, source, **options):
        """The parameters from `tensors`, then the common set-up; an alpha of None or 0 means alpha = rank."""
        self._set_params(tensors)
        self._finish_init(base, rank, float(rank if alpha is None or alpha == 0 else alpha), **options)
        self._check_shape(source)

    def _set_params(self, tensors: dict[str, torch.Tensor]):
        for name, tensor in tensors.items():
            setattr(self, name, nn.Parameter(tensor.detach().float().clone()))
        for name in self.PARAMS:
            if name not in tensors:
                setattr(self, name, None)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.PARAMS if getattr(self, n) is not None}

    def _check_shape(self, source: str):
        shape = tuple(self._raw_delta().shape)
        numel = self.base.weight.numel()
        if math.prod(shape) != numel or shape[0] != self.base.weight.shape[0]:
            raise ValueError(f"{source}: the {type(self).__name__} tensors make a {shape} update, but the base weight "
                             f"is {tuple(self.base.weight.shape)} (a file made for another model?)")

    def delta_weight(self) -> torch.Tensor:
        return self.with_scalar(self._raw_delta().reshape(self.base.weight.shape) * self.scaling)

    @staticmethod
    def product(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The algorithm's update from its named tensors, unscaled (LoHa: loha_product, LoKr: kron_product)."""
        raise NotImplementedError

    def _raw_delta(self) -> torch.Tensor:
        return self.product(self._tensors())

    @classmethod
    def file_delta(cls, tensors, scale, base=None):
        delta = cls.product(tensors)
        return delta.reshape(delta.shape[0], -1) * scale

    def scalar_key(self) -> str | None:
        """The file key that use_scalar's scalar is folded into (LyCORIS' choice per algorithm)."""
        return None

    def max_norm_factors(self):
        """LoHa's and LoKr's update is a product of all its tensors (LyCORIS' LoKr scales each by ratio^(1/n); its
        LoHa scales a scalar that it folds into hada_w1_a on saving: the same update)."""
        return list(self._tensors().values())

    @classmethod
    def file_rank(cls, tensors):
        raise NotImplementedError

    @classmethod
    def from_file(cls, base, weights, *, multiplier, source):
        return cls(base, weights.rank, weights.alpha, multiplier=multiplier, dora_wd=weights.dora_scale is not None,
                   tensors=weights.tensors, source=source)

    def load_file(self, weights, source):
        own = self._tensors()
        if sorted(own) != sorted(weights.tensors) or any(own[k].shape != weights.tensors[k].shape for k in own):
            raise LoRAFileError(f"{source} has {shapes(weights.tensors)}, this network's module has {shapes(own)}")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(weights.tensors[key])
            if self.scalar is not None:
                self.scalar.fill_(1.0)  # the file holds it folded in (LyCORIS resets it the same way)
            if self.alpha is not None:
                self.alpha.fill_(weights.alpha)
                self._alpha_value = weights.alpha

    def file_tensors(self, dtype, file_alpha):
        tensors = {key: tensor.detach() for key, tensor in self._tensors().items()}
        if self.scalar is not None:
            key = self.scalar_key()
            tensors[key] = tensors[key].float() * self.scalar.detach().float()
        tensors = {key: tensor.to(dtype) for key, tensor in tensors.items()}
        if self.alpha is not None:
            tensors["alpha"] = torch.tensor(self.alpha.item(), dtype=dtype)
        return tensors


def check_product_tensors(name, tensors, source, *, need, product, kind, expected):
    """A file module of a product algorithm (LoHa, LoKr): exactly the `need` keys, and shapes that `product` can
    combine (checked on meta tensors: no arithmetic)."""
    if sorted(need) != sorted(tensors):
        raise LoRAFileError(f"{source}: module {name} has {', '.join(sorted(tensors))}; a {kind} module has "
                            f"{expected}")
    try:
        with torch.device("meta"):
            product({k: v.to("meta") for k, v in tensors.items()})
    except RuntimeError as e:
        raise LoRAFileError(f"{source}: module {name} has {kind} tensors whose shapes do not fit together "
                            f"({shapes(tensors)}): {e}") from None


class Unscaled:
    """For algorithms without a rank or an alpha (iA3, norm layers): the file's rank is 1, its scale 1."""

    @classmethod
    def file_rank(cls, tensors):
        return 1

    @classmethod
    def file_scale(cls, tensors, alpha):
        return 1.0


def shapes(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items()))


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W[p, q, k...] = sum_ij core[i, j, k...] a[i, p] b[j, q]: a kxk conv weight from a [r, r, k, k] core and
    [r, out] / [r, in] factors (LyCORIS' rebuild_tucker)."""
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def kaiming(*shape) -> torch.Tensor:
    tensor = torch.empty(*shape)
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensor


def freeze_base(model: nn.Module) -> nn.Module:
    """requires_grad_(False) on every parameter of `model` that is not an adapter's: the base weights. Adapters
    already on the model keep their own setting (model.requires_grad_(False) would freeze them too: they are its
    children)."""
    adapters = {id(p) for m in model.modules() if isinstance(m, AdapterLayer) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    return model


def _refresh_alpha(layer: AdapterLayer, incompatible_keys):
    layer._alpha_value = float(layer.alpha)


def in_dtype_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) computed in x's dtype: fp32 LoRA weights on a bf16/fp16 activation are cast (a tiny copy, which
    autocast would make too), rather than the activation being cast up to fp32 (a full-size copy)."""
    weight = module.weight
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return module(x)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight.to(x.dtype))
    return module._conv_forward(x, weight.to(x.dtype), None)
