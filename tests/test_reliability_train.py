"""train_lora.py against hostile or unlucky input (issue 14): a state folder never runs code, rotation deletes only
this run's files, no NaN/inf reaches the disk, Ctrl-C/SIGTERM resume exactly, and bad settings fail before the work.
Every test builds its own bad input."""

import errno
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import train_lora
from lora_diffusion.training.objective import Objective
from tests.test_train import base_flags, make_dataset, read


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path)


def small_dataset(root: Path) -> Path:
    """2 images, 1 repeat: with batch 2, one step per epoch (epoch tests stay short)."""
    folder = root / "small" / "1_toy"
    folder.mkdir(parents=True)
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (64, 64), color).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"toy {i}")
    return root / "small"


def error_of(argv, capsys) -> str:
    assert train_lora.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.split("\n") if line.startswith("error: ")]  # (after any progress bar)
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """A real state folder after 2 steps of a rank-4 run (copied by each test that changes it)."""
    root = tmp_path_factory.mktemp("state")
    data = make_dataset(root)
    assert train_lora.main(base_flags(root, data, max_train_steps=2, save_every_n_steps=2, save_state=True)) == 0
    return root / "out" / "t-step00000002-state", data


def copy_state(saved_state, tmp_path) -> Path:
    target = tmp_path / "copied-state"
    shutil.copytree(saved_state[0], target)
    return target


# ---------------------------------------------------------------- security: a state folder never runs code


class Malicious:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling creates the marker file


def test_state_files_are_safetensors_and_json_only(saved_state):
    names = sorted(p.name for p in saved_state[0].iterdir())
    assert names == ["network.safetensors", "optimizer.safetensors", "rng-0.safetensors", "train_state.json"]
    json.loads((saved_state[0] / "train_state.json").read_text())  # plain JSON


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_state_folder_with_a_pickle_is_refused_and_never_unpickled(saved_state, tmp_path, capsys, name):
    state = copy_state(saved_state, tmp_path)
    marker = tmp_path / "pwned"
    (state / name).write_bytes(pickle.dumps(Malicious(marker)))
    err = error_of(base_flags(tmp_path, saved_state[1], max_train_steps=3, resume=state), capsys)
    assert str(state) in err and name in err
    assert not marker.exists()


def test_an_accelerate_state_folder_is_refused_without_unpickling(tmp_path, data, capsys):
    state = tmp_path / "old-state"
    state.mkdir()
    marker = tmp_path / "pwned"
    (state / "train_state.json").write_text('{"format": 1, "step": 2, "epoch": 0, "batch_in_epoch": 2}')
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl"):
        (state / name).write_bytes(pickle.dumps(Malicious(marker)))
    err = error_of(base_flags(tmp_path, data, resume=state), capsys)
    assert str(state) in err and "never loaded" in err and not marker.exists()


def test_resume_never_unpickles(saved_state, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a state was unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    state = copy_state(saved_state, tmp_path)
    assert train_lora.main(base_flags(tmp_path, saved_state[1], max_train_steps=3, resume=state)) == 0


@pytest.mark.parametrize("damage,message", [
    (lambda s: (s / "optimizer.safetensors").write_bytes((s / "optimizer.safetensors").read_bytes()[:100]),
     "optimizer.safetensors is unreadable"),
    (lambda s: (s / "rng-0.safetensors").unlink(), "rng-0.safetensors is missing"),
    (lambda s: (s / "train_state.json").write_text("{garbled"), "train_state.json is unreadable"),
    (lambda s: (s / "network.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}"), "network.safetensors"),
])
def test_a_damaged_state_gets_one_line_naming_folder_and_file(saved_state, tmp_path, capsys, damage, message):
    state = copy_state(saved_state, tmp_path)
    damage(state)
    err = error_of(base_flags(tmp_path, saved_state[1], max_train_steps=3, resume=state), capsys)
    assert str(state) in err and message in err


def test_a_state_of_another_network_dim_fails_before_model_loading(saved_state, tmp_path, capsys, monkeypatch):
    import lora_diffusion.models

    monkeypatch.setattr(lora_diffusion.models, "load_models", lambda *a, **k: pytest.fail("loaded the models"))
    state = copy_state(saved_state, tmp_path)
    err = error_of(base_flags(tmp_path, saved_state[1], network_dim=8, resume=state), capsys)
    assert "'network_dim': 4" in err and "'network_dim': 8" in err


# ---------------------------------------------------------------- rotation and other runs' files


def foreign_lora(path: Path, session="12345"):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(2)}, str(path), metadata={"ss_session_id": session})
    return path.read_bytes()


def test_rotation_keeps_another_runs_files_and_its_own_newest(tmp_path, capsys):
    data = small_dataset(tmp_path)
    out = tmp_path / "out"
    # an earlier run's epoch files, with higher numbers than this run will reach, and one this run rewrites
    foreign = {name: foreign_lora(out / name) for name in ("t-000001.safetensors", "t-000007.safetensors",
                                                            "t-000008.safetensors")}
    argv = base_flags(tmp_path, data, max_train_epochs=4, save_every_n_epochs=1, save_last_n_epochs=2,
                      overwrite=True, learning_rate=1e-4)
    assert train_lora.main(argv) == 0
    assert "--overwrite: this run replaces t-000001.safetensors" in capsys.readouterr().out
    names = sorted(p.name for p in out.glob("*.safetensors"))
    # epochs 1-3 get files (4 is the final); this run keeps its last 2 and deletes its own epoch 1 (which had
    # replaced the earlier run's); the earlier run's 7 and 8 stay untouched
    assert names == ["t-000002.safetensors", "t-000003.safetensors", "t-000007.safetensors",
                     "t-000008.safetensors", "t.safetensors"]
    for name in ("t-000007.safetensors", "t-000008.safetensors"):
        assert (out / name).read_bytes() == foreign[name]


def test_rotation_skips_a_file_another_run_wrote_meanwhile(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "out"
    from lora_diffusion.training import loop

    real_rotate = loop.rotate

    def rotate_after_a_foreign_write(written, keep, owned=None):
        if Path(written[0]).name.endswith(".safetensors") and len(written) == 3:
            foreign_lora(Path(written[0]))  # another run replaced this run's epoch-1 file under the same name
        return real_rotate(written, keep, owned=owned)

    monkeypatch.setattr(loop, "rotate", rotate_after_a_foreign_write)
    argv = base_flags(tmp_path, data, max_train_epochs=4, save_every_n_epochs=1, save_last_n_epochs=2)
    assert train_lora.main(argv) == 0
    assert (out / "t-000001.safetensors").is_file()  # not this run's any more: kept
    assert read(out / "t-000001.safetensors")[1]["ss_session_id"] == "12345"


def test_an_output_dir_with_another_runs_final_lora_is_refused_at_start(tmp_path, data, capsys, monkeypatch):
    import lora_diffusion.models

    out = tmp_path / "out"
    earlier = foreign_lora(out / "t.safetensors")
    real_load = lora_diffusion.models.load_models
    monkeypatch.setattr(lora_diffusion.models, "load_models", lambda *a, **k: pytest.fail("loaded the models"))
    err = error_of(base_flags(tmp_path, data, max_train_steps=1), capsys)
    assert "t.safetensors" in err and "--overwrite" in err and str(out) in err
    assert (out / "t.safetensors").read_bytes() == earlier
    monkeypatch.setattr(lora_diffusion.models, "load_models", real_load)
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=1, overwrite=True)) == 0
    assert "--overwrite: this run replaces t.safetensors" in capsys.readouterr().out
    assert read(out / "t.safetensors")[1]["ss_session_id"] != "12345"


# ---------------------------------------------------------------- no NaN or inf on disk


@pytest.mark.parametrize("flag,value", [("unet_lr", "nan"), ("learning_rate", "inf"), ("max_grad_norm", "nan"),
                                        ("network_alpha", "-inf"), ("noise_offset", "nan")])
def test_non_finite_flags_are_refused_at_parse_time(flag, value):
    with pytest.raises(train_lora.TrainingError, match=f"--{flag} {value}: expected a finite number"):
        train_lora.parse_args(["--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir", "x",
                               f"--{flag}={value}"])


def test_non_finite_optimizer_and_network_args_are_refused(tmp_path, data, capsys):
    assert "weight_decay=1e999" in error_of(base_flags(tmp_path, data, optimizer_args=["weight_decay=1e999"]), capsys)
    assert "conv_alpha=nan" in error_of(base_flags(tmp_path, data, network_args=["conv_alpha=nan"]), capsys)


def test_weights_that_overflow_the_save_precision_are_never_written(tmp_path, data, capsys):
    argv = base_flags(tmp_path, data, max_train_steps=3, learning_rate=1e6, save_precision="fp16",
                      save_every_n_steps=1, save_state=True)
    err = error_of(argv, capsys)
    assert "at step 1" in err and "fp16" in err and "No LoRA file was written" in err and "intact" not in err
    for path in (tmp_path / "out").rglob("*.safetensors"):
        tensors, _ = read(path)
        assert all(torch.isfinite(t).all() for t in tensors.values()), path


def test_the_nan_message_names_the_last_finite_file(tmp_path, data, capsys, monkeypatch):
    real_loss, calls = Objective.loss, {"n": 0}

    def nan_from_step_2(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(Objective, "loss", nan_from_step_2)
    err = error_of(base_flags(tmp_path, data, max_train_steps=3, save_every_n_steps=1), capsys)
    assert f"The last file written, {tmp_path / 'out' / 't-step00000001.safetensors'}, holds finite" in err


# ---------------------------------------------------------------- Ctrl-C and SIGTERM resume exactly

SIGNAL_FLAGS = dict(max_train_steps=5, train_batch_size=4, gradient_accumulation_steps=2, network_dropout=0.1,
                    shuffle_caption=True, noise_offset=0.05, lr_scheduler="cosine", lr_warmup_steps=2)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, with a LoRA file after every step (5 batches an epoch; steps of 2+2+1 batches)."""
    root = tmp_path_factory.mktemp("reference")
    data = make_dataset(root)
    assert train_lora.main(base_flags(root, data, save_every_n_steps=1, **SIGNAL_FLAGS)) == 0
    return root / "out", data


def signal_on_call(n, signum):
    calls = {"n": 0}

    def maybe_signal():
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
    return maybe_signal


def hook_forward(monkeypatch, fire):
    real = Objective.noisy_and_target

    def target(self, *args, **kwargs):
        fire()  # inside compute_loss: after the text encoder, before the U-Net
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Objective, "noisy_and_target", target)


def hook_optimizer_step(monkeypatch, fire):
    from lora_diffusion.training import trainer

    real = trainer.create_optimizer

    def create(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda *a: fire())  # the handler runs inside optimizer.step()
        return optimizer
    monkeypatch.setattr(trainer, "create_optimizer", create)


def hook_between_steps(monkeypatch, fire):
    from lora_diffusion.data import dataset

    real = dataset.collate_fn

    def collate(*args, **kwargs):
        fire()  # the loader fetching the next batch, after the previous step's end
        return real(*args, **kwargs)
    monkeypatch.setattr(dataset, "collate_fn", collate)


@pytest.mark.parametrize("where,hook,call,signum,stops_at", [
    ("forward, first micro-batch", hook_forward, 3, signal.SIGINT, 2),
    ("forward, second micro-batch", hook_forward, 2, signal.SIGTERM, 1),
    ("inside optimizer.step", hook_optimizer_step, 2, signal.SIGINT, 2),
    ("between steps, last step of the epoch", hook_between_steps, 5, signal.SIGTERM, 3),
])
def test_a_signal_anywhere_saves_a_whole_step_and_resumes_bit_equal(reference_run, tmp_path, monkeypatch, where,
                                                                   hook, call, signum, stops_at):
    reference, data = reference_run
    with monkeypatch.context() as m:
        hook(m, signal_on_call(call, signum))
        assert train_lora.main(base_flags(tmp_path, data, **SIGNAL_FLAGS)) == 130
    out = tmp_path / "out"
    [state] = list(out.glob("t-step*-state"))
    stem = f"t-step{stops_at:08d}"
    assert state.name == f"{stem}-state"
    saved, _ = read(out / f"{stem}.safetensors")
    expected, _ = read(reference / f"{stem}.safetensors")
    assert saved.keys() == expected.keys()
    for key in expected:  # a whole step: never half-updated by a signal inside optimizer.step()
        assert torch.equal(saved[key], expected[key]), key
    assert train_lora.main(base_flags(tmp_path, data, resume=state, **SIGNAL_FLAGS)) == 0
    continued, meta = read(out / "t.safetensors")
    uninterrupted, _ = read(reference / "t.safetensors")
    assert meta["ss_steps"] == "5" and continued.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(continued[key], uninterrupted[key]), key


def test_a_second_signal_stops_at_once_without_saving(tmp_path, data, monkeypatch):
    def twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    calls = {"n": 0}

    def fire_twice_on_second_call():
        calls["n"] += 1
        if calls["n"] == 2:
            twice()
    hook_forward(monkeypatch, fire_twice_on_second_call)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background (&)
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=4)) == 130
    assert [p.name for p in (tmp_path / "out").glob("t*")] == ["t.progress.jsonl"]  # its end event: stopped
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


# ---------------------------------------------------------------- fail before the work


def test_output_dir_that_is_a_file_or_unwritable(tmp_path, data, capsys, monkeypatch):
    import lora_diffusion.models

    monkeypatch.setattr(lora_diffusion.models, "load_models", lambda *a, **k: pytest.fail("loaded the models"))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in error_of(base_flags(tmp_path, data, output_dir=a_file), capsys)
    assert "file/sub" in error_of(base_flags(tmp_path, data, output_dir=a_file / "sub"), capsys)
    if os.geteuid() == 0:
        unwritable = Path("/proc")  # not even root can create a file there
    else:
        unwritable = tmp_path / "ro"
        unwritable.mkdir(mode=0o500)
    assert "is not writable" in error_of(base_flags(tmp_path, data, output_dir=unwritable), capsys)


def test_too_little_free_space_fails_at_start(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert "MiB free" in error_of(base_flags(tmp_path, data, max_train_steps=2), capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["t.progress.jsonl"]  # its end event: failed


def test_a_write_error_names_the_path_and_keeps_the_last_good_file(tmp_path, data, capsys, monkeypatch):
    real_fsync, calls = os.fsync, {"n": 0}

    def disk_full_on_second_write(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_second_write)
    err = error_of(base_flags(tmp_path, data, max_train_steps=3, save_every_n_steps=1), capsys)
    out = tmp_path / "out"
    assert f"could not write {out / 't-step00000002.safetensors'} at step 2: No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == ["t-step00000001.safetensors", "t.progress.jsonl"]  # no temp file
    tensors, meta = read(out / "t-step00000001.safetensors")
    assert meta["ss_steps"] == "1" and all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("flags,message", [
    (dict(sample_sampler="euler_b"), "--sample_sampler 'euler_b' is not known"),
    (dict(clip_skip=0), "--clip_skip must be >= 1"),
    (dict(output_name=""), "--output_name ''"),
    (dict(output_name="../x"), "--output_name '../x'"),
    (dict(optimizer_args=["betas=abc"]), "betas='abc'"),
])
def test_bad_settings_fail_before_model_loading(tmp_path, data, capsys, monkeypatch, flags, message):
    import lora_diffusion.models

    monkeypatch.setattr(lora_diffusion.models, "load_models", lambda *a, **k: pytest.fail("loaded the models"))
    assert message in error_of(base_flags(tmp_path, data, **flags), capsys)


def test_clip_skip_beyond_the_text_encoder_fails_before_training(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setattr(Objective, "loss", lambda *a, **k: pytest.fail("trained"))
    err = error_of(base_flags(tmp_path, data, clip_skip=99), capsys)
    assert "--clip_skip 99" in err and "layers" in err


# ---------------------------------------------------------------- config files: one error, not a coercion


@pytest.mark.parametrize("line,message", [
    ("learning_rate = true", "learning_rate = True (bool); expected a number"),
    ("max_train_steps = 2.9", "max_train_steps = 2.9 (float); expected a whole number"),
    ("network_args = 5", "network_args = 5 (int); expected a list of strings"),
    ("train_data_dir = 5", "train_data_dir = 5 (int); expected a string"),
    ("cache_latents = \"yes\"", "cache_latents = 'yes' (str); expected true or false"),
    ("learning_rate = nan", "learning_rate = nan (float); expected a finite number"),
])
def test_toml_values_of_the_wrong_type(tmp_path, capsys, line, message):
    config = tmp_path / "c.toml"
    config.write_text(f'pretrained_model_name_or_path = "builtin:tiny"\n{line}\n')
    err = error_of(["--config_file", str(config)], capsys)
    assert str(config) in err and message in err


def test_toml_values_that_convert_exactly_are_kept(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('pretrained_model_name_or_path = "builtin:tiny"\ntrain_data_dir = "d"\nresolution = 512\n'
                      'max_train_steps = 3.0\nlearning_rate = "2e-4"\nnetwork_args = "conv_dim=4 conv_alpha=1"\n')
    args = train_lora.parse_args(["--config_file", str(config)])
    assert (args.resolution, args.max_train_steps, args.learning_rate) == ("512", 3, 2e-4)
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]


@pytest.mark.parametrize("text,message", [
    ('[{"learning_rate": 1}]', "expected a JSON object"),
    ('{"additional_parameters": "--caption_prefix \\"unclosed"}', "additional_parameters"),
    ('{"additional_parameters": "--max_grad_norm=abc"}', "additional_parameters"),
    ('{"lr_warmup": "ten"}', "lr_warmup = 'ten'"),
    ('{"conv_dim": "four"}', "conv_dim = 'four'"),
    ('{"network_dim": true}', "network_dim = True (bool); expected a whole number"),
])
def test_gui_json_of_the_wrong_shape(tmp_path, capsys, text, message):
    config = tmp_path / "gui.json"
    config.write_text(text)
    err = error_of(["--config_file", str(config)], capsys)
    assert str(config) in err and message in err
