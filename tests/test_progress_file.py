"""The run's progress file (<output_dir>/<output_name>.progress.jsonl, or --progress_file): one JSON object a line,
checked here against what the run did and wrote."""

import json
import math
import os
import signal

import pytest
import torch

import train_lora
from lora_diffusion.training import loop
from test_train import base_flags, make_dataset


def events(path):
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    times = [e["time"] for e in lines]
    assert all(isinstance(e["event"], str) and isinstance(e["time"], float) for e in lines)
    assert times == sorted(times)
    return lines


def of(lines, kind):
    return [e for e in lines if e["event"] == kind]


def test_a_run_writes_each_event_of_what_it_did(tmp_path, capsys):
    data = make_dataset(tmp_path, n=8)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star --w 64 --h 64 --s 2\nblue toy --w 64 --h 64 --s 2 --d 3\n")
    argv = base_flags(tmp_path, data, max_train_steps=4, save_every_n_steps=2, save_state=True,
                      sample_prompts=prompts, sample_every_n_steps=2, validation_split=0.25,
                      validate_every_n_steps=2, lr_scheduler="linear")
    assert train_lora.main(argv) == 0
    out = tmp_path / "out"
    lines = events(out / "t.progress.jsonl")
    assert [e["event"] for e in lines][0] == "start" and lines[-1]["event"] == "end"
    start = lines[0]
    assert start["pid"] == os.getpid() and start["max_train_steps"] == 4 and start["step"] == 0
    assert start["output_dir"] == str(out) and start["output_name"] == "t" and start["epochs"] == 1

    steps = of(lines, "step")
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and {e["epoch"] for e in steps} == {1}
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["loss_average"]) for e in steps)
    assert steps[0]["loss_average"] == steps[0]["loss"]
    assert steps[1]["loss_average"] == pytest.approx((steps[0]["loss"] + steps[1]["loss"]) / 2)
    assert [e["lr"] for e in steps] == [pytest.approx([1e-3 * (1 - n / 4)] * 2) for n in (1, 2, 3, 4)]  # U-Net, TE
    assert all(e["steps_per_s"] > 0 for e in steps) and steps[-1]["eta_s"] == 0
    assert steps[0]["eta_s"] == pytest.approx(3 / steps[0]["steps_per_s"])

    checkpoints = of(lines, "checkpoint")
    assert [(e["step"], os.path.basename(e["path"])) for e in checkpoints] == [
        (2, "t-step00000002.safetensors"), (4, "t-step00000004.safetensors"), (4, "t.safetensors")]
    assert all(os.path.isfile(e["path"]) and os.path.isdir(e["state"]) for e in checkpoints)

    samples = of(lines, "sample")
    assert [(e["step"], e["prompt"]) for e in samples] == [(2, "a red star"), (2, "blue toy"), (4, "a red star"),
                                                           (4, "blue toy")]
    assert all(os.path.isfile(e["path"]) and e["path"].endswith(".png") for e in samples)
    assert sorted(os.path.basename(e["path"]) for e in samples) == sorted(p.name for p in (out / "sample").glob(
        "t_0*.png"))

    validations = of(lines, "validation")
    printed = [float(line.split("validation_loss ")[1].split(",")[0]) for line in capsys.readouterr().out.splitlines()
               if "validation_loss " in line]
    assert [e["step"] for e in validations] == [2, 4]
    assert [e["metrics"]["validation_loss"] for e in validations] == pytest.approx(printed, rel=1e-3)

    end = lines[-1]
    assert end["status"] == "finished" and end["step"] == 4 and end["error"] is None
    written = {e["path"] for e in checkpoints + samples} | {e["state"] for e in checkpoints}
    assert set(end["files"]) == written


def test_a_resumed_run_appends_and_a_stopped_and_a_failed_run_say_so(tmp_path, monkeypatch):
    data = make_dataset(tmp_path)
    progress = tmp_path / "elsewhere" / "run.jsonl"
    real_step, real_loss = loop.optimizer_step, loop.compute_loss

    def optimizer_step(run, state, params):
        real_step(run, state, params)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the loop stops after this step, saving the LoRA and the state

    monkeypatch.setattr(loop, "optimizer_step", optimizer_step)
    flags = dict(max_train_steps=4, progress_file=progress)
    assert train_lora.main(base_flags(tmp_path, data, **flags)) == 130
    first = events(progress)
    assert [e["event"] for e in first][-2:] == ["checkpoint", "end"]
    assert first[-1]["status"] == "stopped" and first[-1]["step"] == 2
    assert first[-1]["files"] == sorted([first[-2]["path"], first[-2]["state"]])

    monkeypatch.setattr(loop, "optimizer_step", real_step)
    resume = tmp_path / "out" / "t-step00000002-state"

    def compute_loss(run, batch):
        loss = real_loss(run, batch)
        return loss * float("nan") if loop_calls.append(1) or len(loop_calls) == 2 else loss

    loop_calls = []
    monkeypatch.setattr(loop, "compute_loss", compute_loss)
    assert train_lora.main(base_flags(tmp_path, data, resume=resume, **flags)) == 2
    second = events(progress)[len(first):]
    assert second[0]["event"] == "start" and second[0]["step"] == 2
    assert [e["step"] for e in of(second, "step")] == [3]
    end = second[-1]
    assert end["event"] == "end" and end["status"] == "failed" and end["step"] == 3
    assert "the loss became nan at step 4" in end["error"] and end["files"] == []
    assert not (tmp_path / "out" / "t.progress.jsonl").exists()  # --progress_file chose the path
    assert torch.isfinite(torch.tensor([e["loss"] for e in of(first + second, "step")])).all()
