"""`import dataset` from the repository root: the training data (LoRADataset, BucketBatchSampler, collate_fn).

The implementation is lora_diffusion/dataset.py, which is what an installed lora-diffusion provides; this file makes
`import dataset` that same module object (not a copy), so a subclass or a test's monkeypatch of `dataset.X` is seen
by the trainer too.
"""

import sys

import lora_diffusion.dataset

sys.modules[__name__] = lora_diffusion.dataset
