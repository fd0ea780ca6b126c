"""Every diffusers folder the project ships or writes draws a prompt in a plain
`StableDiffusionPipeline.from_pretrained(folder)`: no dtype argument, on CPU. diffusers builds the U-Net and VAE in
fp32 whatever the weights; transformers 5 builds the text encoder in the dtype its config names, so an fp16 folder
whose text encoder config said float16 failed at the first prompt ("mat1 and mat2 must have the same dtype")."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from lora_diffusion import create_network
from lora_diffusion.models import DTYPE_KWARG, MINI_FOLDER, load_models, save_tiny_diffusers_folder
from lora_diffusion.tools.merge import merge_into_model
from lora_diffusion.tools.model_convert import convert_model


def draw_plainly(folder):
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))  # exactly the one-liner: no dtype, no options
    pipe.set_progress_bar_config(disable=True)
    dtypes = {part: getattr(pipe, part).dtype for part in ("unet", "vae", "text_encoder")}
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    return dtypes


def test_the_shipped_mini_folder_draws_in_a_plain_pipeline():
    assert draw_plainly(MINI_FOLDER) == dict.fromkeys(("unet", "vae", "text_encoder"), torch.float32)


def test_pretrain_mini_writes_fp16_weights_that_draw_in_a_plain_pipeline(tmp_path):
    from lora_diffusion.models.tokenizer import load_clip_tokenizer
    from lora_diffusion.world.pretrain_mini import build_models, write_folder

    folder = write_folder(tmp_path / "mini", load_clip_tokenizer(v2=False), *build_models(0))
    from safetensors import safe_open

    with safe_open(folder / "text_encoder" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # still the small folder
    draw_plainly(folder)


@pytest.mark.parametrize("tool", ["convert", "merge"])
def test_the_model_tools_write_fp16_folders_that_draw_in_a_plain_pipeline(tmp_path, tool):
    """convert (single file -> folder) and merge (a LoRA into a folder) from a source whose text encoder was saved
    in fp16 by transformers (its config says float16): the written folder says float32 and draws."""
    tiny = save_tiny_diffusers_folder(tmp_path / "tiny")
    text_encoder = CLIPTextModel.from_pretrained(tiny / "text_encoder", **{DTYPE_KWARG: torch.float16})
    text_encoder.save_pretrained(tiny / "text_encoder")
    assert json.loads((tiny / "text_encoder" / "config.json").read_text())["dtype"] == "float16"
    if tool == "convert":
        single = convert_model(tiny, tmp_path / "tiny.safetensors")
        out = convert_model(single, tmp_path / "out", dtype=torch.float16, config_dir=tiny)
    else:
        models = load_models(tiny)
        network = create_network(models.unet, models.text_encoder, rank=2)
        network.save_weights(str(tmp_path / "lora.safetensors"))
        merge_into_model(tiny, [str(tmp_path / "lora.safetensors")], tmp_path / "out", dtype=torch.float16)
        out = tmp_path / "out"
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    draw_plainly(out)
