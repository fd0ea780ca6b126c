"""Train a LoRA for Stable Diffusion: `python train_lora.py --flags` (kohya sd-scripts' flag names).

    python train_lora.py --config_file examples/quickstart/config.toml

The trainer is lora_diffusion/training/trainer.py (installed: `lora-diffusion train --flags`, the same flags); this
file runs it, and `import train_lora` gives its entry points.
"""

import sys

from lora_diffusion.training.trainer import (  # noqa: F401  the entry points of `import train_lora`
    TrainingError,
    build_parser,
    command,
    load_base_models,
    main,
    network_options,
    parse_args,
)

if __name__ == "__main__":
    sys.exit(command())
