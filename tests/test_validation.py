"""Validation during training: held-out images, a loss at fixed timesteps and noise, scores of generated images."""

import pytest

import train_lora
from lora_diffusion.data.dataset import LoRADataset
from lora_diffusion.training.validation import best_epoch
from test_train import base_flags, make_dataset


def test_split_holds_out_a_seeded_share_of_the_training_images(tmp_path):
    data = make_dataset(tmp_path, n=8)
    first, second = LoRADataset(data, resolution=64, seed=3), LoRADataset(data, resolution=64, seed=3)
    held = first.split_validation(0.25)
    assert [e.path for e in held] == [e.path for e in second.split_validation(0.25)]  # the seed decides
    assert len(held) == 2 and len(first.entries) == 6
    assert not {e.path for e in held} & {e.path for e in first.entries}
    assert first.num_train_images == 6 * 5 and len(first) == 6 * 5  # the held-out images leave the epochs
    other = LoRADataset(data, resolution=64, seed=3).split_validation(0.25, seed=11)
    assert [e.path for e in other] != [e.path for e in held] or len(held) == 8


@pytest.mark.parametrize("share", [0.0, 1.0, 0.99])
def test_split_refuses_shares_that_leave_nothing(tmp_path, share):
    from lora_diffusion.data.errors import DatasetError

    data = make_dataset(tmp_path, n=4)
    with pytest.raises(DatasetError, match="validation_split"):
        LoRADataset(data, resolution=64).split_validation(share)


def losses_printed(output):
    return [float(line.split("validation_loss ")[1].split(",")[0]) for line in output.splitlines()
            if "validation_loss " in line]


def test_validation_loss_is_printed_per_epoch_and_repeats_under_the_seed(tmp_path, capsys):
    data = make_dataset(tmp_path, n=8)
    runs = []
    for name, seed in (("a", None), ("b", None), ("c", 7)):
        argv = base_flags(tmp_path / name, data, max_train_steps=None, max_train_epochs=2, train_batch_size=4,
                          validation_split=0.25, validation_seed=seed, learning_rate=1e-2)
        assert train_lora.main(argv) == 0
        out = capsys.readouterr().out
        runs.append(losses_printed(out))
        assert "lowest validation loss" in out
    assert len(runs[0]) == 2  # one per epoch
    assert runs[0] == runs[1]  # same seed, same numbers
    assert runs[0] != runs[2]  # other held-out images and noise
    assert runs[0][0] != runs[0][1]  # the LoRA changed between the epochs, the inputs did not


def test_validation_data_dir_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, held = make_dataset(tmp_path, n=4), make_dataset(tmp_path, n=2, name="held")
    argv = base_flags(tmp_path, data, max_train_steps=None, max_train_epochs=1, validation_data_dir=held,
                      logging_dir=tmp_path / "logs")
    assert train_lora.main(argv) == 0
    assert len(losses_printed(capsys.readouterr().out)) == 1
    events = [p for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    assert "loss/validation" in accumulator.Tags()["scalars"]


@pytest.mark.parametrize("flags, message", [
    (dict(validation_split=0.2, validation_data_dir="x"), "exclude each other"),
    (dict(validation_split=1.5), "between 0 and 1"),
    (dict(validation_prompts="world:star", validation_metrics="judge,bleu"), "bleu"),
    (dict(validation_prompts="missing-prompts.txt"), "--validation_prompts missing-prompts.txt"),
])
def test_bad_validation_flags_name_the_flag(tmp_path, capsys, flags, message):
    data = make_dataset(tmp_path)
    assert train_lora.main(base_flags(tmp_path, data, **flags)) != 0
    assert message in capsys.readouterr().err


def test_best_epoch_names_the_lowest_loss_and_the_most_shapes_right():
    line = best_epoch([{"epoch": 1, "validation_loss": 0.3, "judge_shape": 0.2},
                       {"epoch": 2, "validation_loss": 0.1, "judge_shape": 0.5},
                       {"epoch": 3, "validation_loss": 0.2, "judge_shape": 0.7}])
    assert "0.10000 at epoch 2" in line and "(70%) at epoch 3" in line
    assert best_epoch([]) is None


def test_generated_images_are_scored_each_validation(tmp_path, capsys):
    from lora_diffusion import world

    data = tmp_path / "stars"
    world.write_images(data / "5_star", [world.Scene("star", c, b) for c, b in world.color_pairs()[:4]])
    argv = base_flags(tmp_path, data, pretrained_model_name_or_path="builtin:mini", max_train_steps=None,
                      max_train_epochs=1, train_batch_size=4, validation_prompts="world:star", validation_seeds=1,
                      validation_metrics="judge,fid")
    assert train_lora.main(argv) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("epoch 1"))
    assert "judge_shape" in line and "fid" in line and "validation_loss" not in line
    assert "most shapes right" in out


def test_fp16_runs_validate_and_sample_with_the_vae_in_fp32(tmp_path, capsys, model="builtin:tiny"):
    """Under --mixed_precision fp16 the U-Net's latents are fp16 and the VAE stays fp32: images are decoded in the
    VAE's dtype, outside autocast (a crash at the first validation prompt before)."""
    data = make_dataset(tmp_path, n=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star --w 64 --h 64 --s 2\n")
    argv = base_flags(tmp_path, data, pretrained_model_name_or_path=model, max_train_steps=None, max_train_epochs=1,
                      train_batch_size=5, mixed_precision="fp16", validation_prompts="world:star",
                      validation_seeds=1, validation_split=0.5, sample_prompts=prompts)
    assert train_lora.main(argv) == 0
    out = capsys.readouterr().out
    assert "lowest validation loss" in out and "judge_shape" in out  # the held-out loss and the judged images
    samples = list((tmp_path / "out" / "sample").glob("*.png"))
    assert samples
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(samples[0]).convert("RGB"))
    assert pixels.shape == (64, 64, 3) and 0 < pixels.std()  # decoded, not a blank or NaN (black) image


# --- SDXL ---------------------------------------------------------------------------------------------------------


def test_sdxl_validation_gives_the_unet_diffusers_conditioning(tmp_path):
    """The held-out images' time ids follow from their files (size, center crop, bucket: computed here), the
    captions' states and pooled embedding equal diffusers' StableDiffusionXLPipeline.encode_prompt, LoRA applied,
    and validation_loss hands both to the U-Net."""
    import torch
    from PIL import Image

    from lora_diffusion import create_network
    from lora_diffusion.models.sdxl import build_tiny_xl_models, sdxl_pipeline
    from lora_diffusion.training.validation import build_validation_set, caption_encoder, validation_loss
    from test_sdxl import randomize_network
    from test_sdxl_train import make_sized_dataset

    models = build_tiny_xl_models()
    randomize_network(create_network(models.unet, models.text_encoders, rank=2))
    entries = LoRADataset(make_sized_dataset(tmp_path), resolution=64, enable_bucket=True, min_bucket_reso=32,
                          max_bucket_reso=128, bucket_reso_steps=16).entries
    images = build_validation_set(entries, models.vae, seed=3, device="cpu", dtype=torch.float32, sdxl=True)
    for entry, ids in zip(entries, images.time_ids):
        w, h = Image.open(entry.path).size
        bucket = entry.bucket
        scale = max(bucket[0] / w, bucket[1] / h)
        resized = (max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale)))
        left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
        assert ids.tolist() == [[h, w, top, left, bucket[1], bucket[0]]]
    assert len({tuple(ids[0].tolist()) for ids in images.time_ids}) > 1

    encode = caption_encoder(models, lambda text: text)
    pipe = sdxl_pipeline(models)
    seen = []

    def unet(noisy, timestep, context, added_cond_kwargs):
        seen.append((context, added_cond_kwargs))
        return models.unet(noisy, timestep, context, added_cond_kwargs=added_cond_kwargs)

    with torch.no_grad():
        for caption in images.captions:
            states, _, pooled, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False)
            ours = encode([caption])
            torch.testing.assert_close(ours[0], states, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours[1], pooled, rtol=1e-5, atol=1e-5)
        loss = validation_loss(images, unet=unet, encode=encode, noise_scheduler=models.noise_scheduler,
                               v_parameterization=False, device="cpu", dtype=torch.float32)
    assert loss > 0 and len(seen) == 5 * len(entries)
    for index, caption in enumerate(images.captions):
        for context, added in seen[5 * index: 5 * index + 5]:
            torch.testing.assert_close(context, encode([caption])[0])
            assert torch.equal(added["time_ids"], images.time_ids[index])
            torch.testing.assert_close(added["text_embeds"], encode([caption])[1])


def test_sdxl_training_validates_held_out_images_and_prompts(tmp_path, capsys):
    data = make_dataset(tmp_path, n=8)
    argv = base_flags(tmp_path, data, pretrained_model_name_or_path="builtin:tiny-xl", max_train_steps=None,
                      max_train_epochs=2, train_batch_size=4, validation_split=0.25, validation_prompts="world:star",
                      validation_seeds=1, validation_metrics="judge", learning_rate=1e-2)
    assert train_lora.main(argv) == 0
    out = capsys.readouterr().out
    losses = losses_printed(out)
    assert len(losses) == 2 and losses[0] != losses[1]
    assert "judge_shape" in next(line for line in out.splitlines() if line.startswith("epoch 1"))


def test_max_validation_steps_scores_only_the_first_images(monkeypatch):
    """kohya's --max_validation_steps: one held-out image is one validation batch here. With the target made the
    latents themselves and a U-Net that predicts zeros, each image's loss is mean(latents**2): the formula."""
    import torch

    from lora_diffusion.training import validation as validation_module
    from lora_diffusion.training.validation import ValidationSet, validation_loss

    values = [1.0, 2.0, 3.0]
    validation = ValidationSet([torch.full((1, 4, 2, 2), v) for v in values], ["a", "b", "c"], seed=0)
    monkeypatch.setattr(validation_module, "training_target", lambda scheduler, latents, noise, t, v: (latents,) * 2)

    class Scheduler:
        config = type("Config", (), {"num_train_timesteps": 1000})

    def unet(noisy, timestep, encoder_hidden_states=None, **kwargs):
        return type("Output", (), {"sample": torch.zeros_like(noisy)})

    def loss(max_images):
        return validation_loss(validation, unet=unet, encode=lambda captions: torch.zeros(1, 3, 8),
                               noise_scheduler=Scheduler, v_parameterization=False, device="cpu",
                               dtype=torch.float32, max_images=max_images)

    assert loss(None) == pytest.approx(sum(v * v for v in values) / 3)
    assert loss(2) == pytest.approx((1 + 4) / 2)
    assert loss(1) == pytest.approx(1.0)


def test_validate_every_n_steps_adds_a_validation_within_the_epoch(tmp_path, capsys):
    data = make_dataset(tmp_path, n=8)
    argv = base_flags(tmp_path, data, max_train_steps=None, max_train_epochs=1, train_batch_size=4,
                      validation_split=0.25, validate_every_n_steps=4, max_validation_steps=1)
    assert train_lora.main(argv) == 0
    out = capsys.readouterr().out
    steps = [int(line.split("(step ")[1].split(")")[0]) for line in out.splitlines() if "validation_loss " in line]
    assert steps[:2] == [4, 8] and len(steps) == 3  # steps 4 and 8 (of 8), then the epoch's own at its end
