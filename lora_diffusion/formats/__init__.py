"""Files: cloneofsimo/lora's `.pt` and safeloras files (cloneofsimo.py), writing any file all-or-nothing and
reading TOML (io.py), and the file errors (errors.py). The kohya / LyCORIS LoRA `.safetensors` is the adapters'
own format: lora_diffusion.core.kohya."""
