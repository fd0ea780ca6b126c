"""LyCORIS' trained norm layers (`train_norm=True`, lycoris/modules/norms.py): a learned difference added to a
LayerNorm's / GroupNorm's weight and bias.

    weight' = weight + multiplier * w_norm        bias' = bias + multiplier * b_norm
    y = norm(x) * weight' + bias' = base(x) + multiplier * (norm(x) * w_norm + b_norm)

File keys, LyCORIS': `w_norm`, `b_norm` ([channels] each; no alpha). Both start at 0. LyCORIS' network puts one on
every norm layer inside its target blocks (the U-Net's transformer and ResNet blocks; CLIP's attention and MLP
blocks hold none). LyCORIS applies its network's rank dropout to these too, with a mask that keeps a fraction p
(`rand < p`); here norm layers have no rank dropout.
"""

import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.formats.errors import LoRAFileError

from .base import TensorLayer, Unscaled, shapes

NORMS = (nn.LayerNorm, nn.GroupNorm)


class NormLayer(Unscaled, TensorLayer):
    kind = "norm"
    label = "norm"
    file_keys = ("w_norm", "b_norm")
    detect_keys = ("w_norm",)  # LyCORIS' weight_list_det
    PARAMS = ("w_norm", "b_norm")
    creatable = False

    def __init__(self, base: nn.Module, rank: int | None = None, alpha: float | None = None, *,
                 multiplier: float = 1.0, module_dropout: float = 0.0, tensors: dict[str, torch.Tensor] | None = None,
                 source: str = "norm", **ignored):
        """`rank`, `alpha` (and the algorithm options a network passes) mean nothing for a norm layer."""
        super().__init__()
        if not isinstance(base, NORMS) or base.weight is None:
            raise TypeError(f"a norm layer wraps an affine nn.LayerNorm or nn.GroupNorm, got {type(base).__name__}")
        dim = base.weight.numel()
        if tensors is None:
            tensors = {"w_norm": torch.zeros(dim)}
            if base.bias is not None:
                tensors["b_norm"] = torch.zeros(dim)
        if any(t.numel() != dim for t in tensors.values()) or ("b_norm" in tensors) != (base.bias is not None):
            raise ValueError(f"{source}: norm tensors {shapes(tensors)} do not fit {type(base).__name__} with "
                             f"{dim} channels{'' if base.bias is not None else ' and no bias'}")
        self._set_params({k: v.reshape(dim) for k, v in tensors.items()})
        self._finish_init(base, 1, None, multiplier=multiplier, dropout=0.0, rank_dropout=0.0,
                          module_dropout=module_dropout)

    def _check_base(self, base):
        return base.weight.numel(), base.weight.numel()

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * (norm(x) * w_norm + b_norm): the base's normalisation with these as its affine part."""
        m = self.multiplier
        weight = (self.w_norm * m).to(x.dtype)
        bias = None if self.b_norm is None else (self.b_norm * m).to(x.dtype)
        if isinstance(self.base, nn.LayerNorm):
            return F.layer_norm(x, self.base.normalized_shape, weight.reshape(self.base.normalized_shape),
                                None if bias is None else bias.reshape(self.base.normalized_shape), self.base.eps)
        return F.group_norm(x, self.base.num_groups, weight, bias, self.base.eps)

    def delta_weight(self) -> torch.Tensor:
        return self.w_norm.float().reshape(self.base.weight.shape)

    def max_norm_factors(self):
        return None  # LyCORIS' norm modules have no max norm

    @classmethod
    def file_delta(cls, tensors, scale, base=None):
        return tensors["w_norm"].float().reshape(-1, 1)

    @classmethod
    def file_bias_delta(cls, tensors):
        return tensors["b_norm"].float() if "b_norm" in tensors else None

    @torch.no_grad()
    def merge(self):
        if self.merged:
            return
        self._add_to_base(self.delta_weight() * self.multiplier)
        if self.b_norm is not None:
            bias = self.base.bias
            bias.copy_((bias.float() + self.b_norm.float().reshape(bias.shape) * self.multiplier).to(bias.dtype))
        self.merged_multiplier = self.multiplier

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        m = self.merged_multiplier
        self._add_to_base(self.delta_weight() * -m)
        if self.b_norm is not None:
            bias = self.base.bias
            bias.copy_((bias.float() - self.b_norm.float().reshape(bias.shape) * m).to(bias.dtype))
        self.merged_multiplier = None

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier:g}"

    # -- the file: LyCORIS' keys ----------------------------------------------------------------------------------

    @classmethod
    def check_file_tensors(cls, name, tensors, source):
        if "w_norm" not in tensors or any(t.dim() != 1 for t in tensors.values()) or \
                ("b_norm" in tensors and tensors["b_norm"].shape != tensors["w_norm"].shape):
            raise LoRAFileError(f"{source}: module {name} has {shapes(tensors)}; a norm module has w_norm (and "
                                f"b_norm) of the norm layer's [channels]")

    @classmethod
    def from_file(cls, base, weights, *, multiplier, source):
        if weights.dora_scale is not None:
            raise ValueError("a norm module has no DoRA")
        return cls(base, multiplier=multiplier, tensors=weights.tensors, source=source)
