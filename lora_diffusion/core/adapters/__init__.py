"""The adapter algorithms, one module each, and the one table of them (LyCORIS' modules/ pattern).

Each algorithm is an AdapterLayer subclass that declares its name (`kind`, the `algo=` value and
ModuleWeights.algo), its file keys (`file_keys`), the keys that identify it in a file (`detect_keys`), how it checks
a file module (`check_file_tensors`), reads its rank and scale (`file_rank`, `file_scale`), is built for one
(`from_file`), loads one (`load_file`) and writes itself (`file_tensors`), and which create_network options it takes
(`OPTIONS`). kohya.parse_state_dict, network.load_network / create_network / save_weights go through this table
only, so a new algorithm is one module and one line below.

    lora   LoRA, LoCon (kohya networks.lora; LyCORIS locon)     lora.py
    loha   LoHa (LyCORIS)                                         loha.py
    lokr   LoKr (LyCORIS)                                         lokr.py
    ia3    iA3 (LyCORIS)                                          ia3.py
    glora  GLoRA (LyCORIS)                                        glora.py
    dylora DyLoRA (LyCORIS algo=dylora, kohya networks.dylora)    dylora.py (its files are LoRA files)

and DoRA (dora.py), not an algorithm but the variant any layer may hold (`layer.variant`, LyCORIS' dora_wd=True):
its magnitude `dora_scale` changes the weight the algorithm's update makes, its merging and its file.
    norm   trained norm layers (LyCORIS train_norm=True)          norm.py (beside any algo=, not one itself)
"""

from .base import (
    AdapterLayer,
    TensorLayer,
    column_norms,
    dora_merged,
    dora_on_input,
    freeze_base,
    in_dtype_of,
    kaiming,
    row_norms,
    tucker,
)
from .dora import DoRA
from .dylora import DyLoRALayer
from .glora import GLoRALayer
from .ia3 import IA3Layer
from .loha import LoHaLayer, loha_product
from .lokr import LoKrLayer, check_factor, factorization, kron_product, lokr_rank
from .lora import LoRALayer
from .norm import NormLayer

ALGORITHMS: dict[str, type[AdapterLayer]] = {cls.kind: cls for cls in (LoRALayer, LoHaLayer, LoKrLayer, IA3Layer,
                                                                      GLoRALayer, DyLoRALayer, NormLayer)}
ALIASES = {"locon": "lora"}  # LyCORIS' algo=locon is the LoRA layer on convs too (its targets always have them)


def algorithm(name: str) -> type[AdapterLayer]:
    """The layer class of an `algo=` name (case-insensitive; `locon` is `lora`)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ALGORITHMS or not ALGORITHMS[key].creatable:
        raise ValueError(f"algo={name!r} is not supported; use one of {', '.join(algo_names())}")
    return ALGORITHMS[key]


def algo_names() -> list[str]:
    return [*(name for name, cls in ALGORITHMS.items() if cls.creatable), *ALIASES]


def file_keys() -> set[str]:
    """Every key after `<module>.` that some algorithm reads, with the shared `alpha` and DoRA's `dora_scale`."""
    return {key for cls in ALGORITHMS.values() for key in cls.file_keys} | {"alpha", DoRA.file_key}


def detect(keys) -> list[type[AdapterLayer]]:
    """The algorithms whose identifying keys a module's keys hold (a well-formed module has exactly one)."""
    return [cls for cls in ALGORITHMS.values() if any(k in keys for k in cls.detect_keys)]


__all__ = ["ALGORITHMS", "AdapterLayer", "DoRA", "DyLoRALayer", "GLoRALayer", "IA3Layer", "LoHaLayer", "LoKrLayer",
           "LoRALayer", "NormLayer", "TensorLayer", "algorithm", "algo_names", "detect", "file_keys", "freeze_base",
           # the algorithms' shared math
           "check_factor", "factorization", "in_dtype_of", "kaiming", "kron_product", "loha_product", "lokr_rank",
           "row_norms", "tucker", "column_norms", "dora_merged", "dora_on_input"]
