"""LyCORIS' LoHa (lycoris/modules/loha.py): the Hadamard product of two low-rank products, with LyCORIS' parameter
names, shapes, initialisation and scale, so the state dict is LyCORIS' file keys (`hada_w1_a`, ..., `alpha`).

    dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r          (Tucker convs: each product is tucker(t, w_a, w_b))

The forward builds the full update weight (a Hadamard product has no cheap input-side form).
"""

import math

import torch
from torch import nn

from .base import TensorLayer, check_product_tensors, tucker


class LoHaLayer(TensorLayer):
    kind = "loha"
    label = "LoHa"
    file_keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    detect_keys = file_keys
    OPTIONS = ("use_tucker", "use_scalar", "rank_dropout_scale")
    PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, multiplier: float = 1.0,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 use_tucker: bool = False, dora_wd: bool = False, tensors: dict[str, torch.Tensor] | None = None,
                 source: str = "LoHa", use_scalar: bool = False, rank_dropout_scale: bool = False):
        super().__init__()
        in_dim, out_dim = self._check_base(base)
        kernel = tuple(base.kernel_size) if isinstance(base, nn.Conv2d) else ()
        if tensors is None:
            if rank < 1:
                raise ValueError(f"LoHa rank must be >= 1, got {rank}")
            tensors = self._init(rank, in_dim, out_dim, kernel, use_tucker and math.prod(kernel) > 1)
            if use_scalar:  # LyCORIS: the scalar starts at 0 instead of w2_a
                tensors["hada_w2_a"] = torch.randn_like(tensors["hada_w2_a"]) * 0.1
        self._finish_tensor_init(base, tensors, tensors["hada_w1_b"].shape[0], alpha, source, multiplier=multiplier,
                                 dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                                 dora_wd=dora_wd, use_scalar=use_scalar, rank_dropout_scale=rank_dropout_scale)

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

    def scalar_key(self):
        return "hada_w1_a"

    @staticmethod
    def product(tensors):
        return loha_product(tensors)

    @classmethod
    def check_file_tensors(cls, name, tensors, source):
        tucker_keys = ["hada_t1", "hada_t2"] if "hada_t1" in tensors or "hada_t2" in tensors else []
        check_product_tensors(name, tensors, source, need=["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] +
                              tucker_keys, product=loha_product, kind="LoHa",
                              expected="hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (+ hada_t1, hada_t2 for Tucker)")

    @classmethod
    def file_rank(cls, tensors):
        return tensors["hada_w1_b"].shape[0]


def loha_product(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """(w1_a @ w1_b) * (w2_a @ w2_b), or with hada_t1/hada_t2 the Tucker form, in fp32, without the scale."""
    t = {k: v.float() for k, v in t.items()}
    if "hada_t1" in t:
        return tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]) * tucker(t["hada_t2"], t["hada_w2_a"],
                                                                           t["hada_w2_b"])
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
