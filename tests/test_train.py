"""train_lora.py end to end on the built-in tiny model: it learns, every LoRA parameter trains, files load in
diffusers, resume equals an uninterrupted run, DDP, and bad input gets a clear error."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_lora
from conftest import count_calls

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, n: int = 4, size: int = 64, name: str = "data") -> Path:
    folder = root / name / "5_toy"
    folder.mkdir(parents=True)
    colors = [(220, 40, 40), (40, 70, 220), (40, 170, 70), (235, 210, 40)]
    for i in range(n):
        image = Image.new("RGB", (size, size), colors[i % 4])
        for x in range(size // 4, 3 * size // 4):
            for y in range(size // 4, 3 * size // 4):
                image.putpixel((x, y), colors[(i + 1) % 4])
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"toy, square number {i}")
    return root / name


def base_flags(tmp_path, data, **overrides):
    flags = dict(pretrained_model_name_or_path="builtin:tiny", train_data_dir=data, resolution=64,
                 train_batch_size=2, network_dim=4, network_alpha=4, learning_rate=1e-3, max_train_steps=4,
                 seed=1, output_dir=tmp_path / "out", output_name="t", max_data_loader_n_workers=0)
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path)


def fixed_eval_loss(lora_path, data_dir):
    """The denoising loss on the training images with fixed noise and timesteps, computed here with diffusers'
    own modules and scheduler (and our loader for the LoRA file)."""
    from lora_diffusion import load_network
    from lora_diffusion.models import load_models

    models = load_models("builtin:tiny")
    if lora_path is not None:
        load_network(lora_path, models.unet, models.text_encoder)
    images = []
    for path in sorted(Path(data_dir).rglob("*.png")):
        pixels = torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.float32)
        images.append(pixels.view(64, 64, 3).permute(2, 0, 1) / 127.5 - 1)
    captions = [Path(p).with_suffix(".txt").read_text() for p in sorted(Path(data_dir).rglob("*.png"))]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = models.vae.encode(torch.stack(images)).latent_dist.mode() * models.vae.config.scaling_factor
        ids = models.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        context = models.text_encoder(ids).last_hidden_state
        total = 0.0
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=g)
            t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
            noisy = models.noise_scheduler.add_noise(latents, noise, t)
            total += torch.nn.functional.mse_loss(models.unet(noisy, t, context).sample, noise).item()
    return total / 8


def test_loss_goes_down_on_a_small_overfit_set(tmp_path, data):
    argv = base_flags(tmp_path, data, max_train_steps=60, learning_rate=3e-3, network_dim=8,
                      network_args=["conv_dim=4", "conv_alpha=4"], cache_latents=True, logging_dir=tmp_path / "logs")
    assert train_lora.main(argv) == 0
    before = fixed_eval_loss(None, data)
    after = fixed_eval_loss(tmp_path / "out" / "t.safetensors", data)
    assert after < 0.9 * before, (before, after)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = [EventAccumulator(str(d)).Reload() for d in {p.parent for p in (tmp_path / "logs").rglob("events.*")}]
    [scalars] = [run for run in runs if "loss/current" in run.Tags()["scalars"]]
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder"} <= set(scalars.Tags()["scalars"])
    assert len(scalars.Scalars("loss/current")) == 60


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_every_lora_parameter_of_both_models_trains(tmp_path, checkpointing):
    # 128 px: at 64 px the mid block sees a single token, where attention has no gradient for q and k
    data = make_dataset(tmp_path, size=128)
    argv = base_flags(tmp_path, data, resolution=128, max_train_steps=2, save_every_n_steps=1,
                      optimizer_args=["weight_decay=0"],
                      gradient_checkpointing=checkpointing, network_args=["conv_dim=2"])
    assert train_lora.main(argv) == 0
    step1, _ = read(tmp_path / "out" / "t-step00000001.safetensors")
    step2, meta = read(tmp_path / "out" / "t-step00000002.safetensors")
    ups = [k for k in step1 if k.endswith("lora_up.weight")]
    downs = [k for k in step1 if k.endswith("lora_down.weight")]
    assert len(ups) == 278 + 72 and any(k.startswith("lora_te_") for k in ups)
    # lora_up starts at zero: after one AdamW step (no decay) it moved iff it had a gradient
    dead_up = [k for k in ups if step1[k].abs().sum() == 0]
    # lora_down first gets a gradient at step 2, once lora_up is non-zero
    dead_down = [k for k in downs if torch.equal(step1[k], step2[k])]
    assert not dead_up and not dead_down, (dead_up[:3], dead_down[:3])
    assert meta["ss_steps"] == "2" and meta["ss_gradient_checkpointing"] == str(checkpointing)


def test_output_loads_in_diffusers_with_every_key_applied(tmp_path, data):
    from diffusers import StableDiffusionPipeline

    from lora_diffusion.models import load_models

    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=2, save_precision="fp16",
                                      network_args=["conv_dim=4", "conv_alpha=1"])) == 0
    tensors, meta = read(tmp_path / "out" / "t.safetensors")
    assert all(t.dtype == torch.float16 for t in tensors.values())
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_num_train_images", "ss_dataset_dirs", "ss_tag_frequency", "ss_seed", "ss_optimizer",
                "sshs_model_hash", "modelspec.architecture"):
        assert key in meta, key
    models = load_models("builtin:tiny")
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=models.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name="t.safetensors")
    modules = {k.split(".")[0] for k in tensors}
    wrapped_unet = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    wrapped_te = [n for n, m in pipe.text_encoder.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(wrapped_unet) == sum(m.startswith("lora_unet_") for m in modules) == 278
    assert len(wrapped_te) == sum(m.startswith("lora_te_") for m in modules) == 72


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, data):
    flags = dict(max_train_steps=6, save_every_n_steps=3, save_state=True, network_dropout=0.1,
                 shuffle_caption=True, noise_offset=0.05, lr_scheduler="cosine", lr_warmup_steps=2)
    assert train_lora.main(base_flags(tmp_path / "a", data, **flags)) == 0
    state = tmp_path / "a" / "out" / "t-step00000003-state"
    assert (state / "train_state.json").is_file()
    resumed = dict(flags, resume=state)
    assert train_lora.main(base_flags(tmp_path / "b", data, **resumed)) == 0
    uninterrupted, meta_a = read(tmp_path / "a" / "out" / "t.safetensors")
    continued, meta_b = read(tmp_path / "b" / "out" / "t.safetensors")
    assert meta_b["ss_steps"] == "6"
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], continued[key]), key


def test_the_lora_trains_with_its_dropout_after_each_sampling(tmp_path, data, monkeypatch):
    from lora_diffusion.core.adapters import LoRALayer

    modes, real = [], LoRALayer.lora_delta

    def spy(layer, x):
        if torch.is_grad_enabled():  # a training step (sampling runs under no_grad)
            modes.append(layer.training)
        return real(layer, x)

    monkeypatch.setattr(LoRALayer, "lora_delta", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("toy, square --d 1 --s 1\n")
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=3, network_dropout=0.3,
                                      sample_prompts=prompts, sample_every_n_steps=1)) == 0
    assert len(list((tmp_path / "out" / "sample").glob("t_0*.png"))) == 3
    assert modes and all(modes)


def test_the_last_samples_end_in_one_grid_with_the_judges_verdict(tmp_path, data, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star on a blue background --d 1 --s 1\ntoy, square --d 2 --s 1\n")
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=2, sample_prompts=prompts,
                                      sample_every_n_steps=1)) == 0
    out = capsys.readouterr().out
    grid = tmp_path / "out" / "sample" / "t_grid.png"
    assert f"in one grid: {grid}" in out
    assert Image.open(grid).size == (128, 64)  # the 2 samples of step 2, not the 4 of the run
    last = sorted((tmp_path / "out" / "sample").glob("t_000002_*.png"))
    pasted = np.asarray(Image.open(grid).convert("RGB"))
    assert np.array_equal(pasted[:, :64], np.asarray(Image.open(last[0]).convert("RGB")))
    [line] = [x for x in out.splitlines() if x.startswith("judged (shapes world): ")]
    assert line.endswith("of 1 samples") and "shape " in line and "all " in line


def test_non_finite_loss_stops_before_a_broken_file(tmp_path, data, monkeypatch, capsys):
    from lora_diffusion.training.objective import Objective

    calls = {"n": 0}
    real_loss = Objective.loss

    def loss_that_breaks(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(Objective, "loss", loss_that_breaks)
    code = train_lora.main(base_flags(tmp_path, data, max_train_steps=5, save_every_n_steps=1))
    assert code == 2
    assert "loss became nan at step 3" in capsys.readouterr().err
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t-step00000001.safetensors",
                                                                  "t-step00000002.safetensors"]
    tensors, _ = read(out / "t-step00000002.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_epoch_files_rotate_and_carry_their_epoch(tmp_path, data):
    # 20 samples / batch 2 = 10 steps an epoch; 4 epochs, a file every epoch, keep the last 2 (+ the final file)
    argv = base_flags(tmp_path, data, max_train_epochs=4, save_every_n_epochs=1, save_last_n_epochs=2,
                      save_state=True, learning_rate=1e-4)
    assert train_lora.main(argv) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t-000002.safetensors", "t-000003.safetensors",
                                                                 "t.safetensors"]
    assert sorted(p.name for p in out.glob("*-state")) == ["t-000002-state", "t-000003-state", "t-state"]
    assert read(out / "t-000003.safetensors")[1]["ss_epoch"] == "3"
    assert read(out / "t.safetensors")[1]["ss_epoch"] == "4" and read(out / "t.safetensors")[1]["ss_steps"] == "40"


def test_accumulation_steps_end_with_each_epoch_and_every_epoch_samples(tmp_path, data):
    # 10 batches an epoch, 3 per step: steps of 3+3+3+1 batches, so 4 steps an epoch and 8 for two epochs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("toy, a square --w 64 --h 64 --s 2 --d 5\n")
    argv = base_flags(tmp_path, data, max_train_epochs=2, gradient_accumulation_steps=3,
                      sample_prompts=prompts, sample_every_n_epochs=1, network_dropout=0.5)
    assert train_lora.main(argv) == 0
    _, meta = read(tmp_path / "out" / "t.safetensors")
    assert (meta["ss_steps"], meta["ss_max_train_steps"], meta["ss_epoch"]) == ("8", "8", "2")
    samples = sorted(p.name for p in (tmp_path / "out" / "sample").glob("*.png"))
    assert [name.split("_")[1] for name in samples] == ["e000001", "e000002", "grid.png"]  # the last epoch, once


def test_bf16_accumulation_and_8bit_adam(tmp_path):
    data = make_dataset(tmp_path, size=128)  # 128 px: the mid block's self-attention sees more than one token
    argv = base_flags(tmp_path, data, resolution=128, max_train_steps=2, mixed_precision="bf16",
                      gradient_accumulation_steps=2,
                      optimizer_type="AdamW8bit", lr_scheduler="linear", min_snr_gamma=5, noise_offset=0.1,
                      save_every_n_steps=1)
    assert train_lora.main(argv) == 0
    tensors, meta = read(tmp_path / "out" / "t.safetensors")
    assert meta["ss_steps"] == "2" and meta["ss_mixed_precision"] == "bf16"
    assert "AdamW8bit" in meta["ss_optimizer"] and meta["ss_gradient_accumulation_steps"] == "2"
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    ups = [k for k in tensors if k.endswith("lora_up.weight")]
    assert all(tensors[k].abs().sum() > 0 for k in ups)  # two micro-batches per step still reach every module


def test_v_prediction_runs_and_is_recorded(tmp_path, data):
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=2, v_parameterization=True,
                                      min_snr_gamma=5)) == 0
    _, meta = read(tmp_path / "out" / "t.safetensors")
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_min_snr_gamma"] == "5.0"


def test_ctrl_c_saves_the_lora_and_a_resumable_state(tmp_path, data, monkeypatch):
    import signal

    from lora_diffusion.training.objective import Objective

    calls = {"n": 0}
    real_loss = Objective.loss

    def ctrl_c_in_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: step 3 still ends, then the run saves and stops
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(Objective, "loss", ctrl_c_in_step_3)
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=5)) == 130
    tensors, meta = read(tmp_path / "out" / "t-step00000003.safetensors")
    assert meta["ss_steps"] == "3" and len(tensors) == 3 * (192 + 72)
    assert (tmp_path / "out" / "t-step00000003-state" / "train_state.json").is_file()
    monkeypatch.setattr(Objective, "loss", real_loss)
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=5,
                                      resume=tmp_path / "out" / "t-step00000003-state")) == 0
    assert read(tmp_path / "out" / "t.safetensors")[1]["ss_steps"] == "5"


def test_frozen_text_encoder_outputs_are_cached(tmp_path, data, monkeypatch):
    import lora_diffusion.models.sd as family  # the SD family's text encoding, which the loop asks for

    calls = count_calls(monkeypatch, family, "encode_prompts")
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=4, network_train_unet_only=True,
                                      cache_latents=True)) == 0
    assert calls["n"] == 1  # the 4 captions once, before the loop; never inside it
    tensors, _ = read(tmp_path / "out" / "t.safetensors")
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)


@pytest.mark.parametrize("flags,message", [
    (dict(pretrained_model_name_or_path="/nonexistent/model.safetensors"), "not found"),
    (dict(train_data_dir="__EMPTY__"), "no training data found"),
    (dict(network_args=["conv_rank=4"]), "--network_args 'conv_rank=4'"),
    (dict(optimizer_type="NoSuchOptimizer"), "NoSuchOptimizer"),
    (dict(resume="__DATA__"), "--resume"),
    (dict(network_weights="__DATA__/missing.safetensors"), "not found"),
    (dict(sample_prompts="__DATA__/nope.txt"), "nope.txt"),
    (dict(network_train_unet_only=True, network_train_text_encoder_only=True), "exclude each other"),
])
def test_bad_input_gets_a_clear_error(tmp_path, data, capsys, flags, message):
    (tmp_path / "empty").mkdir()
    flags = {k: (str(v).replace("__EMPTY__", str(tmp_path / "empty")).replace("__DATA__", str(data))
                 if isinstance(v, str) else v) for k, v in flags.items()}
    assert train_lora.main(base_flags(tmp_path, data, **flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_config_files_toml_and_kohya_ss_gui_json(tmp_path, data, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(f'[model]\npretrained_model_name_or_path = "builtin:tiny"\n[data]\ntrain_data_dir = "{data}"\n'
                    f'resolution = "64"\n[x]\nnetwork_dim = 2\nmax_train_steps = 1\noutput_dir = "{tmp_path}/o"\n'
                    f'max_data_loader_n_workers = 0\n')
    args = train_lora.parse_args(["--config_file", str(toml), "--network_dim", "3"])
    assert args.network_dim == 3 and args.max_train_steps == 1 and args.resolution == "64"  # the command line wins
    toml.write_text(toml.read_text() + "netwrok_alpha = 2\n")  # a warning with the nearest flag; the run goes on
    with pytest.warns(UserWarning, match="netwrok_alpha .*did you mean --network_alpha"):
        assert train_lora.parse_args(["--config_file", str(toml)]).network_alpha == 1.0
    assert train_lora.main(["--config_file", str(toml), "--netwrok_alpha", "2"]) == 2  # on the command line: error
    assert "did you mean --network_alpha" in capsys.readouterr().err

    gui = tmp_path / "unbias.json"
    gui.write_text('{"LoRA_type": "Kohya LoCon", "pretrained_model_name_or_path": "builtin:tiny", '
                   f'"train_data_dir": "{data}", "max_resolution": "64,64", "epoch": 2, "optimizer": "AdamW", '
                   '"lr_warmup": 10, "conv_dim": 4, "conv_alpha": 2, "network_dim": 8, "network_alpha": 4, '
                   '"save_model_as": "safetensors", "stop_text_encoder_training": 3, "caption_extension": ".txt", '
                   '"additional_parameters": "--max_grad_norm=0.5", "seed": "", "unet_lr": 0.0001}')
    with pytest.warns(UserWarning, match="stop_text_encoder_training"):
        args = train_lora.parse_args(["--config_file", str(gui)])
    assert (args.max_train_epochs, args.resolution, args.lr_warmup_steps, args.max_grad_norm) == (2, "64,64", 0.1, 0.5)
    assert args.network_args == ["conv_dim=4", "conv_alpha=2"] and args.network_dim == 8 and args.seed == 42

    assert train_lora.main(["--config_file", str(toml.with_name("c2.toml")), "--output_config"]) == 2
    out_config = base_flags(tmp_path, data, network_dim=7, output_config=True)
    assert train_lora.main(out_config) == 0
    written = tmp_path / "out" / "t.toml"
    again = train_lora.parse_args(["--config_file", str(written)])
    assert again.network_dim == 7 and again.train_data_dir == str(data)


@pytest.mark.parametrize("config", sorted((ROOT / "examples").rglob("*.toml")), ids=lambda p: p.name)
def test_shipped_example_configs_parse_and_name_folders_that_exist(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples are run from the repository root
    args = train_lora.parse_args(["--config_file", str(config)])
    script = config.parent / "run.sh"  # an example that makes its data first (examples/three_captions)
    for folder in (args.train_data_dir, args.reg_data_dir):
        if folder is not None and script.exists() and Path(folder).parts[0] == "output":
            assert str(Path(folder).relative_to("output").parts[0]) in script.read_text(), folder
            continue
        assert folder is None or any(Path(folder).glob("*_*/*.png")), folder


def test_latents_are_cached_by_default_unless_crops_are_random(data):
    base = ["--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir", str(data)]
    assert train_lora.parse_args(base).cache_latents is True
    assert train_lora.parse_args(base + ["--no_cache_latents"]).cache_latents is False
    assert train_lora.parse_args(base + ["--random_crop"]).cache_latents is False
    with pytest.raises(train_lora.TrainingError, match="exclude each other"):
        train_lora.parse_args(base + ["--random_crop", "--cache_latents"])


def test_reg_target_base_model_trains_reg_images_toward_the_base_models_prediction(tmp_path, data, monkeypatch):
    """--reg_target base_model: regularization samples' target is what the model without the LoRA predicts,
    recomputed here with a fresh builtin:tiny and diffusers' modules; training samples keep the noise."""
    from lora_diffusion.models import load_models
    from lora_diffusion.training import loop
    from lora_diffusion.training.objective import Objective

    reg = make_dataset(tmp_path, name="reg")
    seen = []
    real_target, real_loss, real_compute = Objective.noisy_and_target, Objective.loss, loop.compute_loss

    def compute_loss(run, batch):
        seen.append({"captions": list(batch["captions"])})
        return real_compute(run, batch)

    def noisy_and_target(self, scheduler, latents, noise, timesteps, v_parameterization):
        noisy, target = real_target(self, scheduler, latents, noise, timesteps, v_parameterization)
        seen[-1].update(noisy=noisy, noise_target=target, timesteps=timesteps)
        return noisy, target

    def loss(self, pred, target, **kwargs):
        seen[-1].update(pred=pred.detach(), target=target, is_reg=kwargs["is_reg"])
        return real_loss(self, pred, target, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", compute_loss)
    monkeypatch.setattr(Objective, "noisy_and_target", noisy_and_target)
    monkeypatch.setattr(Objective, "loss", loss)
    argv = base_flags(tmp_path, data, reg_data_dir=reg, reg_target="base_model", max_train_steps=3,
                      learning_rate=1e-2, train_batch_size=4)
    assert train_lora.main(argv) == 0

    base = load_models("builtin:tiny")
    last = seen[-1]
    is_reg = last["is_reg"]
    assert is_reg.any() and not is_reg.all()
    with torch.no_grad():
        ids = base.tokenizer(last["captions"], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        expected = base.unet(last["noisy"], last["timesteps"], base.text_encoder(ids).last_hidden_state).sample
    torch.testing.assert_close(last["target"][is_reg], expected[is_reg], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last["target"][~is_reg], last["noise_target"][~is_reg])
    # the LoRA was on for the prediction that trains, and has moved it away from the base model's by step 3
    assert not torch.allclose(last["pred"][is_reg], expected[is_reg], atol=1e-4)
