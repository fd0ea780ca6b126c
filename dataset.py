"""`import dataset` from the repository root: the training data (LoRADataset, BucketBatchSampler, collate_fn).

The implementation is lora_diffusion/data/dataset.py, which is what an installed lora-diffusion provides; this file
gives its public names (a monkeypatch belongs on lora_diffusion.data.dataset, which the trainer reads).
"""

from lora_diffusion.data import dataset as _implementation

globals().update({name: value for name, value in vars(_implementation).items() if not name.startswith("_")})
__all__ = _implementation.__all__
