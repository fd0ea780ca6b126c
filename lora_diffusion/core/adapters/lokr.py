"""LyCORIS' LoKr (lycoris/modules/lokr.py): a Kronecker product of two factors, each full or low-rank, with
LyCORIS' parameter names, shapes (its `factorization`), initialisation and scale, so the state dict is LyCORIS' file
keys (`lokr_w1`, `lokr_w1_a`, ..., `lokr_t2`, `alpha`).

    dW = kron(w1, w2) * alpha / r, w1 = w1_a @ w1_b or full, w2 = w2_a @ w2_b or full; scale 1 when both full
"""

import math

import torch
from torch import nn

from .base import TensorLayer, check_product_tensors, kaiming, tucker


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: m = factor when it divides the dimension, else the most balanced
    split whose smaller part is at most `factor` (-1: no limit). LyCORIS' rule, which fixes LoKr's shapes.
    LyCORIS takes any other value silently (0 gives 1 x dimension, a LoKr with a 1x1 w1); here it is refused."""
    check_factor(factor)
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def check_factor(factor) -> int:
    """LoKr's `factor` as an int: -1 (the most balanced split) or a whole number >= 1."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor != int(factor) or \
            not (factor == -1 or factor >= 1):
        raise ValueError(f"LoKr factor={factor!r}: expected -1 (the most balanced split of each dimension) or a whole "
                         f"number >= 1 (the size of w1's side where it divides the dimension, e.g. 8)")
    return int(factor)


class LoKrLayer(TensorLayer):
    kind = "lokr"
    label = "LoKr"
    file_keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    detect_keys = file_keys
    OPTIONS = ("factor", "decompose_both", "use_tucker", "full_matrix", "use_scalar", "rank_dropout_scale")
    PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, factor: int = -1,
                 decompose_both: bool = False, use_tucker: bool = False, full_matrix: bool = False,
                 dora_wd: bool = False, tensors: dict[str, torch.Tensor] | None = None, source: str = "LoKr",
                 use_scalar: bool = False, rank_dropout_scale: bool = False):
        super().__init__()
        in_dim, out_dim = self._check_base(base)
        kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
        if tensors is None:
            if rank < 1:
                raise ValueError(f"LoKr rank must be >= 1, got {rank}")
            tensors = self._init(rank, in_dim, out_dim, kernel, int(factor), decompose_both,
                                 use_tucker and math.prod(kernel) > 1, full_matrix)
            if use_scalar:  # LyCORIS: the scalar starts at 0 instead of w2 (or w2_b)
                zero = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_b"
                tensors[zero] = kaiming(*tensors[zero].shape)
        self._finish_tensor_init(base, tensors, lokr_rank(tensors) or rank, alpha, source, multiplier=multiplier,
                                 dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                                 dora_wd=dora_wd, use_scalar=use_scalar, rank_dropout_scale=rank_dropout_scale)

    @property
    def scaling(self) -> float:
        """alpha / rank, or 1 when w1 and w2 are both full matrices (LyCORIS ignores alpha then)."""
        return 1.0 if self.lokr_w1 is not None and self.lokr_w2 is not None else self._alpha_value / self.rank

    @staticmethod
    def _init(rank, in_dim, out_dim, kernel, factor, decompose_both, use_tucker, full_matrix):
        """LyCORIS' shapes: out = a * b, in = c * d (factorization), w1 [a, c], w2 [b, d(, k, k)]. w1 is
        decomposed only with decompose_both and rank < max(a, c) / 2, w2 whenever rank < max(b, d) / 2."""
        c, d = factorization(in_dim, factor)
        a, b = factorization(out_dim, factor)
        t = {}
        if decompose_both and rank < max(a, c) / 2 and not full_matrix:
            t["lokr_w1_a"], t["lokr_w1_b"] = kaiming(a, rank), kaiming(rank, c)
        else:
            t["lokr_w1"] = kaiming(a, c)
        if rank >= max(b, d) / 2 or full_matrix:
            t["lokr_w2"] = torch.zeros(b, d, *kernel)  # zero: the first update is 0
        elif use_tucker:
            t["lokr_t2"] = kaiming(rank, rank, *kernel)
            t["lokr_w2_a"], t["lokr_w2_b"] = kaiming(rank, b), torch.zeros(rank, d)
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = kaiming(b, rank), torch.zeros(rank, d * math.prod(kernel))
        return t

    def scalar_key(self):
        return "lokr_w1" if self.lokr_w1 is not None else "lokr_w1_a"

    @staticmethod
    def product(tensors):
        return kron_product(tensors)

    @classmethod
    def check_file_tensors(cls, name, tensors, source):
        need = ["lokr_w1"] if "lokr_w1" in tensors else ["lokr_w1_a", "lokr_w1_b"]
        need += ["lokr_w2"] if "lokr_w2" in tensors else ["lokr_w2_a", "lokr_w2_b"] + (
            ["lokr_t2"] if "lokr_t2" in tensors else [])
        check_product_tensors(name, tensors, source, need=need, product=kron_product, kind="LoKr",
                              expected="lokr_w1 or lokr_w1_a + lokr_w1_b, and lokr_w2 or lokr_w2_a + lokr_w2_b "
                                       "(+ lokr_t2)")

    @classmethod
    def file_rank(cls, tensors):
        """1 for a LoKr whose factors are both full (its scale is then 1)."""
        return lokr_rank(tensors) or 1

    @classmethod
    def file_scale(cls, tensors, alpha):
        return 1.0 if lokr_rank(tensors) is None else alpha / lokr_rank(tensors)


def kron_product(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(w1, w2) in fp32, without the scale; a conv's w1 [a, c] spreads over w2's kernel dims."""
    t = {k: v.float() for k, v in t.items()}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    # contiguous: torch.kron views its inputs, and a Tucker w2 (an einsum) is not
    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim())), w2.contiguous())


def lokr_rank(t: dict[str, torch.Tensor]) -> int | None:
    """The rank of a LoKr's decomposed factors; None when w1 and w2 are both full (then the scale is 1)."""
    if "lokr_t2" in t:
        return t["lokr_t2"].shape[0]
    for key in ("lokr_w1_a", "lokr_w2_a"):
        if key in t:
            return t[key].shape[1]
    return None
