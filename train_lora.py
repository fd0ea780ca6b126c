"""Train a LoRA for Stable Diffusion: `python train_lora.py --flags` (kohya sd-scripts' flag names).

    python train_lora.py --config_file examples/quickstart/config.toml

The trainer is lora_diffusion/train.py (installed: `lora-diffusion train --flags`, the same flags). Run, this file
starts it; imported (`import train_lora`), it is that module object itself, so its functions and a test's
monkeypatch are the trainer's.
"""

import sys

import lora_diffusion.train

if __name__ == "__main__":
    sys.exit(lora_diffusion.train.command())
sys.modules[__name__] = lora_diffusion.train
