"""`lora-diffusion generate`: base model + LoRA files with multipliers -> images."""

import numpy as np
import torch
from PIL import Image

from lora_diffusion import create_network
from lora_diffusion.cli import main
from lora_diffusion.generate import parse_lora_spec
from lora_diffusion.models import load_models


def test_lora_spec_parsing():
    assert parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_spec("dir/a.safetensors:0.6") == ("dir/a.safetensors", 0.6)
    assert parse_lora_spec("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)


def pixels(folder):
    [path] = sorted(folder.glob("*.png"))
    return np.asarray(Image.open(path), dtype=np.int16)


def test_generate_applies_loras_with_their_multipliers(tmp_path):
    models = load_models("builtin:tiny")
    network = create_network(models.unet, models.text_encoder, rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    network.save_weights(tmp_path / "l.safetensors")

    prompt = ["--prompt", "toy, a red circle --d 3 --s 2", "--width", "64", "--height", "64"]
    runs = {"base": [], "zero": ["--lora", f"{tmp_path / 'l.safetensors'}:0"],
            "full": ["--lora", str(tmp_path / "l.safetensors")],
            "merged": ["--lora", str(tmp_path / "l.safetensors"), "--merge"]}
    images = {}
    for name, extra in runs.items():
        assert main(["generate", "--model", "builtin:tiny", *prompt, *extra, "--out", str(tmp_path / name)]) == 0
        images[name] = pixels(tmp_path / name)
    assert images["base"].shape == (64, 64, 3)
    assert np.array_equal(images["zero"], images["base"])
    assert np.abs(images["full"] - images["base"]).max() > 0
    assert np.abs(images["merged"] - images["full"]).max() <= 2


def test_generate_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", "builtin:tiny", "--out", str(tmp_path)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--model", "builtin:tiny", "--prompt", "x", "--lora", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
