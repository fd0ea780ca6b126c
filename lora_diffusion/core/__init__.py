"""The adapter core: the layers (adapters/, one module per algorithm and the table of them), which modules of a
U-Net / text encoder get one (targets.py), LoRANetwork over a model (network.py), and cloneofsimo/lora's injection
call shape on the same layers (inject.py)."""
