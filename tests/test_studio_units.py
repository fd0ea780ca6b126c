"""The studio's pieces without a server: the progress-file reader, the SQLite job queue (states, concurrent
requests, restart recovery), the train form made from the option declarations, the root's path checks."""

import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lora_diffusion.studio import form
from lora_diffusion.studio.jobs import JobError, JobQueue, process_alive, process_start_time
from lora_diffusion.studio.paths import PathRefused, inside_root
from lora_diffusion.studio.progress import ProgressReader, summarize, written_paths

PRESETS = Path(__file__).resolve().parents[2] / "shared" / "kohya_ss_presets"
ROOT = Path(__file__).resolve().parents[1]


# -- the progress file ----------------------------------------------------------------------------------------

def line(**event):
    return (json.dumps({"time": 1.0, **event}) + "\n").encode()


def test_progress_reader_leaves_a_partial_last_line_for_the_next_read(tmp_path):
    path = tmp_path / "run.progress.jsonl"
    reader = ProgressReader(path)
    assert reader.read() == []  # not written yet
    whole = line(event="step", step=2, epoch=0, loss=0.5, loss_average=0.5, lr=[1e-3])
    path.write_bytes(line(event="start", pid=7, max_train_steps=4, epochs=1, step=0) + whole[:17])
    assert [e["event"] for e in reader.read()] == ["start"]
    with open(path, "ab") as f:
        f.write(whole[17:] + b"{not json\n" + line(event="nonsense") + line(event="end", status="finished", step=4,
                                                                              files=["a.safetensors"], error=None))
    events = reader.read()
    assert [e["event"] for e in events] == ["step", "end"]  # the damaged line and the unknown event are skipped
    assert events[0]["loss"] == 0.5 and reader.read() == []
    path.write_bytes(line(event="start", pid=8, step=0))  # a new run replaced the file: read from its start
    assert reader.read()[0]["pid"] == 8


def test_summary_of_a_stopped_and_resumed_run():
    events = [{"event": "start", "pid": 1, "max_train_steps": 6, "epochs": 2, "step": 0},
              *[{"event": "step", "step": s, "epoch": 0, "loss": 1.0 / s, "loss_average": 0.9, "lr": [0.1, 0.2],
                 "steps_per_s": 2.0, "eta_s": 6 - s} for s in (1, 2, 3, 4)],
              {"event": "sample", "step": 2, "epoch": 0, "path": "out/sample/a.png", "prompt": "a star"},
              {"event": "checkpoint", "step": 4, "epoch": 0, "path": "out/x-step00000004.safetensors",
               "state": "out/x-step00000004-state"},
              {"event": "end", "status": "stopped", "step": 4, "files": ["out/x-step00000004.safetensors"]},
              # resumed from the state of step 3 (say): the curves go on from there, the end record is cleared
              {"event": "start", "pid": 2, "max_train_steps": 6, "epochs": 2, "step": 3},
              {"event": "step", "step": 4, "epoch": 1, "loss": 0.3, "lr": [0.05, 0.1]},
              {"event": "validation", "step": 4, "epoch": 1, "metrics": {"judge_star": 0.5}}]
    summary = summarize(events)
    assert [p[0] for p in summary["loss"]] == [1, 2, 3, 4]
    assert summary["loss"][-1] == [4, 0.3, None] and summary["lr"][-1] == [4, 0.05, 0.1]
    assert summary["end"] is None and summary["pid"] == 2 and summary["step"] == 4 and summary["epoch"] == 1
    assert summary["validations"] == [{"step": 4, "epoch": 1, "metrics": {"judge_star": 0.5}}]
    assert summary["samples"][0]["path"] == "out/sample/a.png"
    assert written_paths(events) == ["out/sample/a.png", "out/x-step00000004.safetensors", "out/x-step00000004-state"]


# -- the queue ------------------------------------------------------------------------------------------------

def test_queue_states_and_one_running_job_at_a_time(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    first = queue.add("a", {"network_dim": 4}, "out", "a")
    second = queue.add("b", {}, "out", "b")
    assert [j["state"] for j in queue.all()] == ["queued", "queued"]
    assert queue.claim_next(1)["id"] == first
    assert queue.claim_next(1) is None  # one at a time by default
    assert queue.claim_next(2)["id"] == second  # the setting for more
    queue.set_process(first, 123, "456")
    assert queue.get(first)["pid"] == 123 and queue.get(first)["options"] == {"network_dim": 4}
    assert queue.request_stop(first)["stop_requested"] is True and queue.get(first)["state"] == "running"
    with pytest.raises(JobError, match="stop it first"):
        queue.delete(first)
    queue.end(first, "stopped", 130)
    with pytest.raises(JobError):
        queue.end(second, "running")
    third = queue.add("c", {}, "out", "c")
    assert queue.request_stop(third)["state"] == "stopped"  # a queued job stops without running
    queue.delete(first)
    with pytest.raises(JobError, match="no job"):
        queue.get(first)
    assert JobQueue(tmp_path / "jobs.sqlite").get(second)["state"] == "running"  # it is all in the file


def test_concurrent_requests_never_start_a_job_twice(tmp_path):
    queue = JobQueue(tmp_path / "jobs.sqlite")
    added, claimed, errors = [], [], []

    def add(n):
        try:
            added.extend(queue.add(f"job{n}-{k}", {}, "out", "x") for k in range(5))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(added)) == 40 and len(queue.in_state("queued")) == 40

    def claim():
        claimed.append(JobQueue(tmp_path / "jobs.sqlite").claim_next(3))  # each thread its own "studio"

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [job["id"] for job in claimed if job is not None]
    assert len(started) == 3 and len(set(started)) == 3
    assert sorted(started) == sorted(added)[:3]  # the oldest first
    assert len(queue.in_state("running")) == 3


def test_a_process_is_told_from_a_later_one_with_its_pid(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        started = process_start_time(child.pid)
        assert started is not None and process_alive(child.pid, started)
        assert not process_alive(child.pid, str(int(started) + 1))  # the pid, but another start: not the job's
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, started)
    assert not process_alive(None, None)


# -- the form -------------------------------------------------------------------------------------------------

def test_every_flag_of_the_trainer_is_a_field_with_its_help_default_and_group():
    from lora_diffusion.training.trainer import build_parser

    parser = build_parser()
    flags = {s[2:] for action in parser._actions for s in action.option_strings if s.startswith("--")} - {"help"}
    fields = {f["name"]: f for f in form.option_fields()}
    assert flags - set(form.NOT_IN_FORM) == set(fields)
    for action in parser._actions:
        name = action.option_strings[0][2:] if action.option_strings else None
        if name in fields and action.default is not argparse_suppress():
            assert fields[name]["help"] == action.help
            assert fields[name]["default"] == (list(action.default) if isinstance(action.default, tuple)
                                               else action.default)
    titles = {g.title: {a.option_strings[0][2:] for a in g._group_actions} for g in parser._action_groups}
    assert all(f["name"] in titles[f["group"]] for f in fields.values())
    assert fields["network_dim"]["kind"] == "int" and fields["cache_latents"]["kind"] == "switch"
    assert fields["lr_scheduler"]["kind"] in ("choice", "text") and fields["network_args"]["kind"] == "list"
    assert fields["huggingface_repo_id"]["refused"]


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def test_invalid_values_are_refused_by_the_trainers_own_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = {"pretrained_model_name_or_path": "builtin:mini", "train_data_dir": "examples/quickstart/data"}
    with pytest.raises(form.FormError, match=r"argument --network_dim: invalid int value: 'abc'"):
        form.check({**base, "network_dim": "abc"}, ROOT)
    with pytest.raises(form.FormError, match=r"--huggingface_repo_id: .*offline"):
        form.check({**base, "huggingface_repo_id": "me/x"}, ROOT)
    with pytest.raises(form.FormError, match="no such option"):
        form.check({**base, "network_dimm": 4}, ROOT)
    with pytest.raises(form.FormError, match="--config_file: not set in the form"):
        form.values_to_argv({"config_file": "x.toml"})
    with pytest.raises(form.FormError, match="would be read as a flag"):
        form.values_to_argv({"network_args": ["--overwrite"]})
    with pytest.raises(PathRefused, match="--output_dir"):
        form.check({**base, "output_dir": "/etc"}, ROOT)


def test_shell_metacharacters_are_values_never_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nasty = "x; touch PWNED $(touch PWNED2) `touch PWNED3` | cat"
    values = {"pretrained_model_name_or_path": "builtin:mini", "output_name": nasty, "training_comment": "--overwrite"}
    argv = form.values_to_argv(values)
    assert f"--output_name={nasty}" in argv and "--training_comment=--overwrite" in argv
    args, _ = form.parse(values)
    assert args.output_name == nasty and args.training_comment == "--overwrite" and args.overwrite is False
    command = form.command_line(values)
    assert shlex.split(command)[2:] == argv  # the shown line quotes them: pasted into a shell, still values
    assert not any(Path(tmp_path, n).exists() for n in ("PWNED", "PWNED2", "PWNED3"))


def test_the_exported_toml_and_command_line_are_the_same_run(tmp_path, monkeypatch):
    from lora_diffusion.options.flag_file import read_config_file
    from lora_diffusion.training.trainer import build_parser

    monkeypatch.chdir(ROOT)
    imported = form.import_config((ROOT / "examples/quickstart/config.toml").read_text(), "config.toml")
    assert imported["values"]["network_args"] == ["conv_dim=16", "conv_alpha=8"]
    checked = form.check({**imported["values"], "max_train_epochs": 2}, ROOT)
    toml = tmp_path / "run.toml"
    toml.write_text(checked["toml"])
    parser = build_parser()
    parser.set_defaults(**read_config_file(str(toml), parser))
    from_toml = parser.parse_args([])
    from_command = build_parser().parse_args(shlex.split(checked["command"])[2:])
    assert vars(from_toml) == vars(from_command)
    assert from_command.max_train_epochs == 2 and from_command.network_dim == 16
    assert checked["output_dir"] == "output/quickstart" and checked["output_name"] == "quickstart"


@pytest.mark.skipif(not PRESETS.is_dir(), reason=f"no kohya_ss GUI presets at {PRESETS}")
def test_a_kohya_ss_gui_json_round_trip(tmp_path):
    """A GUI preset read by the trainer's reader, exported as TOML, read back: the same flags (and the same as
    the trainer reading the JSON itself)."""
    from lora_diffusion.options.flag_file import read_config_file
    from lora_diffusion.training.trainer import build_parser

    preset = PRESETS / "SDXL - LoRA AI_characters standard v1.1.json"
    imported = form.import_config(preset.read_text(encoding="utf-8"), preset.name)
    assert imported["values"]["network_dim"] > 0 and preset.name in " ".join(imported["warnings"]) or \
        not imported["warnings"]
    direct = read_config_file(str(preset), build_parser())
    assert imported["values"] == {k: v for k, v in direct.items() if k not in form.NOT_IN_FORM}
    args, parser = form.parse(imported["values"])
    toml = tmp_path / "back.toml"
    toml.write_text(form.toml_text(args, parser))
    again = read_config_file(str(toml), build_parser())
    defaults = vars(build_parser().parse_args([]))
    assert again == {k: v for k, v in imported["values"].items() if defaults.get(k) != v}


# -- the root -------------------------------------------------------------------------------------------------

def test_paths_only_under_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("no")
    os.symlink(tmp_path, root / "out_link")
    os.symlink(root / "data", root / "in_link")
    assert inside_root(root, "data") == (root / "data").resolve()
    assert inside_root(root, str(root / "data" / "new.txt")) == (root / "data" / "new.txt").resolve()
    assert inside_root(root, "in_link") == (root / "data").resolve()
    for bad in ("../secret.txt", "data/../../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd",
                "out_link/secret.txt", "", "data/\x00x"):
        with pytest.raises(PathRefused):
            inside_root(root, bad)
