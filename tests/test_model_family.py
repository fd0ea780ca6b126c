"""The model family as an object (lora_diffusion/models/family.py): recognised from a name, a folder's layout or a
file's tensor names; a new family is one registered class that load_models dispatches to; the validation images
are resized with their subset's --resize_interpolation."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_diffusion.models import FAMILIES, ModelFamily, ModelLoadError, detect_family, load_models
from lora_diffusion.models.family import register


def test_families_are_recognised_from_names_folders_and_file_headers(tmp_path):
    assert detect_family("builtin:tiny").name == detect_family("builtin:mini").name == "sd"
    assert detect_family("builtin:tiny-xl").name == "sdxl"
    for layout, expected in ((("unet", "text_encoder"), "sd"), (("unet", "text_encoder", "text_encoder_2"), "sdxl")):
        folder = tmp_path / "-".join(layout)
        for part in layout:
            (folder / part).mkdir(parents=True)
        assert detect_family(folder).name == expected
    xl = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": torch.zeros(2)}, str(xl))
    sd = tmp_path / "sd.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(2)}, str(sd))
    assert detect_family(xl).name == "sdxl" and detect_family(sd).name == "sd"
    assert detect_family(tmp_path / "model.ckpt").name == "sd"  # unread: the fallback family, whose loader names it
    xl_family, sd_family = FAMILIES["sdxl"], FAMILIES["sd"]
    assert (xl_family.default_resolution, xl_family.bucket_range) == (1024, (512, 2048))  # kohya's SDXL defaults
    assert (sd_family.default_resolution, sd_family.bucket_range) == (512, (256, 1024))


def test_a_new_family_is_one_registered_class(monkeypatch):
    monkeypatch.setattr("lora_diffusion.models.family.FAMILIES", dict(FAMILIES))  # registered for this test only
    loaded = []

    @register
    class Toy(ModelFamily):
        name, title, builtin_names = "toy", "Toy", ("builtin:toy",)

        def load_builtin(self, name, **options):
            loaded.append((name, options["dtype"]))
            return load_models("builtin:tiny")

    models = load_models("builtin:toy", dtype=torch.float32)
    assert loaded == [("builtin:toy", torch.float32)] and models.name == "builtin:tiny"
    with pytest.raises(ModelLoadError, match="SD1.x/2.x/SDXL/Toy checkpoint, .*builtin:tiny-xl or builtin:toy"):
        load_models("/nonexistent/model")


def test_validation_images_are_resized_with_their_subsets_interpolation(tmp_path):
    from lora_diffusion.data.dataset import LoRADataset
    from lora_diffusion.models import build_tiny_models
    from lora_diffusion.training.trainer import held_out_images
    from lora_diffusion.training.validation import build_validation_set

    folder = tmp_path / "data" / "1_toy"
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 x 64: resized to 96 x 64
    for i in range(2):
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("toy")
    dataset = LoRADataset(tmp_path / "data", resolution=32, resize_interpolation="nearest")
    args = argparse.Namespace(validation_split=0.5, validation_seed=0, validation_data_dir=None)
    entries, interpolations = held_out_images(args, dataset)
    assert len(entries) == 1 and interpolations == ["nearest"]
    vae = build_tiny_models().vae
    ours = build_validation_set(entries, vae, seed=0, device="cpu", dtype=torch.float32,
                                interpolations=interpolations).latents[0]
    # independently: Pillow's nearest resize to cover the 32 x 32 bucket, the center window, the VAE's mean
    (entry,) = entries
    bucket = entry.bucket
    scale = max(bucket[0] / 96, bucket[1] / 64)
    size = (max(bucket[0], round(96 * scale)), max(bucket[1], round(64 * scale)))
    left, top = (size[0] - bucket[0]) // 2, (size[1] - bucket[1]) // 2
    window = Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST).crop(
        (left, top, left + bucket[0], top + bucket[1]))
    image = torch.from_numpy(np.asarray(window).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = vae.encode(image).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    default = build_validation_set(entries, vae, seed=0, device="cpu", dtype=torch.float32).latents[0]
    assert (default - expected).abs().max() > 1e-3  # the filter shows in the latents
