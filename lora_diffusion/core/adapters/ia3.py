"""LyCORIS' iA3 (lycoris/modules/ia3.py; Liu et al. 2022, "(IA)^3"): one learned scale per output channel of the
base weight, or per input channel with `train_on_input=True`.

    W' = W * (1 + multiplier * w)       w broadcast over W's output rows (dim 0) or input columns (dim 1)
    dW = W * w * multiplier              (the bias is not scaled, as in LyCORIS' default, non-bypass forward)

File keys per module, LyCORIS': `weight` ([n] for a Linear, [1, n, 1, 1] for a conv; n = out, or in with
train_on_input) and `on_input` (0-dim, 1 when the scale is on the input). No `alpha`. `w` starts at 0, so a new
layer changes nothing. The update depends on the base weight: merging keeps it, to unmerge exactly.
"""

import torch
from torch import nn

from lora_diffusion.formats.errors import LoRAFileError

from .base import TensorLayer, Unscaled, shapes


class IA3Layer(Unscaled, TensorLayer):
    kind = "ia3"
    label = "iA3"
    file_keys = ("weight", "on_input")
    detect_keys = ("on_input",)  # `weight` alone is no algorithm's (LyCORIS recognises iA3 by on_input too)
    delta_depends_on_base = True
    PARAMS = ("weight",)
    OPTIONS = ("dropout", "train_on_input")

    def __init__(self, base: nn.Module, rank: int | None = None, alpha: float | None = None, *,
                 multiplier: float = 1.0, dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 train_on_input: bool = False, dora_wd: bool = False, tensors: dict[str, torch.Tensor] | None = None,
                 source: str = "iA3"):
        """`rank` and `alpha` mean nothing for iA3 (LyCORIS takes and ignores them); `dropout`, `rank_dropout` and
        `dora_wd` are refused, since LyCORIS would ignore them silently."""
        super().__init__()
        for option, value in (("dropout", dropout), ("rank_dropout", rank_dropout), ("dora_wd", dora_wd)):
            if value:
                raise ValueError(f"iA3 has no {option} (LyCORIS' iA3 ignores it); got {option}={value!r}")
        in_dim, out_dim = self._check_base(base)
        if tensors is not None:
            train_on_input = bool(float(tensors["on_input"]))
        self.train_on_input = bool(train_on_input)  # a Python bool: reading the buffer would sync a GPU
        n = in_dim if self.train_on_input else out_dim
        shape = (n,) if isinstance(base, nn.Linear) else (1, n, 1, 1)
        weight = torch.zeros(shape) if tensors is None else tensors["weight"]
        if tuple(weight.shape) != shape:
            side = "input" if self.train_on_input else "output"
            raise ValueError(f"{source}: iA3 weight {tuple(weight.shape)} does not fit {type(base).__name__} "
                             f"{tuple(base.weight.shape)}: expected {shape} (one scale per {side} channel)")
        self._set_params({"weight": weight})
        self.register_buffer("on_input", torch.tensor(int(self.train_on_input)))
        self._finish_init(base, 1, None, multiplier=multiplier, dropout=0.0, rank_dropout=0.0,
                          module_dropout=module_dropout)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "on_input": self.on_input}

    def delta_weight(self) -> torch.Tensor:
        """W * w along the input or output axis, in fp32 (multiplier not applied)."""
        return ia3_delta(self.base.weight, self.weight, self.train_on_input)

    @classmethod
    def file_delta(cls, tensors, scale, base=None):
        if base is None:
            raise ValueError("an iA3 module's update is a scale of the base weight: its delta needs the base weight")
        delta = ia3_delta(base, tensors["weight"], bool(float(tensors["on_input"])))
        return delta.reshape(delta.shape[0], -1)

    def training_delta(self) -> torch.Tensor:
        return self.delta_weight()

    def max_norm_factors(self):
        return None  # a relative scale of the base weight, not a learned weight: LyCORIS' iA3 has no max norm either

    def extra_repr(self) -> str:
        return f"on_input={self.train_on_input}, multiplier={self.multiplier:g}"

    # -- the file: LyCORIS' keys ----------------------------------------------------------------------------------

    @classmethod
    def check_file_tensors(cls, name, tensors, source):
        if sorted(tensors) != sorted(cls.file_keys):
            raise LoRAFileError(f"{source}: module {name} has {', '.join(sorted(tensors))}; an iA3 module has weight "
                                f"and on_input")
        weight, on_input = tensors["weight"], tensors["on_input"]
        if on_input.numel() != 1 or float(on_input) not in (0.0, 1.0):
            raise LoRAFileError(f"{source}: {name}.on_input must be a scalar 0 or 1, got {on_input.tolist()}")
        if not (weight.dim() == 1 or (weight.dim() == 4 and weight.shape[0] == 1 and weight.shape[2:] == (1, 1))):
            raise LoRAFileError(f"{source}: {name}.weight is {tuple(weight.shape)}; an iA3 weight is [n] (Linear) or "
                                f"[1, n, 1, 1] (conv)")

    def load_file(self, weights, source):
        theirs = bool(float(weights.tensors["on_input"]))
        if theirs != self.train_on_input or weights.tensors["weight"].shape != self.weight.shape:
            raise LoRAFileError(f"{source} has {shapes(weights.tensors)} (on_input={int(theirs)}), this network's "
                                f"module has {shapes(self._tensors())} (on_input={int(self.train_on_input)})")
        with torch.no_grad():
            self.weight.copy_(weights.tensors["weight"])


def ia3_delta(base: torch.Tensor, weight: torch.Tensor, on_input: bool) -> torch.Tensor:
    """W * w, w broadcast along W's input columns (`on_input`) or output rows, in fp32."""
    base = base.float()
    axis = [1] * base.dim()
    axis[1 if on_input else 0] = -1
    return base * weight.float().reshape(axis)
