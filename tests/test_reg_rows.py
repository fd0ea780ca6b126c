"""--reg_target base_model computes the base model's prediction on the regularization rows of a batch only: the
same values, row for row, as today's whole-batch computation that kept those rows (so the cheaper step trains
what the old one did), with the LoRA's multipliers put back afterwards. Equal up to float32 rounding, not bit for
bit: CPU kernels block a batch of 2 differently from one of 4 (measured: at most 1.7e-6 on predictions of about
1), so the tolerance is 1e-5, far below what a LoRA moves (1e-3 and more, checked below)."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from lora_diffusion import create_network
from lora_diffusion.models import load_models
from lora_diffusion.training.loop import base_model_prediction, batch_rows


def make_run(name, *, cached=False):
    torch.manual_seed(0)
    models = load_models(name)
    network = create_network(models.unet, models.text_encoders, rank=4, alpha=4, conv_rank=4, conv_alpha=4)
    with torch.no_grad():  # a LoRA that changes the prediction: multiplier 0 must really switch it off
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run = SimpleNamespace(args=SimpleNamespace(clip_skip=None, max_token_length=None, weighted_captions=False),
                          models=models, network=network, device=torch.device("cpu"), weight_dtype=torch.float32,
                          accelerator=SimpleNamespace(autocast=nullcontext, device=torch.device("cpu")),
                          text_cache=None, train_text_encoder=True, embedding=None)
    return run


def make_batch(run, is_reg, size=64):
    torch.manual_seed(1)
    n = len(is_reg)
    captions = [f"a {c} {s} on a {b} background" for c, s, b in
                zip(["red", "green", "blue", "white", "black"], ["star", "circle", "square", "star", "triangle"],
                    ["yellow", "purple", "orange", "green", "white"])][:n]
    latent = size // 8
    channels = run.models.unet.config.in_channels
    batch = {"captions": captions, "is_reg": torch.tensor(is_reg), "paths": [f"{i}.png" for i in range(n)],
             "buckets": [(size, size)] * n, "original_sizes": [(size + 8 * i, size) for i in range(n)],
             "crops": [(i, 2 * i) for i in range(n)], "latents": torch.randn(n, channels, latent, latent)}
    noisy = torch.randn(n, channels, latent, latent)
    timesteps = torch.tensor([999, 10, 500, 250, 731][:n])
    return batch, noisy, timesteps


@pytest.mark.parametrize("name", ["builtin:mini", "builtin:tiny-xl"])
@pytest.mark.parametrize("is_reg", [[False, True, True, False], [True, False, False, False], [True, True, True, True],
                                    [False, True, False, True, True]])
def test_reg_rows_alone_equal_the_whole_batch_rows(name, is_reg):
    run = make_run(name)
    batch, noisy, timesteps = make_batch(run, is_reg)
    rows = batch["is_reg"]
    whole = base_model_prediction(run, batch, noisy, timesteps)  # today's: the whole batch, then its reg rows
    alone = base_model_prediction(run, batch, noisy, timesteps, rows=rows)
    assert alone.shape == (int(rows.sum()), *whole.shape[1:])
    torch.testing.assert_close(alone, whole[rows], rtol=1e-5, atol=1e-5)
    # and each row as the base model alone computes it for that one sample
    for i in rows.nonzero().flatten().tolist():
        one = torch.zeros_like(rows)
        one[i] = True
        torch.testing.assert_close(base_model_prediction(run, batch, noisy, timesteps, rows=one)[0],
                                   alone[rows[:i].sum()], rtol=1e-5, atol=1e-5)


def test_the_lora_is_off_for_the_base_prediction_and_back_on_after():
    run = make_run("builtin:mini")
    batch, noisy, timesteps = make_batch(run, [True, False, True, False])
    rows = batch["is_reg"]
    run.network.set_multiplier(0.7)
    base = base_model_prediction(run, batch, noisy, timesteps, rows=rows)
    assert all(layer.multiplier == 0.7 for layer in run.network.layers().values())
    from lora_diffusion.training.loop import text_conditioning

    with torch.no_grad():
        context, added = text_conditioning(run, batch_rows(batch, rows))
        with_lora = run.models.family.call_unet(run.models.unet, noisy[rows], timesteps[rows], context, added)
        run.network.set_multiplier(0.0)
        context, added = text_conditioning(run, batch_rows(batch, rows))
        without = run.models.family.call_unet(run.models.unet, noisy[rows], timesteps[rows], context, added)
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA moves the prediction...
    torch.testing.assert_close(base, without, rtol=0, atol=0)  # ...and the base prediction is the model without it


def test_cached_text_states_are_taken_for_the_rows():
    run = make_run("builtin:mini")
    batch, noisy, timesteps = make_batch(run, [False, True, False, True])
    rows = batch["is_reg"]
    run.network.set_multiplier(0.0)
    with torch.no_grad():
        states = run.models.family.encode_prompts(run.models, batch["captions"])
    run.network.set_multiplier(1.0)
    run.text_cache = {c: s for c, s in zip(batch["captions"], states)}  # the frozen encoders' cache
    whole = base_model_prediction(run, batch, noisy, timesteps)
    torch.testing.assert_close(base_model_prediction(run, batch, noisy, timesteps, rows=rows), whole[rows],
                               rtol=1e-5, atol=1e-5)


def test_batch_rows_cuts_per_sample_values_only():
    batch = {"captions": ["a", "b", "c"], "is_reg": torch.tensor([False, True, True]), "paths": ["0", "1", "2"],
             "latents": torch.arange(3.0)[:, None], "alpha_masks": torch.ones(3, 2, 2), "note": "kept",
             "scalar": torch.tensor(1.0)}
    cut = batch_rows(batch, batch["is_reg"])
    assert cut["captions"] == ["b", "c"] and cut["paths"] == ["1", "2"]
    assert cut["is_reg"].tolist() == [True, True] and cut["latents"].flatten().tolist() == [1.0, 2.0]
    assert cut["alpha_masks"].shape == (2, 2, 2) and cut["note"] == "kept" and cut["scalar"] is batch["scalar"]
