"""LyCORIS' LoHa and LoKr as AdapterLayers (same contract as LoRALayer: wrap, apply_to, merge, delta_weight).

Parameter names, shapes, initialisation and scale rules are LyCORIS' (lycoris/modules/loha.py, lokr.py), so the
state dicts are LyCORIS' file keys: `hada_w1_a`, ..., `lokr_w1`, ..., `alpha`, `dora_scale`.

    LoHa:  dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r          (elementwise product of two rank-r products)
    LoKr:  dW = kron(w1, w2) * alpha / r, w1 = w1_a @ w1_b or full, w2 = w2_a @ w2_b or full; scale 1 when both full

Both build the full update weight in the forward (a Hadamard or Kronecker product has no cheap input-side form).
"""

import math

import torch
from torch import nn

from .layer import AdapterLayer


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W[p, q, k...] = sum_ij core[i, j, k...] a[i, p] b[j, q]: a kxk conv weight from a [r, r, k, k] core and
    [r, out] / [r, in] factors (LyCORIS' rebuild_tucker)."""
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


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


class _LycorisLayer(AdapterLayer):
    """Parameters by name, made either by the algorithm's init or from given tensors (a file's)."""

    PARAMS: tuple[str, ...] = ()

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
        return self._raw_delta().reshape(self.base.weight.shape) * self.scaling


class LoHaLayer(_LycorisLayer):
    kind = "loha"
    PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 use_tucker: bool = False, dora_wd: bool = False, tensors: dict[str, torch.Tensor] | None = None,
                 source: str = "LoHa"):
        super().__init__()
        in_dim, out_dim = self._check_base(base)
        kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
        if tensors is None:
            if rank < 1:
                raise ValueError(f"LoHa rank must be >= 1, got {rank}")
            tensors = self._init(rank, in_dim, out_dim, kernel, use_tucker and math.prod(kernel) > 1)
        rank = tensors["hada_w1_b"].shape[0]
        self._set_params(tensors)
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self._finish_init(base, rank, alpha, multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                          module_dropout=module_dropout, dora_wd=dora_wd)
        self._check_shape(source)

    @staticmethod
    def _init(rank, in_dim, out_dim, kernel, use_tucker) -> dict[str, torch.Tensor]:
        # LyCORIS' init: w2_a = 0, so the first update is 0 while w1 and the rest carry gradient.
        if use_tucker:
            t = {"hada_t1": torch.randn(rank, rank, *kernel) * 0.1, "hada_t2": torch.randn(rank, rank, *kernel) * 0.1,
                 "hada_w1_a": torch.randn(rank, out_dim) * 0.1, "hada_w1_b": torch.randn(rank, in_dim),
                 "hada_w2_a": torch.zeros(rank, out_dim), "hada_w2_b": torch.randn(rank, in_dim)}
            return t
        flat_in = in_dim * math.prod(kernel)
        return {"hada_w1_a": torch.randn(out_dim, rank) * 0.1, "hada_w1_b": torch.randn(rank, flat_in),
                "hada_w2_a": torch.zeros(out_dim, rank), "hada_w2_b": torch.randn(rank, flat_in)}

    @property
    def use_tucker(self) -> bool:
        return self.hada_t1 is not None

    def _raw_delta(self) -> torch.Tensor:
        return loha_product(self._tensors())


class LoKrLayer(_LycorisLayer):
    kind = "lokr"
    PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0, factor: int = -1,
                 decompose_both: bool = False, use_tucker: bool = False, full_matrix: bool = False,
                 dora_wd: bool = False, tensors: dict[str, torch.Tensor] | None = None, source: str = "LoKr"):
        super().__init__()
        in_dim, out_dim = self._check_base(base)
        kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
        if tensors is None:
            if rank < 1:
                raise ValueError(f"LoKr rank must be >= 1, got {rank}")
            tensors = self._init(rank, in_dim, out_dim, kernel, int(factor), decompose_both,
                                 use_tucker and math.prod(kernel) > 1, full_matrix)
        self._set_params(tensors)
        rank = lokr_rank(tensors) or rank
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self._finish_init(base, rank, alpha, multiplier=multiplier, dropout=dropout, rank_dropout=rank_dropout,
                          module_dropout=module_dropout, dora_wd=dora_wd)
        self._check_shape(source)

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
            t["lokr_w1_a"], t["lokr_w1_b"] = _kaiming(a, rank), _kaiming(rank, c)
        else:
            t["lokr_w1"] = _kaiming(a, c)
        if rank >= max(b, d) / 2 or full_matrix:
            t["lokr_w2"] = torch.zeros(b, d, *kernel)  # zero: the first update is 0
        elif use_tucker:
            t["lokr_t2"] = _kaiming(rank, rank, *kernel)
            t["lokr_w2_a"], t["lokr_w2_b"] = _kaiming(rank, b), torch.zeros(rank, d)
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = _kaiming(b, rank), torch.zeros(rank, d * math.prod(kernel))
        return t

    def _raw_delta(self) -> torch.Tensor:
        return kron_product(self._tensors())


def loha_product(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """(w1_a @ w1_b) * (w2_a @ w2_b), or with hada_t1/hada_t2 the Tucker form, in fp32, without the scale."""
    t = {k: v.float() for k, v in t.items()}
    if "hada_t1" in t:
        return tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * tucker(t["hada_t2"], t["hada_w2_a"],
                                                                           t["hada_w2_b"])
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])


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
    return torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim())), w2)


def lokr_rank(t: dict[str, torch.Tensor]) -> int | None:
    """The rank of a LoKr's decomposed factors; None when w1 and w2 are both full (then the scale is 1)."""
    if "lokr_t2" in t:
        return t["lokr_t2"].shape[0]
    for key in ("lokr_w1_a", "lokr_w2_a"):
        if key in t:
            return t[key].shape[1]
    return None


def _kaiming(*shape) -> torch.Tensor:
    tensor = torch.empty(*shape)
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensor


LAYER_CLASSES = {"loha": LoHaLayer, "lokr": LoKrLayer}
