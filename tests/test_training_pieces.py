"""Tests of lora_diffusion.training: each piece against a formula written here or a real client."""

import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from lora_diffusion import training
from lora_diffusion.training import (
    create_lr_scheduler,
    create_optimizer,
    diffusion_loss,
    encode_prompts,
    make_noise,
    min_snr_weights,
    parse_optimizer_args,
    parse_prompt_line,
    read_prompts,
    sample_timesteps,
    tokenize_captions,
    training_metadata,
    training_target,
)

ASSETS = Path(__file__).resolve().parents[1] / "lora_diffusion" / "assets"
TINY = ASSETS / "tiny-sd"


# ---------------------------------------------------------------- fixtures


def clip_tokenizer(tmp_path_factory, v2):
    from lora_diffusion.models import load_clip_tokenizer

    return load_clip_tokenizer(v2=v2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory, v2=False)


@pytest.fixture(scope="module")
def tokenizer_v2(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory, v2=True)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig.from_pretrained(TINY / "text_encoder")).eval()


@pytest.fixture(scope="module")
def scheduler():
    return DDPMScheduler.from_pretrained(TINY / "scheduler")


def alphas_cumprod_sd():
    """SD's scaled_linear schedule written out: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)**2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


# ---------------------------------------------------------------- noise and loss


def test_sample_timesteps_range_and_errors():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, min_timestep=100, max_timestep=200, generator=g)
    assert t.dtype == torch.long and t.shape == (4000,)
    assert t.min() == 100 and t.max() == 199  # max is exclusive, as torch.randint
    again = sample_timesteps(4000, min_timestep=100, max_timestep=200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    with pytest.raises(ValueError, match="min_timestep"):
        sample_timesteps(2, min_timestep=500, max_timestep=500)


def test_noise_offset_is_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    noise = make_noise(latents, noise_offset=0.1, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    plain = torch.randn(2, 4, 8, 8, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(noise, plain + 0.1 * offset)
    no_offset = make_noise(latents, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(no_offset, plain)


def test_multires_noise_is_unit_std_and_low_frequency():
    latents = torch.zeros(8, 4, 32, 32)
    plain = make_noise(latents, generator=torch.Generator().manual_seed(0))
    pyramid = make_noise(latents, multires_noise_iterations=6, multires_noise_discount=0.8,
                         generator=torch.Generator().manual_seed(0))
    assert pyramid.shape == latents.shape
    assert abs(pyramid.std().item() - 1.0) < 1e-4
    # low-resolution components make per-channel means vary much more than white noise does
    assert pyramid.mean(dim=(2, 3)).std() > 3 * plain.mean(dim=(2, 3)).std()


def test_training_target_epsilon_and_v(scheduler):
    a = alphas_cumprod_sd().float()
    torch.testing.assert_close(scheduler.alphas_cumprod, a, rtol=1e-5, atol=1e-6)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    at = a[t].view(-1, 1, 1, 1)
    expected_noisy = at.sqrt() * latents + (1 - at).sqrt() * noise
    noisy, target = training_target(scheduler, latents, noise, t, v_parameterization=False)
    torch.testing.assert_close(noisy, expected_noisy, rtol=1e-5, atol=1e-5)
    assert torch.equal(target, noise)
    expected_v = at.sqrt() * noise - (1 - at).sqrt() * latents
    _, v = training_target(scheduler, latents, noise, t, v_parameterization=True)
    torch.testing.assert_close(v, expected_v, rtol=1e-5, atol=1e-5)

    class NoVelocity:  # a scheduler without get_velocity: the formula path
        alphas_cumprod = scheduler.alphas_cumprod
        add_noise = staticmethod(scheduler.add_noise)

    _, v2 = training_target(NoVelocity(), latents, noise, t, v_parameterization=True)
    torch.testing.assert_close(v2, expected_v, rtol=1e-5, atol=1e-5)


def test_min_snr_weights_formula(scheduler):
    a = alphas_cumprod_sd()
    t = torch.tensor([0, 10, 100, 400, 999])
    snr = a[t] / (1 - a[t])
    eps = torch.tensor([min(s, 5.0) / s for s in snr.tolist()])
    v = torch.tensor([min(s, 5.0) / (s + 1) for s in snr.tolist()])
    torch.testing.assert_close(min_snr_weights(t, scheduler, 5.0, False), eps.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(min_snr_weights(t, scheduler, 5.0, True), v.float(), rtol=1e-4, atol=1e-6)
    assert min_snr_weights(t, scheduler, 5.0, False)[-1] == pytest.approx(1.0)  # low SNR: weight 1


def test_diffusion_loss_weights(scheduler):
    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8).half(), torch.randn(4, 4, 8, 8).half()
    t = torch.tensor([5, 50, 500, 900])
    is_reg = [False, True, False, True]
    per_sample = [((pred[i].double() - target[i].double()) ** 2).mean().item() for i in range(4)]
    a = alphas_cumprod_sd()
    snr = (a[t] / (1 - a[t])).tolist()
    expected = sum(
        per_sample[i] * (0.5 if is_reg[i] else 1.0) * min(snr[i], 5.0) / snr[i] for i in range(4)
    ) / 4
    loss = diffusion_loss(pred, target, timesteps=t, noise_scheduler=scheduler, min_snr_gamma=5.0,
                          is_reg=is_reg, prior_loss_weight=0.5)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    plain = diffusion_loss(pred, target, timesteps=t, noise_scheduler=scheduler)
    assert plain.item() == pytest.approx(sum(per_sample) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(pred, target[:2], timesteps=t, noise_scheduler=scheduler)


# ---------------------------------------------------------------- text


def test_encode_77_tokens_and_clip_skip(tokenizer, text_encoder):
    captions = ["a photo of sks dog", ""]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=True)
        got = encode_prompts(tokenizer, text_encoder, captions)
        got_skip2 = encode_prompts(tokenizer, text_encoder, captions, clip_skip=2)
    assert got.shape == (2, 77, 32)
    torch.testing.assert_close(got, out.last_hidden_state)
    layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    torch.testing.assert_close(got_skip2, layer_norm(out.hidden_states[-2]))
    assert not torch.allclose(got_skip2, got)


def test_encode_225_tokens_kohya_windows(tokenizer, text_encoder):
    words = [f"word{i}" for i in range(120)]
    caption = " ".join(words)
    body = tokenizer(caption, add_special_tokens=False).input_ids
    assert len(body) > 150  # the caption spills into the third window
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = (body[:225] + [eos] * 225)[:225]
    windows = torch.tensor([[bos] + body[i : i + 75] + [eos] for i in (0, 75, 150)])
    ids = tokenize_captions(tokenizer, [caption], max_token_length=225)
    assert torch.equal(ids[0], windows)
    with torch.no_grad():
        states = text_encoder(windows).last_hidden_state  # (3, 77, 32), each window alone
        expected = torch.cat([states[0, :1], states[0, 1:76], states[1, 1:76], states[2, 1:76], states[2, 76:]])
        got = encode_prompts(tokenizer, text_encoder, [caption], max_token_length=225)
    assert got.shape == (1, 227, 32)
    torch.testing.assert_close(got[0], expected)
    short = encode_prompts(tokenizer, text_encoder, ["a cat"] * 2, max_token_length=150)
    assert short.shape == (2, 152, 32)


def test_sd2_pad_token_windows(tokenizer_v2):
    pad, eos, bos = tokenizer_v2.pad_token_id, tokenizer_v2.eos_token_id, tokenizer_v2.bos_token_id
    assert pad != eos
    body = tokenizer_v2("a cat", add_special_tokens=False).input_ids
    ids = tokenize_captions(tokenizer_v2, ["a cat"], max_token_length=150)[0]
    first = [bos] + body + [eos] + [pad] * (75 - len(body) - 1) + [pad]
    second = [bos, eos] + [pad] * 75  # a window past the text reads like an empty caption
    assert ids.tolist() == [first, second]
    long = " ".join(f"word{i}" for i in range(35))
    long_body = tokenizer_v2(long, add_special_tokens=False).input_ids
    assert 75 < len(long_body) < 150
    ids = tokenize_captions(tokenizer_v2, [long], max_token_length=150)[0]
    assert ids[0].tolist() == [bos] + long_body[:75] + [eos]  # cut inside the text: ends with EOS
    rest = long_body[75:]
    assert ids[1].tolist() == [bos] + rest + [eos] + [pad] * (75 - len(rest))


def test_encode_gradients_and_errors(tokenizer, text_encoder):
    for p in text_encoder.parameters():
        p.requires_grad_(True)
    out = encode_prompts(tokenizer, text_encoder, ["a dog"], clip_skip=2)
    out.square().mean().backward()
    grads = [p.grad for p in text_encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    text_encoder.zero_grad(set_to_none=True)
    for p in text_encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        assert not encode_prompts(tokenizer, text_encoder, ["a dog"]).requires_grad
    with pytest.raises(ValueError, match="max_token_length"):
        encode_prompts(tokenizer, text_encoder, ["a dog"], max_token_length=100)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_prompts(tokenizer, text_encoder, ["a dog"], clip_skip=0)


def test_clip_skip_with_transformers4_layout(tokenizer, text_encoder):
    """transformers 4 keeps the layers under `.text_model`: the final layer norm is found there too."""

    class Layout4(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

        def forward(self, *args, **kwargs):
            return self.text_model(*args, **kwargs)

    with torch.no_grad():
        torch.testing.assert_close(
            encode_prompts(tokenizer, Layout4(text_encoder), ["a dog"], clip_skip=3),
            encode_prompts(tokenizer, text_encoder, ["a dog"], clip_skip=3),
        )


# ---------------------------------------------------------------- optimizers and schedules


def test_parse_optimizer_args():
    parsed = parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.99", "decouple=True", "kind=adam"])
    assert parsed == {"weight_decay": 0.01, "betas": (0.9, 0.99), "decouple": True, "kind": "adam"}
    assert parse_optimizer_args("a=1 b=2") == {"a": 1, "b": 2}
    assert parse_optimizer_args({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="optimizer_args"):
        parse_optimizer_args(["weight_decay"])


def one_step(optimizer, params):
    loss = sum((p**2).sum() for p in params)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name, cls", [("AdamW", "torch.optim.AdamW"), ("adamw8bit", "bitsandbytes.optim.AdamW8bit"),
                                       ("Lion8bit", "bitsandbytes.optim.Lion8bit"),
                                       ("PagedAdamW8bit", "bitsandbytes.optim.PagedAdamW8bit"),
                                       ("SGDNesterov", "torch.optim.SGD"),
                                       ("Adafactor", "transformers.optimization.Adafactor"),
                                       ("torch.optim.RMSprop", "torch.optim.RMSprop")])
def test_each_optimizer_steps(name, cls):
    import importlib

    module, _, attr = cls.rpartition(".")
    expected_class = getattr(importlib.import_module(module), attr)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 80)  # > 4096 weights: bitsandbytes uses its 8-bit state
    before = model.weight.detach().clone()
    groups = [{"params": [model.weight], "lr": 1e-2}, {"params": [model.bias], "lr": 1e-3}]
    optimizer = create_optimizer(name, groups, learning_rate=1e-2)
    assert type(optimizer) is expected_class
    if name != "Adafactor":  # Adafactor's default relative_step sets its own lr (test_sgd_nesterov_and_adafactor...)
        assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-3]  # each group keeps its own rate
    one_step(optimizer, list(model.parameters()))
    assert not torch.equal(before, model.weight)
    assert torch.isfinite(model.weight).all()


def test_sgd_nesterov_and_adafactor_settings():
    p = [torch.nn.Parameter(torch.ones(3))]
    sgd = create_optimizer("SGDNesterov", p, learning_rate=0.1)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] is True and sgd.defaults["momentum"] == 0.9
    ada = create_optimizer("Adafactor", [{"params": p, "lr": 1e-3}], learning_rate=1e-3)
    assert ada.defaults["relative_step"] is True and ada.param_groups[0]["lr"] is None
    sched = create_lr_scheduler("cosine", ada, num_training_steps=10)  # replaced by Adafactor's proxy
    assert type(sched).__name__ == "AdafactorSchedule"
    manual = create_optimizer("Adafactor", p, learning_rate=1e-3,
                              optimizer_args=["relative_step=False", "scale_parameter=False", "warmup_init=False"])
    assert manual.param_groups[0]["lr"] == 1e-3


def test_lion_matches_formula():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = create_optimizer("Lion", [p], learning_rate=0.1, optimizer_args=["weight_decay=0.5", "betas=(0.9,0.99)"])
    x, m = [1.0, -2.0, 3.0], [0.0, 0.0, 0.0]
    grads = [[0.5, -1.0, 0.0], [-3.0, 2.0, 1.0]]
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        for i in range(3):
            c = 0.9 * m[i] + 0.1 * g[i]
            sign = (c > 0) - (c < 0)
            x[i] = x[i] * (1 - 0.1 * 0.5) - 0.1 * sign
            m[i] = 0.99 * m[i] + 0.01 * g[i]
    torch.testing.assert_close(p.detach(), torch.tensor(x))


def test_prodigy_steps_when_installed():
    pytest.importorskip("prodigyopt")
    p = [torch.nn.Parameter(torch.ones(4))]
    opt = create_optimizer("Prodigy", p, learning_rate=1.0)
    one_step(opt, p)
    assert not torch.equal(p[0].detach(), torch.ones(4))


def test_optimizer_errors(monkeypatch):
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="AdamW8bit"):
        create_optimizer("Adamm", p, learning_rate=1e-3)
    with pytest.raises(ValueError, match="no.such.module"):
        create_optimizer("no.such.module.Opt", p, learning_rate=1e-3)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=re.escape('pip install "lora-diffusion[bnb]"')):
        create_optimizer("AdamW8bit", p, learning_rate=1e-3)
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(ValueError, match="pip install prodigyopt"):  # also a ValueError, for CLI error handling
        create_optimizer("Prodigy", p, learning_rate=1.0)


def lr_curve(name, total, **kwargs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_lr_scheduler(name, opt, num_training_steps=total, **kwargs)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_schedules_match_formulas():
    total, warm = 100, 10

    def progress(s):
        return (s - warm) / (total - warm)

    expected = {
        "constant": lambda s: 1.0,
        "constant_with_warmup": lambda s: min(1.0, s / warm),
        "linear": lambda s: s / warm if s < warm else max(0.0, (total - s) / (total - warm)),
        "cosine": lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * progress(s))),
        "cosine_with_restarts":
            lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * ((3 * progress(s)) % 1))),
        "polynomial": lambda s: s / warm if s < warm else 1e-7 + (1 - 1e-7) * (1 - progress(s)) ** 2,
    }
    for name, formula in expected.items():
        got = lr_curve(name, total, lr_warmup_steps=0 if name == "constant" else warm,
                       lr_scheduler_num_cycles=3, lr_scheduler_power=2.0)
        assert got == pytest.approx([formula(s) for s in range(total)], abs=1e-6), name
    # a float < 1 is a fraction of the total
    expected = [s / 10 for s in range(11)]
    assert lr_curve("constant_with_warmup", 200, lr_warmup_steps=0.05)[:11] == pytest.approx(expected)


def test_lr_scheduler_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="cosine_with_restarts"):
        create_lr_scheduler("cosin", opt, num_training_steps=10)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        create_lr_scheduler("linear", opt, num_training_steps=10, lr_warmup_steps=20)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        create_lr_scheduler("linear", opt, num_training_steps=10, lr_warmup_steps=-1)
    with pytest.raises(ValueError, match="Adafactor"):
        create_lr_scheduler("adafactor", opt, num_training_steps=10)


# ---------------------------------------------------------------- state


def train_steps(model, optimizer, scheduler, n):
    for _ in range(n):
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def trained_pieces(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    train_steps(model, optimizer, scheduler, steps)
    return dict(network=model, optimizer=optimizer, lr_scheduler=scheduler)


def test_save_load_round_trip(tmp_path):
    pieces = trained_pieces()
    model, optimizer, scheduler = pieces["network"], pieces["optimizer"], pieces["lr_scheduler"]
    state_dir = tmp_path / "run-step00000003-state"
    training.save_state(state_dir, step=3, epoch=1, batch_in_epoch=2, extra={"note": "x"}, **pieces)
    assert sorted(p.name for p in state_dir.iterdir()) == ["network.safetensors", "optimizer.safetensors",
                                                          "rng-0.safetensors", "train_state.json"]
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_avg = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    after_save = draws()
    train_steps(model, optimizer, scheduler, 2)  # move everything on
    record = training.load_state(state_dir, **pieces)
    assert record == {"step": 3, "epoch": 1, "batch_in_epoch": 2, "extra": {"note": "x"}}
    assert draws() == after_save  # torch, numpy and python RNG continue as after the save
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved_weights[k])
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_avg)
    assert optimizer.state_dict()["state"][0]["step"] == 3
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert scheduler.state_dict()["last_epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-step00000003-state"]  # no temp leftovers

    # loaded into new objects (other weights, a fresh optimizer, moved RNG), 2 more steps end exactly where an
    # uninterrupted 5-step run ends
    reference = trained_pieces(steps=5)
    fresh = trained_pieces(steps=0)
    with torch.no_grad():
        fresh["network"].weight.mul_(2)
    torch.manual_seed(123)
    training.load_state(state_dir, **fresh)
    train_steps(fresh["network"], fresh["optimizer"], fresh["lr_scheduler"], 2)
    for k, v in reference["network"].state_dict().items():
        assert torch.equal(v, fresh["network"].state_dict()[k]), k


@pytest.mark.parametrize("name", ["AdamW", "adamw8bit", "Lion", "SGDNesterov", "Adafactor", "Prodigy"])
def test_every_optimizers_state_resumes_exactly(tmp_path, name):
    """Two more steps after a save/load equal two more steps of the optimizer that never stopped."""
    if name == "Prodigy":
        pytest.importorskip("prodigyopt")

    def pieces():
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 80)  # > 4096 weights: bitsandbytes keeps 8-bit state tensors
        optimizer = create_optimizer(name, [{"params": list(model.parameters()), "lr": 1e-2}], learning_rate=1e-2)
        return dict(network=model, optimizer=optimizer,
                    lr_scheduler=create_lr_scheduler("cosine", optimizer, num_training_steps=10, lr_warmup_steps=2))

    def steps(p, n):
        for _ in range(n):
            one_step(p["optimizer"], list(p["network"].parameters()))
            p["lr_scheduler"].step()

    uninterrupted = pieces()
    steps(uninterrupted, 5)
    first = pieces()
    steps(first, 3)
    training.save_state(tmp_path / "s", step=3, epoch=0, batch_in_epoch=3, **first)
    second = pieces()
    training.load_state(tmp_path / "s", **second)
    steps(second, 2)
    for k, v in uninterrupted["network"].state_dict().items():
        assert torch.equal(v, second["network"].state_dict()[k]), k


def test_crash_during_save_keeps_previous_state(tmp_path, monkeypatch):
    pieces = trained_pieces()
    state_dir = tmp_path / "last-state"
    training.save_state(state_dir, step=1, epoch=0, batch_in_epoch=1, **pieces)
    before = sorted(p.name for p in state_dir.iterdir())

    import lora_diffusion.training.state as state_module
    real = state_module.atomic_write

    def crash(path, write_fn, **kwargs):
        if Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"half written")
            raise OSError("disk full")
        return real(path, write_fn, **kwargs)

    monkeypatch.setattr(state_module, "atomic_write", crash)
    with pytest.raises(OSError, match="disk full"):
        training.save_state(state_dir, step=2, epoch=0, batch_in_epoch=2, **pieces)
    assert training.read_train_state(state_dir)["step"] == 1
    assert sorted(p.name for p in state_dir.iterdir()) == before


def test_load_state_errors(tmp_path):
    pieces = trained_pieces()
    with pytest.raises(FileNotFoundError, match="no such folder"):
        training.load_state(tmp_path / "missing", **pieces)
    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match="train_state.json"):
        training.load_state(tmp_path / "partial", **pieces)


def test_rotate_deletes_only_what_it_is_given(tmp_path):
    target = tmp_path / "a.txt"
    training.atomic_write(target, lambda f: f.write(b"old"))

    def failing(f):
        f.write(b"new but")
        raise OSError("interrupted")

    with pytest.raises(OSError):
        training.atomic_write(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]

    for epoch in (1, 2, 3, 10, 11):
        (tmp_path / f"lora-{epoch:06d}.safetensors").write_bytes(b"x")
    written = [tmp_path / f"lora-{epoch:06d}.safetensors" for epoch in (2, 3, 1)]  # this run's, oldest first
    removed = training.rotate(written, 2)
    assert [Path(p).name for p in removed] == ["lora-000002.safetensors"]
    assert training.rotate(written, 1, owned=lambda p: not p.endswith("000003.safetensors")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.txt", "lora-000001.safetensors", "lora-000003.safetensors", "lora-000010.safetensors",
        "lora-000011.safetensors"]
    with pytest.raises(ValueError, match="save_last_n"):
        training.rotate(written, 0)


# ---------------------------------------------------------------- sample prompts


def test_parse_prompt_line():
    p = parse_prompt_line("a sks dog, beach --n blurry, lowres --w 770 --h 512 --d 42 --l 6.5 --s 20 --ss euler_a",
                          width=256, height=256)
    assert p == dict(prompt="a sks dog, beach", negative_prompt="blurry, lowres", width=768, height=512,
                     seed=42, scale=6.5, steps=20, sampler="euler_a")
    d = parse_prompt_line("just a prompt", width=320, height=448, steps=12)
    assert d == dict(prompt="just a prompt", negative_prompt="", width=320, height=448, seed=None, scale=7.5,
                     steps=12, sampler=None)
    with pytest.raises(ValueError, match="--w"):
        parse_prompt_line("x --w wide")
    with pytest.raises(ValueError, match="--q"):
        parse_prompt_line("x --q 3")


def test_read_prompts_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("# comment\n\na cat --d 1\n  \na dog --s 5\n")
    prompts = read_prompts(txt, width=64, height=64)
    assert [(p["prompt"], p["seed"], p["steps"], p["width"]) for p in prompts] == [("a cat", 1, 30, 64),
                                                                                ("a dog", None, 5, 64)]
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\n# c\na cat --h tall\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 3: --h"):
        read_prompts(bad)
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a", "sample_steps": 4, "seed": 9}, {"prompt": "b", "width": 128}]))
    got = read_prompts(js, width=64, height=64)
    assert [(p["prompt"], p["steps"], p["seed"], p["width"]) for p in got] == [("a", 4, 9, 64), ("b", 30, None, 128)]
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nscale = 5.0\nwidth = 96\n\n[[prompt.subset]]\nprompt = "c"\n\n'
                    '[[prompt.subset]]\nprompt = "d"\nscale = 3.0\n')
    got = read_prompts(toml)
    assert [(p["prompt"], p["scale"], p["width"]) for p in got] == [("c", 5.0, 96), ("d", 3.0, 96)]
    with pytest.raises(FileNotFoundError, match="nothere.txt"):
        read_prompts(tmp_path / "nothere.txt")


@pytest.fixture(scope="module")
def tiny_pipeline_parts(tokenizer):
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(TINY / "text_encoder"))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(TINY / "vae"))
    return dict(tokenizer=tokenizer, text_encoder=te, vae=vae, unet=unet,
                noise_scheduler=DDPMScheduler.from_pretrained(TINY / "scheduler"))


def test_generate_samples(tmp_path, tiny_pipeline_parts):
    parts = tiny_pipeline_parts
    parts["unet"].train()
    parts["text_encoder"].eval()
    parts["vae"].eval()
    prompts = [parse_prompt_line("a dog --n cat --d 7 --s 2", width=64, height=64),
               parse_prompt_line("a tree --w 128 --s 2 --ss euler", width=64, height=64)]
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    paths = training.generate_samples(**parts, prompts=prompts, out_dir=tmp_path / "sample", step=150,
                                      output_name="mylora", seed=1000)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert parts["unet"].training and not parts["text_encoder"].training and not parts["vae"].training
    assert [Path(p).parent for p in paths] == [tmp_path / "sample"] * 2
    assert re.fullmatch(r"mylora_000150_00_\d{14}_7\.png", Path(paths[0]).name)
    assert re.fullmatch(r"mylora_000150_01_\d{14}_1001\.png", Path(paths[1]).name)  # seed + index
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(64, 64), (128, 64)]
    assert Image.open(paths[0]).text["prompt"] == "a dog"
    torch.rand(10)  # move the global RNG on: the seed alone decides the image
    again = training.generate_samples(**parts, prompts=prompts[:1], out_dir=tmp_path / "again", step=0, epoch=2)
    assert re.fullmatch(r"e000002_00_\d{14}_7\.png", Path(again[0]).name)
    assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(Image.open(paths[0])))  # seeded


def test_generate_samples_gives_each_submodule_its_own_mode_back(tmp_path, tiny_pipeline_parts):
    # The trainer's base models are in eval mode and the LoRA inside them in train mode (its dropout on):
    # `unet.train(False)` after sampling would turn the LoRA's dropout off for the rest of the run.
    from lora_diffusion import create_network

    parts = tiny_pipeline_parts
    network = create_network(parts["unet"], parts["text_encoder"], rank=2, dropout=0.5)
    for model in (parts["unet"], parts["text_encoder"], parts["vae"]):
        model.eval()
    network.train()
    seen = []
    real = type(network.unet_layers[0]).lora_delta

    def spy(layer, x):
        seen.append(layer.training)
        return real(layer, x)

    prompt = parse_prompt_line("a dog --d 1 --s 1", width=64, height=64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(network.unet_layers[0]), "lora_delta", spy)
        training.generate_samples(**parts, prompts=[prompt], out_dir=tmp_path, step=1)
    assert seen and not any(seen)  # no LoRA dropout in the pictures
    assert all(layer.training for layer in network.layers().values())
    lora_modules = {id(m) for layer in network.layers().values() for m in layer.modules()}
    base = [m for model in (parts["unet"], parts["text_encoder"]) for m in model.modules() if id(m) not in lora_modules]
    assert not any(m.training for m in base)


# ---------------------------------------------------------------- metadata


def test_training_metadata_strings():
    md = training_metadata(
        learning_rate=1e-4, unet_lr=None, text_encoder_lr=5e-5, num_train_images=300, shuffle_caption=True,
        resolution=(512, 512), clip_skip=None, ss_seed=42, v2=False, max_grad_norm=1.0,
        dataset_dirs={"10_sks dog": {"n_repeats": 10, "img_count": 30}},
        tag_frequency={"10_sks dog": {"sks": 30, "dog": 28}}, training_started_at=1700000000.5,
    )
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_learning_rate"] == "0.0001" and md["ss_unet_lr"] == "None" and md["ss_text_encoder_lr"] == "5e-05"
    assert md["ss_num_train_images"] == "300" and md["ss_shuffle_caption"] == "True" and md["ss_v2"] == "False"
    assert md["ss_resolution"] == "(512, 512)" and md["ss_seed"] == "42" and md["ss_max_grad_norm"] == "1.0"
    assert md["ss_clip_skip"] == "None" and md["ss_training_started_at"] == "1700000000.5"
    assert json.loads(md["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 30}}
    assert json.loads(md["ss_tag_frequency"])["10_sks dog"]["dog"] == 28
    with pytest.raises(ValueError, match="learnig_rate"):
        training_metadata(learnig_rate=1e-4)
    with pytest.raises(ValueError, match="kohya"):
        training_metadata(network_dim=8)
