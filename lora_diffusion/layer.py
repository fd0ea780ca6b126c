"""LoRALayer: a low-rank update wrapped around one existing nn.Linear or nn.Conv2d (AdapterLayer: what it shares
with LoHa/LoKr in lycoris_layers.py, and DoRA, an option of every layer).

The base module keeps its place, its class and its weight (never copied). `apply_to()` makes the layer part of the
model: it becomes a child of the base module, named `lora` (`lora_1`, ... when several are stacked), and a forward
hook on the base adds its output. So the model's `parameters()`, `state_dict()` (`<module>.lora.lora_down.weight`,
`.lora_up.weight`, `.alpha`), `.to()`, `.train()/.eval()`, `requires_grad_`, DDP and `torch.compile` all see the
LoRA. `remove()` takes the hook and the child away: the model is exactly as before.

    y = base(x) + multiplier * (alpha / rank) * up(dropout(down(x)))

The LoRA weights are created in fp32 whatever the base's dtype; to run a half-precision base with fp32 LoRA
weights, cast the model before applying the LoRA (a later `model.to(torch.float16)` casts the LoRA too).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class AdapterLayer(nn.Module):
    """What every algorithm (LoRA here, LoHa/LoKr in lycoris_layers.py) shares: it wraps one nn.Linear or nn.Conv2d
    without copying its weight, becomes the base's child + forward hook on `apply_to()`, carries `alpha` (a buffer;
    scale = alpha / rank), `multiplier`, the dropouts, and merges into / unmerges from the base weight.

    A subclass creates its parameters, then calls `_finish_init`, and defines `delta_weight()` (the fp32 update
    shaped like the base weight, multiplier not applied) and `adapter_output(x)` (multiplier * the update applied to
    x). With `dora_wd=True` the layer is DoRA (LyCORIS' weight decomposition, see dora_weight)."""

    kind = "adapter"

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

    def _finish_init(self, base: nn.Module, rank: int, alpha: float, *, multiplier: float, dropout: float,
                     rank_dropout: float, module_dropout: float, dora_wd: bool = False):
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        # The forward reads alpha as a Python float: `.item()` on a GPU tensor would sync the device in every
        # module on every step. Loading a state dict refreshes it.
        self._alpha_value = float(alpha)
        self.register_load_state_dict_post_hook(_refresh_alpha)
        if dora_wd:
            self.dora_scale = nn.Parameter(_row_norms(base.weight.detach().float()))
        else:
            self.dora_scale = None
        if base.weight.device.type != "meta":
            self.to(base.weight.device)
        self.rank = rank
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.merged_multiplier = None  # set while the delta is baked into the base weight
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
        return self.dora_scale is not None

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
        # DoRA at multiplier 0 is not the base model in LyCORIS' formula (see dora_weight), so it is not skipped.
        if self.merged or (self.multiplier == 0 and not self.is_dora):
            return None
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return None
        return out + self._output(args[0]).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + the update, for this layer alone (the base's own computation, without its hooks)."""
        out = self.base.forward(x)
        return out if self.merged else out + self._output(x).to(out.dtype)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_dora:
            return self._weight_op(x, self.dora_weight(self.multiplier) - self.base.weight.float())
        return self.adapter_output(x)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * the update applied to x. This default builds the full update weight (LoHa, LoKr)."""
        return self._weight_op(x, self.training_delta() * self.multiplier)

    def training_delta(self) -> torch.Tensor:
        """delta_weight, with LyCORIS' rank dropout in training (whole output rows dropped)."""
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            keep = torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout
            delta = delta * keep.to(delta.dtype).view(-1, *[1] * (delta.dim() - 1))
        return delta

    def _weight_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base's own op (linear or conv with its stride/padding) with another weight, in x's dtype."""
        weight = weight.to(x.dtype)
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight)
        return self.base._conv_forward(x, weight, None)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    # -- DoRA ------------------------------------------------------------------------------------------------

    def dora_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """LyCORIS' DoRA weight (wd_on_out): W' = (W + dW) * (multiplier * (m / |W + dW| - 1) + 1), the norm taken
        per output row, m = dora_scale, dW = delta_weight() (multiplier NOT applied to it). At multiplier 1 this
        is m * (W + dW) / |W + dW|; at 0 it is W + dW, as in LyCORIS (ComfyUI instead blends W + s * (W' - W))."""
        weight = self.base.weight.float() + self.training_delta()
        norm = _row_norms(weight) + torch.finfo(torch.float32).eps
        scale = self.dora_scale.float() / norm
        if multiplier != 1:
            scale = multiplier * (scale - 1) + 1
        return weight * scale

    # -- merging into the base weight ------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        if self.is_dora:
            # The DoRA update depends on the base weight, which merging changes: keep it to take it back exactly.
            delta = self.dora_weight(self.multiplier) - self.base.weight.float()
            object.__setattr__(self, "_merged_delta", delta)
        else:
            delta = self.delta_weight() * self.multiplier
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

    def extra_repr(self) -> str:
        dora = ", dora" if self.is_dora else ""
        return f"rank={self.rank}, alpha={self.alpha.item():g}, multiplier={self.multiplier:g}{dora}"


class LoRALayer(AdapterLayer):
    kind = "lora"

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, dora_wd: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        in_dim, out_dim = self._check_base(base)
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(in_dim, rank, bias=False, dtype=dtype)
            self.lora_up = nn.Linear(rank, out_dim, bias=False, dtype=dtype)
        else:
            self.lora_down = nn.Conv2d(in_dim, rank, base.kernel_size, base.stride, base.padding, bias=False,
                                       dtype=dtype)
            self.lora_up = nn.Conv2d(rank, out_dim, 1, 1, bias=False, dtype=dtype)
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self._finish_init(base, rank, alpha, multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                          module_dropout=module_dropout, dora_wd=dora_wd)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_delta(x)

    def training_delta(self) -> torch.Tensor:
        return self.delta_weight()  # DoRA: LyCORIS applies no dropout to a DoRA LoRA's weight either

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scaling * up(down(x)), with the training-time dropouts."""
        h = _in_dtype_of(self.lora_down, x)
        scale = self.multiplier * self.scaling
        if self.training:
            if self.dropout > 0:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout > 0:
                h = h * self._rank_mask(h)
                scale = scale / (1.0 - self.rank_dropout)
        # The scale goes on the rank-r tensor, not on the output: r << out_features, so one small product instead
        # of a full-size one (and a full-size one less in the backward).
        return _in_dtype_of(self.lora_up, h * scale)

    def _rank_mask(self, h: torch.Tensor) -> torch.Tensor:
        keep = (torch.rand(h.shape[0], self.rank, device=h.device) > self.rank_dropout).to(h.dtype)
        if isinstance(self.lora_down, nn.Conv2d):
            return keep[:, :, None, None]  # (B, r, H, W)
        if h.dim() == 3:
            return keep[:, None, :]  # (B, T, r)
        return keep

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) * the weight update, in fp32 and shaped like the base weight (multiplier not applied)."""
        down = self.lora_down.weight.float()
        up = self.lora_up.weight.float()
        if isinstance(self.lora_down, nn.Linear):
            delta = up @ down
        elif down.shape[2:] == (1, 1):
            delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
        else:
            # Composing a kxk conv (down) with a 1x1 conv (up) is itself a kxk conv.
            delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return delta * self.scaling


def freeze_base(model: nn.Module) -> nn.Module:
    """requires_grad_(False) on every parameter of `model` that is not an adapter's: the base weights. Adapters
    already on the model keep their own setting (model.requires_grad_(False) would freeze them too: they are its
    children)."""
    adapters = {id(p) for m in model.modules() if isinstance(m, AdapterLayer) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    return model


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row, shaped [out, 1(, 1, 1)] (LyCORIS' dora_scale with wd_on_out=True)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def _refresh_alpha(layer: AdapterLayer, incompatible_keys):
    layer._alpha_value = float(layer.alpha)


def _in_dtype_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) computed in x's dtype: fp32 LoRA weights on a bf16/fp16 activation are cast (a tiny copy, which
    autocast would make too), rather than the activation being cast up to fp32 (a full-size copy)."""
    weight = module.weight
    if weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return module(x)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight.to(x.dtype))
    return module._conv_forward(x, weight.to(x.dtype), None)
