"""`import dataset` from the repository root: the training data (LoRADataset, BucketBatchSampler, collate_fn).

The implementation is lora_diffusion/data/dataset.py, which is what an installed lora-diffusion provides.
"""

from lora_diffusion.data.dataset import *  # noqa: F401,F403
from lora_diffusion.data.dataset import __all__, vae_fingerprint  # noqa: F401
