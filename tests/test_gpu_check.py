"""benchmarks/gpu_check.sh's plumbing, on the CPU: its dry mode runs every stage of the GPU check with tiny sizes
(each stage in its own process, under its own limit), and the summary's figures are checked here against the stage
files they come from and against counts made in the test. No figure of speed or memory is asserted (a dry run
measures nothing); the safety net of child_process.run is an hour, never a measure."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from child_process import run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "step_ours", "step_peft", "sdxl", "sdxl_offload", "quickstart", "fp16", "bf16", "resume",
          "resume_compare", "step_compile"]


def gpu_check(out: Path, *args, **env):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", GPU_CHECK_DRY="1", **env)
    return run(["bash", str(SCRIPT), "--out", str(out), *args], cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = gpu_check(out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return out, result.stdout


def stage_file(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_every_stage_runs_once_and_succeeds(dry_run):
    out, _ = dry_run
    stages = [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["name"] for s in stages] == STAGES
    assert all(s["rc"] == 0 and s["seconds"] <= s["limit"] for s in stages), stages
    assert json.loads((out / "summary.json").read_text())["not_ok"] == []


def kohya_unet_lora_params(unet, rank: int) -> int:
    """rank * (in + out) for every Linear and 1x1 conv of the transformer blocks (proj_in/out, attention, ff):
    kohya's default U-Net targets, counted here from the module tree."""
    total = 0
    for name, module in unet.named_modules():
        if ".attentions." not in f".{name}":
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1):
            total += rank * (module.in_channels + module.out_channels)
    return total


def test_the_step_figures_follow_from_the_stage_files(dry_run):
    out, stdout = dry_run
    ours, peft, compiled = (stage_file(out, n) for n in ("step_ours", "step_peft", "step_compile"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["time_vs_peft"] == pytest.approx(ours["pace_s"] / peft["pace_s"])
    assert ours["mfu"] == pytest.approx(ours["step_flops"] / ours["pace_s"] / ours["matmul_flops_per_s"])
    # the backward computes no frozen-weight gradients: the step is between 1x and 3x the forward
    assert ours["forward_flops"] < ours["step_flops"] < 3 * ours["forward_flops"]
    assert ours["batch"] == peft["batch"] == 1 and ours["resolution"] == 64
    assert compiled["dynamo_disabled"] is True and compiled["options"]["compile"] is True
    # both sides train the same modules: kohya's targets counted here on the tiny U-Net's module tree
    from diffusers import UNet2DConditionModel

    config = json.loads((ROOT / "lora_diffusion/assets/tiny-sd/unet/config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert ours["lora_params"] == peft["lora_params"] == kohya_unet_lora_params(unet, rank=16)
    assert f"{ours['pace_s'] / peft['pace_s']:.3f}x" in stdout
    for target in (">= 40 %", "<= 0.85x", "<= 8 GiB", "rel <= 0.001"):
        assert target in stdout


def test_the_resumed_run_is_the_uninterrupted_one(dry_run):
    out, _ = dry_run
    uninterrupted = load_file(out / "bf16" / "quickstart.safetensors")
    resumed = load_file(out / "resume" / "quickstart.safetensors")
    equal = sum(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    compare = stage_file(out, "resume_compare")
    assert resumed.keys() == uninterrupted.keys()
    assert compare["tensors"] == len(uninterrupted) and compare["bit_equal"] == equal == len(uninterrupted)
    assert "resumed from" in (out / "resume.log").read_text()


def test_the_training_runs_are_read_from_their_logs(dry_run):
    out, _ = dry_run
    runs = json.loads((out / "summary.json").read_text())["train_runs"]
    for name in ("quickstart", "fp16", "bf16", "resume"):
        log = (out / f"{name}.log").read_text().replace("\r", "\n")
        steps = int(re.search(r"done: (\d+) steps", log).group(1))
        assert runs[name]["steps"] == steps == 2  # the dry data: 4 images, batch 4, 2 epochs
    assert "on cpu, fp16" in (out / "fp16.log").read_text()
    assert runs["fp16"]["validation"].startswith("judge_shape")


def test_a_spent_budget_skips_the_stages_and_says_so(tmp_path):
    result = gpu_check(tmp_path, GPU_CHECK_BUDGET_S="5")
    assert result.returncode == 1
    stages = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [s["name"] for s in stages] == [n for n in STAGES if n not in ("resume", "resume_compare")]
    assert all("skipped" in s for s in stages)
    assert "skipped (" in result.stdout and "not run to the end: bf16, env, fp16" in result.stdout


def test_an_unknown_argument_is_one_line(tmp_path):
    result = gpu_check(tmp_path, "--bogus")
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu_check.sh: unknown argument --bogus (expected --dry, --out DIR or " \
                                    "--fetch-wheels)"
