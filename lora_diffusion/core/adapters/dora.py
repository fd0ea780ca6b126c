"""DoRA (weight-decomposed LoRA, LyCORIS' `dora_wd=True`), the one variant every algorithm can take.

An AdapterLayer holds its variant in `layer.variant` (a DoRA, or None for the plain algorithm), in the way peft's
tuners/lora hold a LoraVariant: the algorithm computes its update dW as always, and the variant changes the few
places where DoRA differs: the magnitude it creates from the base weight (`init`), the weight the layer computes
with and merges (`merged_weight`, `delta`), the file tensor it adds (`file_tensors`) and the file tensor it reads
and checks (`check_file_tensor`, `load_file`), LyCORIS' wd_on_out=False axis included.

The magnitude stays the layer's own parameter `dora_scale` (so state dicts and optimizers see `<layer>.dora_scale`,
and files the key `<module>.dora_scale`); the variant holds no tensor.

    W' = (W + dW) * (multiplier * (m / |W + dW| - 1) + 1)       m = dora_scale, |.| per output row or input column
"""

import torch
from torch import nn

from lora_diffusion.formats.errors import LoRAFileError

FILE_KEY = "dora_scale"


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row, shaped [out, 1(, 1, 1)] (LyCORIS' dora_scale with wd_on_out=True)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each input column (over the output rows and the kernel), shaped [1, in(, 1, 1)]."""
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norms.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def dora_on_input(dora_scale: torch.Tensor, weight_shape) -> bool:
    """Whether a dora_scale is LyCORIS' wd_on_out=False kind, [1, in(, 1, 1)]: the norm per input column (over the
    output rows and kernel), which is what ComfyUI's weight_decompose computes; else it is [out, 1(, 1, 1)], the
    norm per output row (LyCORIS' default wd_on_out=True, peft's and the DoRA authors' magnitude)."""
    return len(weight_shape) >= 2 and weight_shape[0] != 1 and dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 \
        and dora_scale.numel() == weight_shape[1]


def dora_merged(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
                multiplier: float = 1.0) -> torch.Tensor:
    """The merged weight W' = (W + dW) * (multiplier * (m / |W + dW| - 1) + 1), m = dora_scale, dW the algorithm's
    update at multiplier 1. The norm is taken along the axis dora_scale has (see dora_on_input): per output row for
    [out, 1(, 1, 1)], the files this library writes, per input column for [1, in(, 1, 1)]. At multiplier 1 this is
    m * (W + dW) / |W + dW| (LyCORIS, ComfyUI and this library agree); at 0 it is W + dW, as in LyCORIS (ComfyUI
    blends W + s * (W' - W) instead)."""
    merged = weight + delta.reshape(weight.shape)
    norms = column_norms(merged) if dora_on_input(dora_scale, weight.shape) else row_norms(merged)
    scale = dora_scale.float().reshape(norms.shape) / (norms + torch.finfo(torch.float32).eps)
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return merged * scale


def fit_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The tensor in the given shape when they differ at most by trailing 1x1 dims (2-D files for 1x1 convs: LoRA's
    factors, DoRA's magnitude). Here, the leaf of the adapters, so that every algorithm can use it."""
    def squeeze(s):
        return tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)
    return tensor.reshape(shape) if squeeze(tensor.shape) == squeeze(shape) else None


class DoRA:
    """The DoRA variant of an AdapterLayer. `on_input`: the magnitude of a new layer is per input column
    ([1, in(, 1, 1)], LyCORIS' wd_on_out=False) instead of per output row ([out, 1(, 1, 1)], the default); a file's
    magnitude brings its own axis (load_file)."""

    label = "DoRA"
    file_key = FILE_KEY
    # DoRA at multiplier 0 is W + dW in LyCORIS' formula, not the base model: the layer still computes.
    inactive_at_zero = False

    def __init__(self, on_input: bool = False):
        self.on_input = bool(on_input)

    def __repr__(self) -> str:
        return f"DoRA(on_input={self.on_input})"

    # -- the layer ------------------------------------------------------------------------------------------

    def init(self, layer: nn.Module, base: nn.Module):
        """The magnitude from the base weight: `layer.dora_scale`, a parameter."""
        weight = base.weight.detach().float()
        layer.dora_scale = nn.Parameter(column_norms(weight) if self.on_input else row_norms(weight))

    def merged_weight(self, layer: nn.Module, multiplier: float = 1.0) -> torch.Tensor:
        """The layer's weight W' (see dora_merged), dW = layer.training_delta() (multiplier NOT applied to it)."""
        return dora_merged(layer.base.weight.float(), layer.training_delta(), layer.dora_scale, multiplier)

    def delta(self, layer: nn.Module, multiplier: float) -> torch.Tensor:
        """W' - W: what the layer adds to the base weight's output and what merging adds to the base weight (a
        function of the base weight: merging keeps it to take it back exactly)."""
        return self.merged_weight(layer, multiplier) - layer.base.weight.float()

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's output beside the base's: the base's op with W' - W."""
        return layer._weight_op(x, self.delta(layer, layer.multiplier))

    # -- the file -------------------------------------------------------------------------------------------

    def file_tensors(self, layer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The file tensor it adds after the algorithm's own: `dora_scale`, as LyCORIS writes it."""
        return {self.file_key: layer.dora_scale.detach().to(dtype)}

    @staticmethod
    def check_file_tensor(name: str, dora_scale: torch.Tensor, source: str):
        """LoRAFileError unless a file's dora_scale is one of LyCORIS' two shapes."""
        dims = dora_scale.dim() in (2, 4)
        per_output = dims and dora_scale.shape[1:].numel() == 1
        per_input = dims and dora_scale.shape[0] == 1 and dora_scale.shape[2:].numel() == 1
        if not (per_output or per_input):
            raise LoRAFileError(f"{source}: {name}.dora_scale is {tuple(dora_scale.shape)}; expected [out, 1(, 1, 1)] "
                                f"(LyCORIS' default wd_on_out=True) or [1, in(, 1, 1)] (wd_on_out=False)")

    def load_file(self, layer: nn.Module, dora_scale: torch.Tensor, source: str):
        """Copy a file's magnitude into the layer, taking the file's axis (a [1, in(, 1, 1)] one replaces the
        layer's parameter); LoRAFileError when it does not fit the base weight. `source` names the module."""
        own = layer.dora_scale
        self.on_input = dora_on_input(dora_scale, layer.base.weight.shape)  # LyCORIS' wd_on_out=False: [1, in, ...]
        if self.on_input:
            own = layer.dora_scale = nn.Parameter(torch.empty_like(dora_scale, dtype=torch.float32, device=own.device),
                                                  requires_grad=own.requires_grad)
        scale = fit_shape(dora_scale, own.shape)
        if scale is None:
            raise LoRAFileError(f"{source}.{self.file_key} is {tuple(dora_scale.shape)}, expected {tuple(own.shape)}")
        with torch.no_grad():
            own.copy_(scale)

    @staticmethod
    def file_delta(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
                   multiplier: float = 1.0) -> torch.Tensor:
        """A file module's update of the base weight `weight` (fp32), given the algorithm's update `delta` at
        multiplier 1 (any shape with weight's elements), shaped as `delta`."""
        return (dora_merged(weight, delta, dora_scale, multiplier) - weight).reshape(delta.shape)


def variant_of(dora_wd) -> DoRA | None:
    """A layer's own variant from an algorithm's `dora_wd=`: None for False, DoRA() for True, a copy of a given DoRA
    (one per layer: loading a file may change its axis)."""
    if isinstance(dora_wd, DoRA):
        return DoRA(on_input=dora_wd.on_input)
    return DoRA() if dora_wd else None
