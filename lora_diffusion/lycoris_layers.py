"""LyCORIS' LoHa and LoKr under their first import path; they live in lora_diffusion/adapters/ (loha.py, lokr.py;
iA3 in ia3.py), one module per algorithm."""

from .adapters import ALGORITHMS
from .adapters.base import TensorLayer, kaiming, tucker
from .adapters.loha import LoHaLayer, loha_product
from .adapters.lokr import LoKrLayer, check_factor, factorization, kron_product, lokr_rank

_LycorisLayer = TensorLayer
_kaiming = kaiming
LAYER_CLASSES = {name: cls for name, cls in ALGORITHMS.items() if name != "lora"}

__all__ = ["LoHaLayer", "LoKrLayer", "check_factor", "factorization", "kron_product", "loha_product", "lokr_rank",
           "tucker", "LAYER_CLASSES"]
