"""python -m lora_diffusion ...: the same as the `lora-diffusion` command."""

import sys

from lora_diffusion.cli import main

sys.exit(main())
