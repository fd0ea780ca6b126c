"""LoRA (and LoCon: the same layer on a kxk conv), kohya's networks.lora: a low-rank update around one nn.Linear or
nn.Conv2d, with kohya's file keys `lora_down.weight` [r, in(, kh, kw)], `lora_up.weight` [out, r(, 1, 1)], `alpha`.

    y = base(x) + multiplier * (alpha / rank) * up(dropout(down(x)))

The LoRA weights are created in fp32 whatever the base's dtype; to run a half-precision base with fp32 LoRA
weights, cast the model before applying the LoRA (a later `model.to(torch.float16)` casts the LoRA too).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.formats.errors import LoRAFileError

from .base import AdapterLayer, in_dtype_of
from .dora import fit_shape


class LoRALayer(AdapterLayer):
    """y = base(x) + multiplier * (alpha / rank) * up(dropout(down(x))); LoCon when the base is a kxk conv."""

    kind = "lora"
    label = "LoRA"
    file_keys = ("lora_down.weight", "lora_up.weight")
    detect_keys = file_keys
    OPTIONS = ("dropout", "use_scalar", "rank_dropout_scale")

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, dora_wd: bool = False, use_scalar: bool = False,
                 rank_dropout_scale: bool = False):
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
                          module_dropout=module_dropout, dora_wd=dora_wd, use_scalar=use_scalar,
                          rank_dropout_scale=rank_dropout_scale)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if use_scalar:  # LyCORIS: the scalar starts at 0 instead of up
            nn.init.kaiming_uniform_(self.lora_up.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_up.weight)

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_delta(x)

    def training_delta(self) -> torch.Tensor:
        return self.delta_weight()  # DoRA: LyCORIS applies no dropout to a DoRA LoRA's weight either

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scaling * up(down(x)), with the training-time dropouts."""
        h = in_dtype_of(self.lora_down, x)
        scale = self.multiplier * self.scaling
        if self.training:
            if self.dropout > 0:
                h = F.dropout(h, p=self.dropout)
            if self.rank_dropout > 0:
                mask = self._rank_mask(h)
                h = h * mask
                # kohya: 1 / (1 - p); LyCORIS' rank_dropout_scale: 1 / the mask's mean
                scale = scale / (mask.mean().clamp(min=1e-6) if self.rank_dropout_scale else 1.0 - self.rank_dropout)
        if self.scalar is not None:
            h = h * self.scalar.to(h.dtype)
        # The scale goes on the rank-r tensor, not on the output: r << out_features, so one small product instead
        # of a full-size one (and a full-size one less in the backward).
        return in_dtype_of(self.lora_up, h * scale)

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
        return self.with_scalar(delta * self.scaling)

    def max_norm_factors(self):
        return [self.lora_down.weight, self.lora_up.weight]  # kohya: each times sqrt(ratio)

    # -- the file: kohya's keys -----------------------------------------------------------------------------------

    @classmethod
    def check_file_tensors(cls, name, tensors, source):
        missing = [k for k in cls.file_keys if k not in tensors]
        if missing:
            raise LoRAFileError(f"{source}: module {name} lacks {', '.join(name + '.' + m for m in missing)}")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
            raise LoRAFileError(f"{source}: module {name} has inconsistent shapes lora_down {tuple(down.shape)}, "
                                f"lora_up {tuple(up.shape)}; expected [r, in(, kh, kw)] and [out, r(, 1, 1)]")
        if up.dim() == 4 and up.shape[2:] != (1, 1):
            raise LoRAFileError(f"{source}: {name}.lora_up.weight must be 1x1, got {tuple(up.shape)}")

    @classmethod
    def file_rank(cls, tensors):
        return tensors["lora_down.weight"].shape[0]

    @classmethod
    def file_label(cls, tensors):
        down = tensors["lora_down.weight"]
        return "LoCon" if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1) else "LoRA"

    @classmethod
    def from_file(cls, base, weights, *, multiplier, source):
        return cls(base, weights.rank, weights.alpha, multiplier=multiplier, dora_wd=weights.dora_scale is not None)

    lowrank_file = True

    @classmethod
    def file_delta(cls, tensors, scale, base=None):
        """scale * up @ down (a kxk down followed by a 1x1 up is one kxk conv whose weight is this product)."""
        delta = tensors["lora_up.weight"].float().flatten(1) @ tensors["lora_down.weight"].float().flatten(1)
        return delta * scale

    def load_file(self, weights, source):
        """The file's alpha is folded into lora_up when this layer's differs (the product is what counts)."""
        down = fit_shape(weights.down, self.lora_down.weight.shape)
        up = fit_shape(weights.up, self.lora_up.weight.shape)
        if down is None or up is None:
            raise LoRAFileError(
                f"{source} has lora_down {tuple(weights.down.shape)} / lora_up {tuple(weights.up.shape)}, "
                f"expected {tuple(self.lora_down.weight.shape)} / {tuple(self.lora_up.weight.shape)} for this "
                f"model (a LoRA made for another base model?)")
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up.float() * (weights.alpha / self.alpha.item()))
            if self.scalar is not None:
                self.scalar.fill_(1.0)  # the file holds it folded into lora_up

    def file_tensors(self, dtype, file_alpha):
        """diffusers applies a file's most common alpha to every module: a plain LoRA module whose alpha differs
        from the network's is written with its scale folded into lora_up (up * alpha_m / alpha), which leaves
        alpha_m / r * up @ down unchanged. DoRA modules keep their own alpha, as LyCORIS writes them."""
        alpha = self.alpha.item()
        up = self.with_scalar(self.lora_up.weight.detach().float()).detach()  # LyCORIS folds the scalar into up
        if self.variant is None and alpha != file_alpha:
            up, alpha = up * (alpha / file_alpha), file_alpha
        return {"lora_down.weight": self.lora_down.weight.detach().to(dtype), "lora_up.weight": up.to(dtype),
                "alpha": torch.tensor(alpha, dtype=dtype)}

