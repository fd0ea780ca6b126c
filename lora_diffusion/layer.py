"""LoRALayer: a low-rank update wrapped around one existing nn.Linear or nn.Conv2d.

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


class LoRALayer(nn.Module):
    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if isinstance(base, LoRALayer):
            raise TypeError("LoRALayer cannot wrap another LoRALayer; wrap its base module")
        if isinstance(base, nn.Linear):
            in_dim, out_dim = base.in_features, base.out_features
            self.lora_down = nn.Linear(in_dim, rank, bias=False, dtype=dtype)
            self.lora_up = nn.Linear(rank, out_dim, bias=False, dtype=dtype)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.dilation not in ((1, 1), 1):
                raise ValueError(f"LoRALayer supports Conv2d with groups=1 and dilation=1, got {base}")
            in_dim, out_dim = base.in_channels, base.out_channels
            self.lora_down = nn.Conv2d(in_dim, rank, base.kernel_size, base.stride, base.padding, bias=False,
                                       dtype=dtype)
            self.lora_up = nn.Conv2d(rank, out_dim, 1, 1, bias=False, dtype=dtype)
        else:
            raise TypeError(f"LoRALayer wraps nn.Linear or nn.Conv2d, got {type(base).__name__}")
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        # The forward reads alpha as a Python float: `.item()` on a GPU tensor would sync the device in every
        # module on every step. Loading a state dict refreshes it.
        self._alpha_value = alpha
        self.register_load_state_dict_post_hook(_refresh_alpha)
        if base.weight.device.type != "meta":
            self.to(base.weight.device)
        self.rank = rank
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.merged_multiplier = None  # set while the delta is baked into the base weight
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # A plain attribute, not a submodule: the base belongs to its model, and the layer becomes the base's child.
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "_hook", None)
        self.child_name = None

    @property
    def scaling(self) -> float:
        """alpha / rank (peft's name; cloneofsimo's `.scale` is the multiplier, see LoraInjectedLinear)."""
        return self._alpha_value / self.rank

    @property
    def applied(self) -> bool:
        return self._hook is not None

    @property
    def merged(self) -> bool:
        return self.merged_multiplier is not None

    def apply_to(self) -> "LoRALayer":
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
        if self.merged or self.multiplier == 0:
            return None
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return None
        return out + self.lora_delta(args[0]).to(out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + the LoRA delta, for this layer alone (the base's own computation, without its hooks)."""
        out = self.base.forward(x)
        return out if self.merged else out + self.lora_delta(x).to(out.dtype)

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

    # -- merging into the base weight ------------------------------------------------------------------------

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

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self._add_to_base(self.delta_weight() * self.multiplier)
        self.merged_multiplier = self.multiplier

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self._add_to_base(self.delta_weight() * -self.merged_multiplier)
        self.merged_multiplier = None

    def _add_to_base(self, delta: torch.Tensor):
        weight = self.base.weight
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha.item():g}, multiplier={self.multiplier:g}"


def _refresh_alpha(layer: LoRALayer, incompatible_keys):
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
