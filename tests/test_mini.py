"""builtin:mini: the shipped pretrained model loads in diffusers, draws what it is asked, and a short LoRA run
teaches it the held-out star. Judged on generated images by lora_diffusion.world.judge."""

import json
import sys
from pathlib import Path

import pytest
import torch

from child_process import run
from lora_diffusion import create_network, world
from lora_diffusion.models import MINI_FOLDER, load_models
from lora_diffusion.world import quality

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def diffusers_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MINI_FOLDER, local_files_only=True)  # no dtype: as a user would
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_a_small_fp16_diffusers_folder():
    index = json.loads((MINI_FOLDER / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    weights = list(MINI_FOLDER.glob("*/*.safetensors"))
    assert len(weights) == 3
    assert sum(f.stat().st_size for f in MINI_FOLDER.rglob("*") if f.is_file()) < 29e6
    assert {"vocab.json", "merges.txt"} <= {f.name for f in (MINI_FOLDER / "tokenizer").iterdir()}  # transformers 4.x
    from safetensors import safe_open

    for f in weights:
        with safe_open(f, "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F16"}


def test_kohya_targets_match_sd15_counts():
    models = load_models("builtin:mini")
    network = create_network(models.unet, models.text_encoder, rank=4)
    assert len(network.unet_layers) == 192 and len(network.text_encoder_layers) == 72
    assert models.name == "builtin:mini" and models.unet.config.cross_attention_dim == 64


def test_diffusers_pipeline_draws_what_it_is_asked(diffusers_pipe):
    """Colour/background pairs the model never saw, through diffusers' own pipeline and the folder's scheduler;
    the floor issue 8 sets (80 %) on 24 images. The shipped version's figures on 96 images are in docs/quality.md
    (shape 99 %, colour 93 %, background 96 %)."""
    scenes = quality.held_out_scenes(24)
    accuracy, _ = quality.judge_prompts(diffusers_pipe, scenes, steps=20, seed=0)
    assert min(accuracy["shape"], accuracy["color"], accuracy["background"]) >= 0.8, accuracy


def test_short_lora_run_on_stars_raises_the_star_rate(tmp_path, diffusers_pipe):
    """The quickstart's recipe (large stars, LoCon), shortened: the base model draws no star at all."""
    import random

    scenes = quality.held_out_scenes(16, shapes=("star",))
    before, _ = quality.judge_prompts(diffusers_pipe, scenes, steps=20, seed=0)
    rng = random.Random(3)
    stars = [world.Scene("star", c, b, size=rng.uniform(0.6, 0.75)) for c, b in world.color_pairs()[::4]]
    world.write_images(tmp_path / "data" / "10_star", stars)
    cmd = [sys.executable, str(ROOT / "train_lora.py"), "--pretrained_model_name_or_path", "builtin:mini",
           "--train_data_dir", str(tmp_path / "data"), "--resolution", "64", "--train_batch_size", "4",
           "--network_dim", "16", "--network_alpha", "8", "--network_args", "conv_dim=16", "conv_alpha=8",
           "--unet_lr", "2e-3", "--text_encoder_lr", "1e-3", "--max_train_steps", "400", "--cache_latents",
           "--output_dir", str(tmp_path / "out"), "--output_name", "star", "--seed", "1"]
    result = run(cmd, cwd=ROOT)  # no wall-clock limit: child_process.run's hour is a safety net for a hang
    assert result.returncode == 0, result.stderr[-3000:]
    diffusers_pipe.load_lora_weights(str(tmp_path / "out"), weight_name="star.safetensors")
    try:
        after, _ = quality.judge_prompts(diffusers_pipe, scenes, steps=20, seed=0)
    finally:
        diffusers_pipe.unload_lora_weights()
    print(f"star rate: {before['shape']:.0%} -> {after['shape']:.0%}")
    assert before["shape"] == 0 and after["shape"] >= 0.6, (before, after)  # measured: 0 % -> 94 %


def test_pretraining_smoke_runs_and_resumes(tmp_path):
    from lora_diffusion.world.pretrain_mini import PretrainSettings, pretrain

    settings = PretrainSettings(out=str(tmp_path / "mini"), work_dir=str(tmp_path / "work"), vae_steps=2, steps=2,
                                decoder_steps=1, vae_batch_size=2, batch_size=2, checkpoint_every=1, eval_every=100,
                                eval_images=2, warmup_steps=1)
    pretrain(settings)
    assert (tmp_path / "mini" / "model_index.json").is_file()
    losses = (tmp_path / "work" / "loss_denoiser.csv").read_text().splitlines()
    assert len(losses) == 3  # header + 2 steps
    settings.steps = 3  # resumes from the step-2 checkpoint: one more row, not three
    pretrain(settings)
    assert len((tmp_path / "work" / "loss_denoiser.csv").read_text().splitlines()) == 4
    first = load_models(str(tmp_path / "mini"))
    assert first.unet.config.cross_attention_dim == 64
    # a later session continues from the written folder: same latent space, U-Net trained further
    more = PretrainSettings(**{**vars(settings), "work_dir": str(tmp_path / "more"), "out": "",
                               "init_from": str(tmp_path / "mini"), "steps": 1, "decoder_steps": 0})
    pretrain(more)
    second = load_models(str(tmp_path / "more" / "model"))  # no --out: inside the work dir, never the shipped one
    assert second.vae.config.scaling_factor == first.vae.config.scaling_factor
    assert torch.equal(second.vae.encoder.conv_in.weight, first.vae.encoder.conv_in.weight)
    assert not torch.equal(second.unet.conv_in.weight, first.unet.conv_in.weight)
