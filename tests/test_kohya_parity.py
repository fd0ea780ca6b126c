"""kohya parity: every flag of kohya's train_network.py is a flag here (kohya's meaning, or a refusal with the reason
before any work), kohya_ss GUI files read by the GUI's rules, and kohya's losses, noise and schedules checked
against the formulas written out here (and diffusers' own zero-terminal-SNR rescale)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_lora
from lora_diffusion import training
from lora_diffusion.options import trainer_options
from lora_diffusion.options.docs_table import BEGIN, END, flag_table

ROOT = Path(__file__).resolve().parents[1]
KOHYA_FLAGS = json.loads((ROOT / "benchmarks" / "kohya_flags.json").read_text())["flags"]


def flags_of(parser):
    return {s.lstrip("-") for action in parser._actions for s in action.option_strings}


def test_every_kohya_flag_is_a_flag_here():
    ours = flags_of(train_lora.build_parser())
    missing = [f["name"] for f in KOHYA_FLAGS if f["name"] not in ours]
    assert len(KOHYA_FLAGS) >= 190 and not missing


def test_kohya_defaults_kept_where_kohya_and_we_mean_the_same():
    """The defaults that change what trains are kohya's (ours differ only where documented: the lr, steps, seed,
    optimizer and output names that kohya leaves unset)."""
    ours = {o.name: o for o in trainer_options()}
    ours_differ = {"caption_extension", "max_data_loader_n_workers", "seed", "optimizer_type", "learning_rate",
                   "output_dir", "output_name", "network_module", "network_dim", "network_dropout", "noise_offset",
                   "multires_noise_iterations", "min_timestep", "max_timestep", "log_prefix", "save_precision",
                   "cache_latents", "resolution", "validation_split", "network_args", "optimizer_args",
                   "min_bucket_reso", "max_bucket_reso", "keep_tokens_separator", "mixed_precision",
                   "max_token_length", "lr_scheduler_args", "base_weights", "base_weights_multiplier",
                   "text_encoder_lr", "dataset_config", "validate_every_n_epochs", "caption_extention"}
    for flag in KOHYA_FLAGS:
        option = ours[flag["name"]]
        if flag["name"] in ours_differ or option.dest:
            continue
        assert option.default == flag["default"] or (option.default in (False, None) and flag["default"] in
                                                     (False, None)), flag["name"]


def refused_argv(option):
    value = [] if option.type is bool else ["1" if option.type in (int, float) else "x"]
    if option.choices:
        value = [str(next(c for c in option.choices if c != option.default))]
    return [f"--{option.name}", *value]


@pytest.mark.parametrize("option", [o for o in trainer_options() if o.refused], ids=lambda o: o.name)
def test_a_flag_that_cannot_run_here_stops_before_any_work_with_its_reason(option, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir", str(tmp_path / "none"),
            "--output_dir", str(tmp_path / "out"), *refused_argv(option)]
    assert train_lora.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--{option.name}: {option.refused}" in err
    assert not (tmp_path / "out").exists()


def test_a_prefix_of_a_flag_is_an_error_that_names_the_flag(capsys):
    assert train_lora.main(["--learning_rat", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--learning_rat" in err and "did you mean --learning_rate" in err


def test_the_model_path_is_checked_before_the_data(tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "sd15.safetensors"), "--train_data_dir",
            str(tmp_path / "nothing")]
    assert train_lora.main(argv) == 2
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999999"])
def test_a_seed_out_of_range_names_the_flag(seed, capsys):
    assert train_lora.main(["--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir", "x",
                            "--seed", seed]) == 2
    assert "--seed" in capsys.readouterr().err


def test_the_flag_table_in_the_guide_is_the_declarations():
    page = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    table = page[page.index(BEGIN):page.index(END) + len(END)]
    assert table == flag_table(), "run: python -m lora_diffusion.options.docs_table docs/guide.md"


# ---------------------------------------------------------------- kohya_ss GUI files


def gui_args(tmp_path, **document):
    document = {"LoRA_type": "Standard", "pretrained_model_name_or_path": "builtin:tiny",
                "train_data_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), **document}
    path = tmp_path / "gui.json"
    path.write_text(json.dumps(document))
    return train_lora.parse_args(["--config_file", str(path)])


def test_gui_zero_and_empty_mean_unset(tmp_path):
    args = gui_args(tmp_path, save_every_n_steps=0, vae_batch_size=0, seed=0, max_timestep=0, min_snr_gamma=0,
                    clip_skip="", sample_every_n_epochs=0, max_train_steps="0", unet_lr=1e-4, text_encoder_lr=5e-5)
    assert (args.save_every_n_steps, args.vae_batch_size, args.seed, args.max_timestep, args.min_snr_gamma,
            args.clip_skip, args.sample_every_n_epochs, args.max_train_steps) == (None, 1, 42, 1000, None, None,
                                                                                    None, 1600)


@pytest.mark.parametrize("choice,xformers,sdpa", [("sdpa", False, True), ("none", False, False)])
def test_gui_attention_is_a_choice_string(tmp_path, choice, xformers, sdpa):
    args = gui_args(tmp_path, xformers=choice)
    assert (args.xformers, args.sdpa) == (xformers, sdpa)


def test_gui_xformers_without_xformers_warns_and_uses_sdpa(tmp_path):
    pytest.importorskip("importlib").util.find_spec("xformers") is None or pytest.skip("xformers is installed")
    with pytest.warns(UserWarning, match="xformers is not installed"):
        args = gui_args(tmp_path, xformers="xformers")
    assert (args.xformers, args.sdpa) == (False, True)


def test_gui_args_fields_lose_their_quotes_as_in_the_gui(tmp_path):
    args = gui_args(tmp_path, optimizer="AdamW", optimizer_args='"weight_decay=0.1" "betas=0.9,0.99"',
                    lr_scheduler_args='"T_max=100"')
    assert args.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"] and args.lr_scheduler_args == ["T_max=100"]


def test_gui_lora_type_picks_the_network(tmp_path):
    args = gui_args(tmp_path, LoRA_type="LyCORIS/LoKr", LyCORIS_preset="full", conv_dim=8, conv_alpha=4, factor=4,
                    use_cp=True, decompose_both=False, rank_dropout=0, module_dropout=0)
    assert args.network_module == "lycoris.kohya"
    assert {"algo=lokr", "factor=4", "use_cp=True", "conv_dim=8", "preset=full"} <= set(args.network_args)
    args = gui_args(tmp_path, LoRA_type="Kohya LoCon", conv_dim=8, conv_alpha=4, block_dims="", down_lr_weight="")
    assert args.network_module == "networks.lora" and args.network_args == ["conv_dim=8", "conv_alpha=4"]


def test_gui_learning_rates_decide_what_trains(tmp_path):
    assert gui_args(tmp_path, unet_lr=1e-4, text_encoder_lr=0).network_train_unet_only
    assert gui_args(tmp_path, unet_lr=0, text_encoder_lr=1e-4).network_train_text_encoder_only


def test_gui_sample_prompts_are_the_prompts(tmp_path):
    args = gui_args(tmp_path, sample_prompts="a red star --w 64 --h 64\na blue circle")
    assert Path(args.sample_prompts).read_text() == "a red star --w 64 --h 64\na blue circle\n"
    assert Path(args.sample_prompts).parent == tmp_path / "out" / "sample"


def test_gui_noise_offset_type_picks_the_noise(tmp_path):
    args = gui_args(tmp_path, noise_offset_type="Multires", noise_offset=0.05, multires_noise_iterations=6,
                    multires_noise_discount=0.3, adaptive_noise_scale=0.01)
    assert (args.noise_offset, args.multires_noise_iterations, args.adaptive_noise_scale) == (0.0, 6, None)
    args = gui_args(tmp_path, noise_offset_type="Original", noise_offset=0.05, multires_noise_iterations=6,
                    adaptive_noise_scale=0.01)
    assert (args.noise_offset, args.multires_noise_iterations, args.adaptive_noise_scale) == (0.05, 0, 0.01)


def test_a_flux_gui_file_is_refused_in_one_line_naming_the_family(tmp_path, capsys):
    path = tmp_path / "flux.json"
    path.write_text(json.dumps({"LoRA_type": "Flux1", "flux1_checkbox": True}))
    assert train_lora.main(["--config_file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FLUX.1" in err and str(path) in err


def test_a_gui_key_that_trains_but_is_not_here_is_named(tmp_path):
    with pytest.warns(UserWarning, match="stop_text_encoder_training"):
        gui_args(tmp_path, stop_text_encoder_training=5)


# ---------------------------------------------------------------- losses, noise, schedules (kohya's formulas)


class Schedule:
    """A DDPM schedule with the scaled-linear betas of SD, as diffusers builds it."""

    def __init__(self):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000)
        self.a = self.scheduler.alphas_cumprod


def test_huber_and_smooth_l1_with_each_schedule():
    s = Schedule()
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    d2 = (pred - target) ** 2
    sigma = ((1 - s.a[t]) / s.a[t]).sqrt()
    cs = {"constant": torch.full((3,), 0.2 * 2.0), "exponential": 0.2 ** (t / 1000) * 2.0,
          "snr": (1 - 0.2) / (1 + sigma) ** 2 + 0.2}
    for schedule, c in cs.items():
        c4 = c.view(-1, 1, 1, 1)
        expected = {"huber": 2 * c4 * ((d2 + c4**2).sqrt() - c4), "smooth_l1": 2 * ((d2 + c4**2).sqrt() - c4)}
        for loss_type, element in expected.items():
            loss = training.diffusion_loss(pred, target, timesteps=t, noise_scheduler=s.scheduler, loss_type=loss_type,
                                           huber_schedule=schedule, huber_c_value=0.2, huber_scale=2.0)
            assert torch.allclose(loss, element.mean(), rtol=1e-5), (schedule, loss_type)
    l1 = training.diffusion_loss(pred, target, timesteps=t, noise_scheduler=s.scheduler, loss_type="l1")
    assert torch.allclose(l1, (pred - target).abs().mean())


def test_snr_weightings_of_the_loss():
    s = Schedule()
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 300, 800])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = (s.a[t] / (1 - s.a[t])).clamp(max=1000)

    def loss(**kw):
        return training.diffusion_loss(pred, target, timesteps=t, noise_scheduler=s.scheduler, **kw)

    assert torch.allclose(loss(debiased_estimation_loss=True), (per_sample / snr.sqrt()).mean(), rtol=1e-5)
    assert torch.allclose(loss(debiased_estimation_loss=True, v_parameterization=True),
                          (per_sample / (snr + 1)).mean(), rtol=1e-5)
    assert torch.allclose(loss(scale_v_pred_loss_like_noise_pred=True), (per_sample * snr / (snr + 1)).mean(),
                          rtol=1e-5)
    assert torch.allclose(loss(v_pred_like_loss=0.5), (per_sample + per_sample * (snr + 1) / snr * 0.5).mean(),
                          rtol=1e-5)


def test_masked_loss_weights_each_latent_pixel_by_the_masks_area_mean():
    s = Schedule()
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = (torch.rand(2, 64, 64, generator=g) > 0.5).float()  # pixel masks, 8x the latent size
    t = torch.tensor([100, 200])
    expected = (((pred - target) ** 2) * F.avg_pool2d(mask[:, None], 8)).mean()
    got = training.diffusion_loss(pred, target, timesteps=t, noise_scheduler=s.scheduler, mask=mask)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_noise_offset_random_strength_and_adaptive_scale():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) + 0.5
    noise = training.make_noise(latents, noise_offset=0.1, noise_offset_random_strength=True,
                                adaptive_noise_scale=0.02, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # the same draws, in kohya's order
    base = torch.randn(latents.shape, generator=g)
    strength = torch.rand(1, generator=g) * 0.1
    offset = (strength + 0.02 * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    expected = base + offset * torch.randn((2, 4, 1, 1), generator=g)
    assert torch.allclose(noise, expected)


def test_input_perturbation_noises_the_input_only():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    perturbed = training.perturbed_noise(noise, 0.1, random_strength=True, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)
    gamma = torch.rand(1, generator=g) * 0.1
    assert torch.allclose(perturbed, noise + gamma * torch.randn(noise.shape, generator=g))
    assert training.perturbed_noise(noise, None) is noise


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    s = Schedule()
    rescaled = training.with_zero_terminal_snr(s.scheduler)
    theirs = torch.cumprod(1 - rescale_zero_terminal_snr(s.scheduler.betas), dim=0)
    assert torch.allclose(rescaled.alphas_cumprod, theirs, atol=1e-6)
    assert rescaled.alphas_cumprod[-1] < 1e-9 and torch.equal(s.scheduler.alphas_cumprod, s.a)  # a copy


def lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_kohya_schedules_by_their_formulas():
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    cos = training.create_lr_scheduler("cosine_with_min_lr", optimizer(), num_training_steps=100,
                                       lr_scheduler_min_lr_ratio=0.1)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 100)) for s in range(100)]
    assert lrs(cos, 100) == pytest.approx(expected, abs=1e-6)
    inv = training.create_lr_scheduler("inverse_sqrt", optimizer(), num_training_steps=100, lr_warmup_steps=10,
                                       lr_scheduler_timescale=10)
    assert lrs(inv, 40) == pytest.approx([s / 10 for s in range(10)] + [1 / math.sqrt(s / 10) for s in range(10, 40)],
                                         abs=1e-6)
    wsd = training.create_lr_scheduler("warmup_stable_decay", optimizer(), num_training_steps=100,
                                       lr_warmup_steps=10, lr_decay_steps=0.2)
    got = lrs(wsd, 100)
    assert got[:10] == pytest.approx([s / 10 for s in range(10)]) and got[10:80] == pytest.approx([1.0] * 70)
    assert got[80:] == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 20)) for s in range(20)], abs=1e-6)
    torch_class = training.create_lr_scheduler("constant", optimizer(), num_training_steps=100,
                                               lr_scheduler_type="CosineAnnealingLR",
                                               lr_scheduler_args=["T_max=50", "eta_min=0.0"])
    assert lrs(torch_class, 20) == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 50)) for s in range(20)])


@pytest.mark.parametrize("name,module,cls", [("DAdaptAdam", "dadaptation", "DAdaptAdam"),
                                             ("DAdaptation", "dadaptation", "DAdaptAdam"),
                                             ("DAdaptLion", "dadaptation", "DAdaptLion"),
                                             ("AdamWScheduleFree", "schedulefree", "AdamWScheduleFree"),
                                             ("SGDScheduleFree", "schedulefree", "SGDScheduleFree")])
def test_kohya_optimizer_names_build_their_classes(name, module, cls):
    pytest.importorskip(module)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.5}]
    optimizer = training.create_optimizer(name, groups, learning_rate=1.0, optimizer_args=["weight_decay=0.1"])
    assert type(optimizer).__name__ == cls and type(optimizer).__module__.startswith(module)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 0.5]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1]


def test_schedule_free_weights_are_saved_at_the_averaged_point():
    """kohya's rule for schedule-free optimizers: save, sample and validate with the optimizer in eval mode (the
    averaged point x), and train at y = (1 - beta) z + beta x: both written out here from schedule-free's paper."""
    schedulefree = pytest.importorskip("schedulefree")
    from types import SimpleNamespace

    from lora_diffusion.training.loop import eval_weights

    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = schedulefree.SGDScheduleFree([p], lr=0.1, momentum=0.9, warmup_steps=0)
    optimizer.train()
    for grad in ([1.0, -2.0, 0.5], [0.5, 1.0, -1.0], [2.0, 0.0, 1.0]):
        p.grad = torch.tensor(grad)
        optimizer.step()
    y = p.detach().clone()
    z = optimizer.state[p]["z"].clone()
    x = (y - (1 - 0.9) * z) / 0.9
    with eval_weights(SimpleNamespace(optimizer=optimizer)):
        assert torch.allclose(p.detach(), x, atol=1e-6) and not torch.allclose(x, y)
    assert torch.allclose(p.detach(), y, atol=1e-6)


def test_schedule_free_run_trains_and_saves(tmp_path):
    pytest.importorskip("schedulefree")
    from test_train import base_flags, make_dataset, read

    data = make_dataset(tmp_path, n=2)
    assert train_lora.main(base_flags(tmp_path, data, optimizer_type="AdamWScheduleFree", max_train_steps=3,
                                      learning_rate=1e-2, lr_scheduler="cosine")) == 0
    tensors, _ = read(tmp_path / "out" / "t.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in tensors.items())


# ---------------------------------------------------------------- files: --vae, modelspec, --no_metadata


def test_a_separate_vae_file_in_the_original_naming_replaces_the_models(tmp_path):
    from safetensors.torch import save_file

    from lora_diffusion.models import load_models
    from lora_diffusion.models.convert import vae_original_name

    vae = load_models("builtin:tiny").vae
    levels = len(vae.config.up_block_types)
    g = torch.Generator().manual_seed(7)
    changed = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in vae.state_dict().items()}
    original = {}
    for key, value in changed.items():
        name = vae_original_name(key, levels)
        original[name] = value.reshape(*value.shape, 1, 1) if "attention" in key and value.ndim == 2 else value
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "vae.safetensors"))
    args = train_lora.parse_args(["--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir", "x",
                                  "--vae", str(tmp_path / "vae.safetensors")])
    models = train_lora.load_base_models(args, torch.float32, "cpu")
    for key, value in models.vae.state_dict().items():
        assert torch.equal(value, changed[key]), key


def test_modelspec_flags_and_no_metadata(tmp_path):
    from test_train import base_flags, make_dataset, read

    data = make_dataset(tmp_path, n=2)
    argv = base_flags(tmp_path, data, max_train_steps=1, metadata_title="Star", metadata_author="me",
                      metadata_tags="shapes,star", no_metadata=True)
    assert train_lora.main(argv) == 0
    _, metadata = read(tmp_path / "out" / "t.safetensors")
    assert (metadata["modelspec.title"], metadata["modelspec.author"], metadata["modelspec.tags"]) == \
        ("Star", "me", "shapes,star")
    assert "ss_network_dim" in metadata and "ss_learning_rate" not in metadata and "ss_seed" not in metadata


def test_full_bf16_trains_bf16_weights(tmp_path):
    from test_train import base_flags, make_dataset, read

    data = make_dataset(tmp_path, n=2)
    argv = base_flags(tmp_path, data, max_train_steps=2, mixed_precision="bf16", full_bf16=True)
    assert train_lora.main(argv) == 0
    tensors, _ = read(tmp_path / "out" / "t.safetensors")  # without --save_precision: the weights' own dtype
    assert {value.dtype for value in tensors.values()} == {torch.bfloat16}
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in tensors.items())
    assert train_lora.main(base_flags(tmp_path, data, full_bf16=True)) == 2


def test_save_last_n_steps_keeps_the_files_of_the_last_n_steps(tmp_path):
    """kohya's rule: after the file of step S, the files of steps before S - N are gone (states by their own N)."""
    from test_train import base_flags, make_dataset

    data = make_dataset(tmp_path, n=2)
    argv = base_flags(tmp_path, data, max_train_steps=8, train_batch_size=1, save_every_n_steps=2,
                      save_last_n_steps=4, save_state=True, save_last_n_steps_state=2)
    assert train_lora.main(argv) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("t-step*.safetensors")) == [f"t-step{s:08d}.safetensors" for s in (4, 6, 8)]
    assert sorted(p.name for p in out.glob("t-step*-state")) == [f"t-step{s:08d}-state" for s in (6, 8)]


def test_save_n_epoch_ratio_sets_the_epoch_interval(tmp_path):
    from test_train import base_flags, make_dataset

    data = make_dataset(tmp_path, n=2)  # 2 images x 5 repeats, batch 10: a step an epoch
    argv = base_flags(tmp_path, data, max_train_epochs=6, max_train_steps=None, save_n_epoch_ratio=3,
                      train_batch_size=10)
    assert train_lora.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("t-0*.safetensors")) == \
        ["t-000002.safetensors", "t-000004.safetensors"]  # every 6 // 3 = 2 epochs; the last is t.safetensors


def test_log_with_wandb_runs_offline_into_the_logging_dir(tmp_path):
    pytest.importorskip("wandb")
    import os

    from test_train import base_flags, make_dataset

    before = {name: os.environ.pop(name, None) for name in ("WANDB_MODE", "WANDB_DIR")}
    data = make_dataset(tmp_path, n=2)
    argv = base_flags(tmp_path, data, max_train_steps=2, log_with="all", logging_dir=tmp_path / "logs",
                      log_tracker_name="stars", wandb_run_name="first")
    try:
        assert train_lora.main(argv) == 0
        assert os.environ["WANDB_MODE"] == "offline"  # no network needed, nothing uploaded
    finally:
        for name, value in before.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))  # and TensorBoard's


def test_scale_weight_norms_bounds_every_module_and_base_weights_merge(tmp_path, capsys):
    """kohya's max-norm rule on the saved file: each module's ||up @ down|| x alpha / rank is at most the bound."""
    from lora_diffusion import create_network
    from lora_diffusion.models import load_models
    from test_train import base_flags, make_dataset, read

    data = make_dataset(tmp_path, n=2)
    models = load_models("builtin:tiny")
    base = create_network(models.unet, models.text_encoder, rank=4, alpha=4)
    for p in base.parameters():
        p.data.normal_(0, 0.1)
    base.save_weights(tmp_path / "base.safetensors")
    argv = base_flags(tmp_path, data, max_train_steps=3, learning_rate=0.5, scale_weight_norms=0.05,
                      base_weights=[tmp_path / "base.safetensors"], base_weights_multiplier=[0.5])
    assert train_lora.main(argv) == 0
    assert "merged into the model" in capsys.readouterr().out
    tensors, metadata = read(tmp_path / "out" / "t.safetensors")
    assert metadata["ss_scale_weight_norms"] == "0.05"
    norms = []
    for key, up in tensors.items():
        if key.endswith(".lora_up.weight"):
            stem = key[: -len(".lora_up.weight")]
            down, alpha = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.alpha"]
            delta = up.flatten(1).float() @ down.flatten(1).float() * (alpha.float() / down.shape[0])
            norms.append(delta.norm().item())
    assert norms and max(norms) <= 0.05 * 1.001 and max(norms) > 0.04  # lr 0.5 pushes them to the bound
