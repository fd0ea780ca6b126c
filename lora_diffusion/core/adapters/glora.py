"""LyCORIS' GLoRA (lycoris/modules/glora.py; Chavan et al. 2023, "One-for-All: Generalized LoRA"): a low-rank
update of the base weight's input side plus an ordinary low-rank update.

    dW = (W @ a1 @ a2 + b1 @ b2) * alpha / r          W' = W + multiplier * dW

a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in(, kh, kw)] (convs: a1, a2, b1 are 1x1, [.., .., 1, 1]; W @ a1 @ a2
acts on W's input channels). File keys, LyCORIS': `a1.weight`, `a2.weight`, `b1.weight`, `b2.weight`, `alpha`.
Initialisation as LyCORIS: a1, b1 kaiming-uniform, a2 = b2 = 0, so a new layer changes nothing. The update depends
on the base weight: merging keeps it, to unmerge exactly. LyCORIS' Tucker GLoRA (`bm.weight`) is never made by
lycoris-lora 4.1.3 (its use_tucker test contradicts itself) and is not read here.
"""

import torch
from torch import nn

from lora_diffusion.formats.errors import LoRAFileError

from .base import TensorLayer, kaiming


class _Weight(nn.Module):
    """Holds one factor as `<name>.weight`, LyCORIS' key (its factors are nn.Linear / nn.Conv modules)."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(tensor.detach().float().clone())


class GLoRALayer(TensorLayer):
    kind = "glora"
    label = "GLoRA"
    file_keys = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight")
    detect_keys = ("a1.weight",)  # LyCORIS' weight_list_det
    delta_depends_on_base = True
    FACTORS = ("a1", "a2", "b1", "b2")
    OPTIONS = ("dropout", "use_scalar")  # refused (see __init__) rather than ignored

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, dora_wd: bool = False,
                 tensors: dict[str, torch.Tensor] | None = None, source: str = "GLoRA", use_scalar: bool = False):
        """`dropout`, `rank_dropout` and `dora_wd` are refused: LyCORIS' GLoRA ignores them outside bypass mode;
        `use_scalar` is not implemented for GLoRA here."""
        super().__init__()
        for option, value in (("dropout", dropout), ("rank_dropout", rank_dropout), ("dora_wd", dora_wd),
                              ("use_scalar", use_scalar)):
            if value:
                raise ValueError(f"GLoRA has no {option} here (LyCORIS' GLoRA ignores dropouts and DoRA outside "
                                 f"its bypass mode); got {option}={value!r}")
        in_dim, out_dim = self._check_base(base)
        kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
        one = (1, 1) if kernel else ()
        if tensors is None:
            if rank < 1:
                raise ValueError(f"GLoRA rank must be >= 1, got {rank}")
            tensors = {"a1.weight": kaiming(in_dim, rank, *one), "a2.weight": torch.zeros(rank, in_dim, *one),
                       "b1.weight": kaiming(out_dim, rank, *one), "b2.weight": torch.zeros(rank, in_dim, *kernel)}
        rank = tensors["a2.weight"].shape[0]
        expected = {"a1.weight": (in_dim, rank, *one), "a2.weight": (rank, in_dim, *one),
                    "b1.weight": (out_dim, rank, *one), "b2.weight": (rank, in_dim, *kernel)}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            raise ValueError(f"{source}: GLoRA tensors {got} do not fit {type(base).__name__} "
                             f"{tuple(base.weight.shape)}: expected {expected}")
        for name in self.FACTORS:
            setattr(self, name, _Weight(tensors[f"{name}.weight"]))
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self._finish_init(base, rank, alpha, multiplier=multiplier, dropout=0.0, rank_dropout=0.0,
                          module_dropout=module_dropout)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": getattr(self, name).weight for name in self.FACTORS}

    def delta_weight(self) -> torch.Tensor:
        return glora_delta(self.base.weight, self._tensors()) * self.scaling

    @classmethod
    def file_delta(cls, tensors, scale, base=None):
        if base is None:
            raise ValueError("a GLoRA module's update W @ a1 @ a2 + b1 @ b2 needs the base weight W")
        delta = glora_delta(base, tensors) * scale
        return delta.reshape(delta.shape[0], -1)

    def training_delta(self) -> torch.Tensor:
        return self.delta_weight()

    def max_norm_factors(self):
        return None  # W @ a1 @ a2 + b1 @ b2 is no product of its factors; LyCORIS' GLoRA has no max norm either

    # -- the file: LyCORIS' keys ----------------------------------------------------------------------------------

    @classmethod
    def check_file_tensors(cls, name, tensors, source):
        if "bm.weight" in tensors:
            raise LoRAFileError(f"{source}: module {name} is a Tucker GLoRA (bm.weight), which is not supported")
        need = [f"{n}.weight" for n in cls.FACTORS]
        if sorted(tensors) != sorted(need):
            raise LoRAFileError(f"{source}: module {name} has {', '.join(sorted(tensors))}; a GLoRA module has "
                                f"{', '.join(need)} (and alpha)")
        a1, a2, b1, b2 = (tensors[k] for k in need)
        rank = a2.shape[0]
        if a1.dim() != a2.dim() or a1.shape[1] != rank or b1.shape[1] != rank or b2.shape[0] != rank or \
                a1.shape[0] != a2.shape[1] or b2.shape[1] != a2.shape[1]:
            raise LoRAFileError(f"{source}: module {name} has GLoRA tensors whose shapes do not fit together "
                                f"(a1 {tuple(a1.shape)}, a2 {tuple(a2.shape)}, b1 {tuple(b1.shape)}, "
                                f"b2 {tuple(b2.shape)}): expected a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in]")

    @classmethod
    def file_rank(cls, tensors):
        return tensors["a2.weight"].shape[0]


def glora_delta(base: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """W @ a1 @ a2 + b1 @ b2 in fp32, unscaled, shaped like W (a1 @ a2 acts on W's input channels; a conv keeps its
    kernel axes)."""
    weight = base.float()
    out_dim, in_dim = weight.shape[:2]
    rank = tensors["a2.weight"].shape[0]
    a1 = tensors["a1.weight"].float().reshape(in_dim, rank)
    a2 = tensors["a2.weight"].float().reshape(rank, in_dim)
    wa = torch.einsum("oi...,ij->oj...", weight, a1 @ a2)
    wb = tensors["b1.weight"].float().reshape(out_dim, rank) @ tensors["b2.weight"].float().reshape(rank, -1)
    return wa + wb.reshape(weight.shape)
