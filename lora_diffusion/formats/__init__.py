"""Files: the kohya / LyCORIS LoRA `.safetensors` (kohya.py), cloneofsimo/lora's `.pt` and safeloras files
(cloneofsimo.py), and writing any file all-or-nothing (io.py)."""
