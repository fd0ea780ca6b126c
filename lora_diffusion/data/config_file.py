"""The old name of lora_diffusion.data.dataset_config (kohya's dataset config file): the same module object."""

import sys

from . import dataset_config

sys.modules[__name__] = dataset_config
