"""Several processes (2 gloo CPU processes through `accelerate launch --multi_gpu`): the network is prepared by
accelerate (DDP all-reduces the LoRA's gradients during the backward), so 2 processes x batch 1 x 2 accumulated
micro-batches train the weights 1 process trains at batch 4 with the same noise; a resumed 2-process run ends
bit-equal to the uninterrupted one; each process encodes its share of the latents; a SIGTERM to one rank saves
once on every rank and exits 0."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from child_process import end_tree
from test_train import base_flags, read

ROOT = Path(__file__).resolve().parents[1]
# plain SGD: the update is the averaged gradient itself (Adam's would hide a sum in place of a mean)
SGD = dict(optimizer_type="torch.optim.SGD", learning_rate=1.0, max_grad_norm=0)

# The trainer with noise and timesteps that depend only on the image (its cached latents), not on the process or
# the step: then any split of the same images over processes and micro-batches trains the same weights. It also
# counts the images each process encodes with the VAE.
LAUNCHED = '''
import json, os, sys
import torch
from lora_diffusion.data import dataset
from lora_diffusion.training.objective import Objective

def noise(self, latents):
    seeds = [int(latent.double().abs().sum().item() * 1000) % 2**31 for latent in latents]
    return torch.stack([torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
                        for latent, seed in zip(latents, seeds)]).to(latents.device, latents.dtype)

def timesteps(self, batch_size, device=None):
    return torch.full((batch_size,), 500, dtype=torch.long, device=device)

encoded, timeouts, real_encode = [], [], dataset.encode_latents
def counting_encode(vae, images, **options):
    encoded.append(images.shape[0])
    if torch.distributed.is_initialized():  # the process group's timeout, which the cache's barriers obey
        backend = torch.distributed.group.WORLD._get_backend(torch.device("cpu"))
        timeouts.append(backend.options._timeout.total_seconds())
    return real_encode(vae, images, **options)

Objective.noise, Objective.timesteps, dataset.encode_latents = noise, timesteps, counting_encode
import train_lora
code = train_lora.command(sys.argv[1:])
with open(os.environ["COUNTS"] + os.environ.get("RANK", "0"), "w") as f:
    json.dump({"encoded": sum(encoded), "timeouts": sorted(set(timeouts)), "code": code}, f)
sys.exit(code)
'''


def images(root: Path, n: int) -> Path:
    folder = root / "data" / "1_toy"  # one repeat: each epoch is these n images, whatever the split
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (40 + 50 * i, 200 - 40 * i, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"toy, number {i}")
    return root / "data"


def launch(tmp_path, flags, processes, *, wait=True):
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", COUNTS=str(tmp_path / "counts-"))
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if processes > 1 else []
    import subprocess

    process = subprocess.Popen([sys.executable, *launcher, str(script), *flags], cwd=tmp_path, env=env,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    try:
        output, _ = process.communicate(timeout=1800)  # a safety net for a hung run, not a measure
    finally:
        end_tree(process)
    return process.returncode, output


def counts(tmp_path, processes):
    return [json.loads((tmp_path / f"counts-{rank}").read_text()) for rank in range(processes)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """1 process at batch 4, and 2 processes x batch 1 x 2 accumulated micro-batches (the same 4 images a step;
    --ddp_timeout 7), 4 steps, the state saved at step 2; the text encoder's LoRA trains with --clip_skip 2, so
    its last layer's LoRA gets no gradient (DDP must find it unused)."""
    root = tmp_path_factory.mktemp("ddp")
    data = images(root, 4)
    common = dict(max_train_steps=4, clip_skip=2, save_every_n_steps=2, save_state=True, **SGD)
    one, two = root / "one", root / "two"
    one.mkdir(), two.mkdir()
    code, output = launch(one, base_flags(one, data, train_batch_size=4, **common), 1)
    assert code == 0, output[-3000:]
    code, output = launch(two, base_flags(two, data, train_batch_size=1, gradient_accumulation_steps=2, ddp_timeout=7,
                                          **common), 2)
    assert code == 0, output[-3000:]
    return root, data, one, two, output


def test_two_processes_train_the_weights_of_one_at_the_same_global_batch(two_process_run):
    root, data, one, two, output = two_process_run
    assert "LoRA weights identical on 2 processes" in output
    single, _ = read(one / "out" / "t.safetensors")
    double, meta = read(two / "out" / "t.safetensors")
    assert single.keys() == double.keys()
    moved = [k for k in single if "lora_up" in k and single[k].abs().max() > 0]
    assert moved and any(k.startswith("lora_te") for k in moved)  # both models trained
    for key in single:  # (the mid block's self-attention over its one token has q/k gradients of 0 +- 1e-10)
        torch.testing.assert_close(double[key], single[key], rtol=1e-4,
                                   atol=1e-4 * float(single[key].abs().max()) + 1e-9)
    assert meta["ss_total_batch_size"] == "4" and meta["ss_batch_size_per_device"] == "1"  # 1 x 2 processes x 2


def test_each_process_encodes_its_share_of_the_latents(two_process_run):
    root, data, one, two, output = two_process_run
    assert [c["encoded"] for c in counts(one, 1)] == [4]
    assert [c["encoded"] for c in counts(two, 2)] == [2, 2]  # not 4 + 4
    assert [c["timeouts"] for c in counts(two, 2)] == [[7 * 60.0]] * 2  # --ddp_timeout 7 (minutes)
    assert not list((two / "out").glob(".*latents*"))  # the scratch cache is gone
    assert not list(data.rglob("*.safetensors"))  # no --cache_latents_to_disk: nothing next to the images


def test_a_resumed_two_process_run_ends_bit_equal(two_process_run, tmp_path):
    root, data, one, two, _ = two_process_run
    state = two / "out" / "t-step00000002-state"
    assert sorted(p.name for p in state.iterdir()) == ["network.safetensors", "optimizer.safetensors",
                                                         "rng-0.safetensors", "rng-1.safetensors", "train_state.json"]
    flags = base_flags(tmp_path, data, train_batch_size=1, gradient_accumulation_steps=2, max_train_steps=4,
                       clip_skip=2, resume=state, **SGD)
    code, output = launch(tmp_path, flags, 2)
    assert code == 0, output[-3000:]
    expected, _ = read(two / "out" / "t.safetensors")
    resumed, _ = read(tmp_path / "out" / "t.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_a_sigterm_to_one_rank_saves_once_on_every_rank_and_exits_0(tmp_path):
    data = images(tmp_path, 4)
    flags = base_flags(tmp_path, data, train_batch_size=1, max_train_steps=100000, progress_file=tmp_path / "p")
    process = launch(tmp_path, flags, 2, wait=False)
    try:
        rank_one = None
        while rank_one is None and process.poll() is None:  # the rank-1 worker's pid, once it trains
            steps = [json.loads(line) for line in (tmp_path / "p").read_text().splitlines()] \
                if (tmp_path / "p").exists() else []
            if any(e["event"] == "step" for e in steps):
                rank_one = next(pid for pid in worker_pids(process.pid) if environ_of(pid).get("RANK") == "1")
            time.sleep(0.5)
        assert rank_one is not None, f"the run ended before its first step: {process.communicate()[0][-3000:]}"
        os.kill(rank_one, signal.SIGTERM)
        output, _ = process.communicate(timeout=1800)  # a safety net, not a measure
    finally:
        end_tree(process)
    assert process.returncode == 0, output[-3000:]
    assert [c["code"] for c in counts(tmp_path, 2)] == [0, 0]
    assert "ChildFailedError" not in output and "Traceback" not in output
    assert output.count("SIGTERM: finishing this step") == 1  # rank 1's
    assert output.count("a signal to another process at step") == 1  # rank 0 (the one that prints) saw it too
    states, files = sorted((tmp_path / "out").glob("t-step*-state")), sorted((tmp_path / "out").glob("t*.safetensors"))
    assert len(states) == 1 and [f.name for f in files] == [states[0].name.replace("-state", ".safetensors")]
    assert {p.name for p in states[0].iterdir()} >= {"rng-0.safetensors", "rng-1.safetensors"}
    end = json.loads((tmp_path / "p").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["status"] == "stopped"


def worker_pids(pid):
    from child_process import descendants

    return [p for p in descendants(pid) if "launched.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(
        errors="replace") and "accelerate" not in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]


def environ_of(pid):
    try:
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


class Rank:
    """What save_state/load_state ask of an accelerator, for process `index` of 2 (no process group)."""

    num_processes, scaler = 2, None

    def __init__(self, index):
        self.process_index, self.is_main_process = index, index == 0

    def wait_for_everyone(self):
        pass


def test_the_main_process_writes_every_ranks_random_state_into_the_folder_it_renames(tmp_path, monkeypatch):
    """On several nodes the other ranks' disks may not be the main process's: their random states are gathered to
    it and it writes them all (before, each rank wrote rng-<rank> into a folder that only the main one renamed)."""
    from lora_diffusion.training import state as state_module
    from test_training_pieces import trained_pieces

    pieces = trained_pieces()
    torch.manual_seed(1)
    rank_one = state_module._rng_state()  # what rank 1 holds (another seed than rank 0's)
    torch.manual_seed(0)
    rank_zero = state_module._rng_state()
    monkeypatch.setattr(state_module, "_gather", lambda accelerator, value: [value, rank_one])
    state_dir = tmp_path / "t-step00000003-state"
    state_module.save_state(state_dir, step=3, epoch=0, batch_in_epoch=3, accelerator=Rank(0), **pieces)
    assert sorted(p.name for p in state_dir.iterdir()) == ["network.safetensors", "optimizer.safetensors",
                                                           "rng-0.safetensors", "rng-1.safetensors",
                                                           "train_state.json"]
    for index, expected in ((0, rank_zero), (1, rank_one)):
        torch.manual_seed(123)
        state_module.load_state(state_dir, accelerator=Rank(index), **pieces)
        assert torch.equal(torch.get_rng_state(), expected[0]["torch_cpu"])


@pytest.mark.parametrize("kind, message", [
    ("FSDP", "accelerate's FSDP config: not supported by this trainer"),
    ("DEEPSPEED", "accelerate's DeepSpeed config: not supported by this trainer yet"),
    ("XLA", "accelerate's XLA launch: not supported by this trainer"),
])
def test_launch_kinds_other_than_ddp_are_refused_in_one_line(kind, message):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lora_diffusion.training.errors import TrainingError
    from lora_diffusion.training.trainer import check_distribution

    for ddp in ("NO", "MULTI_GPU", "MULTI_CPU"):
        check_distribution(SimpleNamespace(distributed_type=DistributedType[ddp]))
    with pytest.raises(TrainingError, match=message) as refused:
        check_distribution(SimpleNamespace(distributed_type=DistributedType[kind]))
    assert "\n" not in str(refused.value)


def test_the_ddp_flags_reach_ddp():
    import argparse

    from lora_diffusion.training.trainer import ddp_settings

    def settings(**flags):
        args = argparse.Namespace(**{"ddp_static_graph": False, "ddp_gradient_as_bucket_view": False, **flags})
        return ddp_settings(args).to_kwargs()  # only what differs from DDP's defaults

    assert settings() == {"find_unused_parameters": True}
    assert settings(ddp_gradient_as_bucket_view=True) == {"find_unused_parameters": True,
                                                          "gradient_as_bucket_view": True}
    assert settings(ddp_static_graph=True) == {"static_graph": True}


def test_deepspeed_flags_stop_before_any_work(tmp_path, capsys):
    import train_lora

    assert train_lora.main(["--deepspeed", "--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir",
                            str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --deepspeed: DeepSpeed is not wired into this trainer yet") and "\n" not in err
