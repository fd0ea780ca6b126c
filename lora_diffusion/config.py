"""The old name of lora_diffusion.flag_file (flag files, --config_file / --output_config): the same module object."""

import sys

from . import flag_file

sys.modules[__name__] = flag_file
