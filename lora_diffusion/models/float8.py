"""kohya's --fp8_base / --fp8_base_unet: the frozen base's nn.Linear and nn.Conv2d weights stored in float8
(e4m3, a quarter of fp32's bytes, half of bf16's) and upcast to the input's dtype at each call. The LoRA layers
wrap these modules as before and keep their own weights in the training dtype. The U-Net's first convolution
stays as it was: diffusers reads a model's dtype from its first parameter (pipelines make their latents in it)."""

import types

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8 = torch.float8_e4m3fn


def _linear(self, x):
    return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _conv2d(self, x):
    return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def store_in_float8(model: nn.Module, *, keep=()) -> int:
    """Each nn.Linear / nn.Conv2d of `model` (but the modules named in `keep`) keeps its weight in float8 and
    upcasts it per call; returns how many. Frozen weights only: call it before the LoRA is created."""
    count = 0
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Conv2d) or name in keep:
            continue
        module.weight.requires_grad_(False)
        module.weight.data = module.weight.data.to(FLOAT8)
        module.forward = types.MethodType(_linear if type(module) is nn.Linear else _conv2d, module)
        count += 1
    return count
