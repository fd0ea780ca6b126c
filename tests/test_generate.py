"""`lora-diffusion generate`: base model + LoRA files with multipliers -> images."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_diffusion import create_network
from lora_diffusion.cli import main
from lora_diffusion.models import load_models
from lora_diffusion.tools.generate import generate, parse_lora_spec


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


def test_lora_spec_errors():
    for spec, message in (("a.safetensors:abc", "multiplier 'abc' is not a number"),
                          ("a.safetensors:", "multiplier '' is not a number"),
                          ("a.safetensors:nan", "finite number, got nan"), ("a.safetensors:-inf", "got -inf"),
                          ("a.safetensors:1e400", "got inf")):
        with pytest.raises(ValueError, match=message):
            parse_lora_spec(spec)


def test_a_colon_in_an_existing_file_name_is_not_a_multiplier(tmp_path):
    path = tmp_path / "style:v2.safetensors"
    path.write_bytes(b"")
    assert parse_lora_spec(str(path)) == (str(path), 1.0)


def test_generate_refuses_non_finite_multipliers_and_weights(tmp_path, capsys):
    models = load_models("builtin:tiny")
    network = create_network(models.unet, models.text_encoder, rank=2, alpha=2)
    lora = tmp_path / "l.safetensors"
    network.save_weights(lora)
    tensors = load_file(str(lora))
    name = next(k for k in tensors if k.endswith("lora_down.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    base = ["generate", "--model", "builtin:tiny", "--prompt", "x", "--width", "64", "--height", "64",
            "--out", str(tmp_path / "out")]
    assert main([*base, "--lora", f"{lora}:abc"]) == 2
    error = capsys.readouterr().err
    assert "multiplier 'abc' is not a number" in error and "not found" not in error
    for multiplier in ("nan", "inf"):
        assert main([*base, "--lora", f"{lora}:{multiplier}"]) == 2
        assert f"got {multiplier}" in capsys.readouterr().err
    assert main([*base, "--lora", str(tmp_path / "nan.safetensors")]) == 2
    error = capsys.readouterr().err
    assert f"{tmp_path / 'nan.safetensors'}: {name} holds NaN or infinite values" in error
    with pytest.raises(ValueError, match="finite number"):  # the function checks too
        generate("builtin:tiny", [(str(lora), float("nan"))], [{"prompt": "x"}], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing drawn


def test_generate_region_over_the_whole_image_draws_its_prompt(tmp_path, capsys):
    base = ["generate", "--model", "builtin:tiny", "--width", "64", "--height", "64", "--steps", "3"]
    assert main([*base, "--prompt", "toy, a blue square --d 5", "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--prompt", "toy, a red circle --d 5", "--region", "toy, a blue square@0,0,1,1",
                 "--out", str(tmp_path / "region")]) == 0
    assert main([*base, "--prompt", "toy, a red circle --d 5", "--out", str(tmp_path / "global")]) == 0
    assert np.array_equal(pixels(tmp_path / "region"), pixels(tmp_path / "plain"))
    assert not np.array_equal(pixels(tmp_path / "global"), pixels(tmp_path / "plain"))
    assert main([*base, "--prompt", "x", "--region", "a star@0,0,2,1", "--out", str(tmp_path / "bad")]) == 2
    assert "--region 'a star@0,0,2,1': the box needs four fractions between 0 and 1" in capsys.readouterr().err
