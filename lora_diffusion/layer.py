"""LoRALayer and AdapterLayer under their first import path; they live in lora_diffusion/adapters/ (base.py: what
every algorithm shares, lora.py: LoRA/LoCon), one module per algorithm."""

from .adapters.base import AdapterLayer, _refresh_alpha, freeze_base, in_dtype_of, row_norms
from .adapters.lora import LoRALayer

_row_norms = row_norms
_in_dtype_of = in_dtype_of

__all__ = ["AdapterLayer", "LoRALayer", "freeze_base", "_refresh_alpha"]
