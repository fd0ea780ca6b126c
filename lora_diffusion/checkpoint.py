"""The old name of lora_diffusion.base_checkpoint (reading base-model checkpoint files): the same module object."""

import sys

from . import base_checkpoint

sys.modules[__name__] = base_checkpoint
