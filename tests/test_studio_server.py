"""The studio's HTTP API (Starlette's test client, no socket): the security cases (path traversal, a symlink out
of the root, the token on a non-local bind, forged cross-site requests, DNS rebinding), the caption edit, and the
job queue driven through the API with a stand-in trainer (a script speaking the trainer's progress-file protocol
and its SIGTERM stop), including a studio restarted while a job runs."""

import json
import os
import signal
import stat
import sys
import time

import pytest

pytest.importorskip("starlette", reason="the studio's extra is not installed: pip install -e '.[studio]'")
pytest.importorskip("httpx", reason="Starlette's test client needs httpx")

from starlette.testclient import TestClient  # noqa: E402

from lora_diffusion import cli  # noqa: E402
from lora_diffusion.studio.security import load_or_create_token  # noqa: E402
from lora_diffusion.studio.server import create_app  # noqa: E402
from lora_diffusion.studio.tools import tool_argv  # noqa: E402

POST = {"X-Studio-Request": "1"}
HANG_GUARD_S = 120  # only against a hang: a slow machine never gets near it

FAKE_TRAINER = """\
import json, os, signal, sys, time, tomllib
from pathlib import Path

flags = tomllib.loads(Path(sys.argv[sys.argv.index("--config_file") + 1]).read_text())
out, name = Path(flags.get("output_dir", ".")), flags.get("output_name", "last")
out.mkdir(parents=True, exist_ok=True)
progress = Path(flags.get("progress_file") or out / f"{name}.progress.jsonl")
steps, pause = flags.get("max_train_steps", 1600), float(os.environ.get("FAKE_STEP_S", "0.02"))
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

def emit(**event):
    with open(progress, "a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\\n")

first = json.loads((Path(flags["resume"]) / "step.json").read_text())["step"] if flags.get("resume") else 0
emit(event="start", pid=os.getpid(), max_train_steps=steps, epochs=1, output_dir=str(out), output_name=name,
     step=first)
print("fake trainer", json.dumps(sys.argv[1:]), flush=True)
for step in range(first + 1, steps + 1):
    time.sleep(pause)
    emit(event="step", step=step, epoch=0, loss=1 / step, loss_average=1 / step, lr=[1e-3], steps_per_s=1 / pause,
         eta_s=(steps - step) * pause)
    if stop:
        lora, state = out / f"{name}-step{step:08d}.safetensors", out / f"{name}-step{step:08d}-state"
        lora.write_bytes(b"lora")
        state.mkdir()
        (state / "step.json").write_text(json.dumps({"step": step}))
        emit(event="checkpoint", step=step, epoch=0, path=str(lora), state=str(state))
        emit(event="end", status="stopped", step=step, files=[str(lora)], error=None)
        print(f"SIGTERM at step {step}: saving the LoRA and the training state", flush=True)
        sys.exit(130)
final = out / f"{name}.safetensors"
final.write_bytes(b"lora")
emit(event="end", status="finished", step=steps, files=[str(final)], error=None)
"""


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    concept = root / "data" / "10_star"
    concept.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(concept / "a.png")
    (concept / "a.txt").write_text("a red star\n")
    (tmp_path / "secret.txt").write_text("not yours")
    monkeypatch.chdir(root)  # the studio works in its root (command.run does the same)
    return root


@pytest.fixture
def fake_python(tmp_path):
    """A 'python' for the runner: `python -m lora_diffusion.cli train --config_file X` runs the stand-in."""
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    launcher = tmp_path / "python"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    launcher.chmod(0o755)
    return str(launcher)


@pytest.fixture
def studios():
    """Studios made by a test; every job process they started is ended afterwards."""
    made = []
    yield made
    for client in made:
        for job in client.app.app.state.studio.queue.in_state("running"):
            if job["pid"]:
                try:
                    os.killpg(job["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def studio_client(root, data_dir, studios, fake_python=None, host="127.0.0.1", token=None):
    app = create_app(root, data_dir, host=host, port=7860, token=token, run_jobs=False)
    if fake_python:
        app.app.state.studio.runner.python = fake_python
    client = TestClient(app, base_url="http://127.0.0.1:7860")
    studios.append(client)
    return client


def wait_for(client, job_id, condition, what):
    studio = client.app.app.state.studio
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        studio.tick()
        job = client.get(f"/api/jobs/{job_id}").json()
        if condition(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} hung: never {what} within {HANG_GUARD_S} s; last seen {job}")


# -- security -------------------------------------------------------------------------------------------------

def test_no_file_outside_the_root_is_read_or_written(root, tmp_path, studios):
    client = studio_client(root, tmp_path / "data", studios)
    os.symlink(tmp_path, root / "link_out")
    os.symlink(tmp_path / "secret.txt", root / "data" / "10_star" / "b.png")  # an "image" that leads out
    for path in ("../../etc/passwd", "../secret.txt", "/etc/passwd", str(tmp_path / "secret.txt"),
                 "link_out/secret.txt", "data/10_star/b.png"):
        for route in ("/api/image", "/api/thumbnail", "/api/results"):
            response = client.get(route, params={"path": path})
            assert response.status_code == 403 and "root" in response.json()["error"], (route, path)
    for body in ({"image": "../secret.png", "caption": "x"}, {"image": "link_out/x.png", "caption": "x"},
                 {"image": "data/10_star/b.png", "caption": "x"}):
        assert client.post("/api/caption", json=body, headers=POST).status_code == 403
    assert client.post("/api/dataset", json={"train_data_dir": "../"}, headers=POST).status_code == 403
    assert client.get("/api/folders", params={"under": "link_out"}).status_code == 403
    assert "link_out" not in client.get("/api/folders").json()["folders"]
    assert client.post("/api/options/import", json={"path": "link_out/secret.txt"}, headers=POST).status_code == 403
    assert (tmp_path / "secret.txt").read_text() == "not yours"


def test_a_non_local_bind_needs_the_token(root, tmp_path, studios):
    token, created = load_or_create_token(tmp_path / "data")
    assert created and load_or_create_token(tmp_path / "data") == (token, False)  # made once, then read
    assert stat.S_IMODE((tmp_path / "data" / "token").stat().st_mode) == 0o600
    client = studio_client(root, tmp_path / "data", studios, host="0.0.0.0", token=token)
    assert client.get("/api/jobs").status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {token[:-1]}"}).status_code == 401
    assert client.get("/?token=wrong", follow_redirects=False).status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # the printed address: ?token= once, then an HttpOnly cookie
    response = client.get(f"/?token={token}", follow_redirects=False)
    assert response.status_code == 303 and "HttpOnly" in response.headers["set-cookie"]
    assert client.get("/api/jobs").status_code == 200  # the client keeps the cookie
    client.cookies.clear()
    client.cookies.set("studio_token", "wrong")
    assert client.get("/api/jobs").status_code == 401


def test_forged_cross_site_requests_change_nothing(root, tmp_path, studios):
    client = studio_client(root, tmp_path / "data", studios)
    caption = root / "data" / "10_star" / "a.txt"
    body = {"image": "data/10_star/a.png", "caption": "forged"}
    forged = [
        {},  # a plain cross-site form or fetch cannot add the header
        {**POST, "Origin": "http://evil.example"},
        {**POST, "Sec-Fetch-Site": "cross-site"},
        {**POST, "Origin": "null"},
    ]
    for headers in forged:
        assert client.post("/api/caption", json=body, headers=headers).status_code == 403, headers
    form_post = client.post("/api/caption", content="image=data/10_star/a.png&caption=forged",
                            headers={**POST, "Content-Type": "application/x-www-form-urlencoded"})
    assert form_post.status_code == 403
    assert client.post("/api/jobs", json={"values": {}}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert caption.read_text() == "a red star\n" and client.get("/api/jobs").json()["jobs"] == []
    # DNS rebinding: a page of another name that resolves to 127.0.0.1 is refused on every request
    assert client.get("/api/jobs", headers={"Host": "evil.example:7860"}).status_code == 403
    same_origin = client.post("/api/caption", json=body, headers={**POST, "Origin": "http://127.0.0.1:7860"})
    assert same_origin.status_code == 200 and caption.read_text() == "forged\n"


def test_a_caption_edit_is_written_whole(root, tmp_path, studios):
    client = studio_client(root, tmp_path / "data", studios)
    seen = client.post("/api/dataset", json={"train_data_dir": "data", "resolution": "64"}, headers=POST).json()
    assert seen["concepts"][0]["repeats"] == 10 and seen["concepts"][0]["class_tokens"] == "star"
    assert seen["images"][0]["caption"] == "a red star" and seen["images"][0]["size"] == [64, 48]
    response = client.post("/api/caption", json={"image": "data/10_star/a.png", "caption": " a red star, big \n"},
                           headers=POST)
    assert response.json() == {"saved": "data/10_star/a.txt"}
    caption = root / "data" / "10_star" / "a.txt"
    assert caption.read_text() == "a red star, big\n" and stat.S_IMODE(caption.stat().st_mode) == 0o644
    assert sorted(p.name for p in caption.parent.iterdir()) == ["a.png", "a.txt"]  # no temp file left
    again = client.post("/api/dataset", json={"train_data_dir": "data", "resolution": "64"}, headers=POST).json()
    assert again["images"][0]["caption"] == "a red star, big"
    bad = client.post("/api/caption", json={"image": "data/10_star/a.png", "caption_extension": "/x", "caption": "x"},
                      headers=POST)
    assert bad.status_code == 400 and "caption_extension" in bad.json()["error"]


# -- jobs -----------------------------------------------------------------------------------------------------

def run_values(**more):
    return {"pretrained_model_name_or_path": "builtin:mini", "train_data_dir": "data", "output_dir": "out",
            "output_name": "star", "max_train_steps": 150, **more}


def test_queue_stop_resume_finish_and_delete(root, tmp_path, studios, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.02")
    client = studio_client(root, tmp_path / "data", studios, fake_python)
    nasty = "x; touch PWNED $(touch PWNED2)"
    job = client.post("/api/jobs", json={"values": run_values(training_comment=nasty)}, headers=POST).json()
    assert job["state"] == "running" and job["output_dir"] == "out"
    second = client.post("/api/jobs", json={"values": run_values(output_name="other", max_train_steps=3)},
                         headers=POST).json()
    assert second["state"] == "queued"  # one job at a time
    wait_for(client, job["id"], lambda j: j["progress"]["step"] >= 3, "reached step 3")
    assert client.post(f"/api/jobs/{job['id']}/stop", json={}, headers=POST).json()["stop_requested"]
    stopped = wait_for(client, job["id"], lambda j: j["state"] != "running", "stopped")
    assert stopped["state"] == "stopped" and stopped["returncode"] == 130
    step = stopped["progress"]["step"]
    assert stopped["resume_state"] == f"out/star-step{step:08d}-state"
    assert any("SIGTERM at step" in line for line in stopped["log"])
    assert {f["path"] for f in stopped["files"]} >= {f"out/star-step{step:08d}.safetensors"}
    config = (tmp_path / "data" / "jobs" / str(job["id"]) / "config.toml").read_text()
    assert f"training_comment = {json.dumps(nasty)}" in config
    assert not any((root / n).exists() for n in ("PWNED", "PWNED2"))

    other = wait_for(client, second["id"], lambda j: j["state"] not in ("queued", "running"), "ran")
    assert other["state"] == "finished"
    resumed = client.post(f"/api/jobs/{job['id']}/resume", json={}, headers=POST).json()
    assert resumed["resume_of"] == job["id"] and resumed["name"] == "star (resumed)"
    finished = wait_for(client, resumed["id"], lambda j: j["state"] not in ("queued", "running"), "finished")
    assert finished["state"] == "finished" and finished["progress"]["step"] == 150
    assert finished["progress"]["loss"][0][0] == step + 1  # its curve goes on from the saved state
    resume_config = (tmp_path / "data" / "jobs" / str(resumed["id"]) / "config.toml").read_text()
    assert f'resume = "out/star-step{step:08d}-state"' in resume_config
    assert "out/star.safetensors" in {f["path"] for f in finished["files"]}

    (root / "out" / "mine.txt").write_text("the user's")
    assert client.post(f"/api/jobs/{finished['id']}/delete", json={"files": True},
                       headers={"X-Studio-Request": "1"}).status_code == 200
    assert not (root / "out" / "star.safetensors").exists() and (root / "out" / "mine.txt").exists()
    assert (root / "out" / f"star-step{step:08d}-state").is_dir()  # the first job's: not deleted with the second
    deleted = client.post(f"/api/jobs/{job['id']}/delete", json={"files": True}, headers=POST).json()
    assert f"out/star-step{step:08d}-state" in deleted["removed"]
    assert sorted(p.name for p in (root / "out").iterdir()) == ["mine.txt", "other.safetensors"]
    assert (root / "data").is_dir()  # the training data is never the job's
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [second["id"]]


def test_a_restarted_studio_finds_the_truth(root, tmp_path, studios, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    data = tmp_path / "data"
    first = studio_client(root, data, studios, fake_python)
    running = first.post("/api/jobs", json={"values": run_values(max_train_steps=40)}, headers=POST).json()
    queued = first.post("/api/jobs", json={"values": run_values(output_name="next", max_train_steps=2)},
                        headers=POST).json()
    wait_for(first, running["id"], lambda j: j["progress"]["step"] >= 1, "started stepping")
    # a job the database says runs, whose process is gone (the machine rebooted, say)
    queue = first.app.app.state.studio.queue
    lost = queue.add("lost", run_values(output_name="lost"), "out", "lost")
    with queue.connect() as db:
        db.execute("UPDATE jobs SET state = 'running', pid = ?, pid_started = '1' WHERE id = ?", (2 ** 22 + 9, lost))
    del first  # the studio stops; its job goes on in its own session

    second = studio_client(root, data, studios, fake_python)
    studio = second.app.app.state.studio
    studio.runner.recover()
    assert second.get(f"/api/jobs/{running['id']}").json()["state"] == "running"  # adopted
    gone = second.get(f"/api/jobs/{lost}").json()
    assert gone["state"] == "failed" and "not watching" in gone["error"]
    assert second.get(f"/api/jobs/{queued['id']}").json()["state"] == "queued"  # nothing queued is lost
    done = wait_for(second, running["id"], lambda j: j["state"] != "running", "finished")
    assert done["state"] == "finished" and done["progress"]["end"]["status"] == "finished"
    wait_for(second, queued["id"], lambda j: j["state"] == "finished", "ran after the adopted job")


def test_the_event_stream_pushes_the_jobs_progress(root, tmp_path, studios, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_STEP_S", "0.01")
    client = studio_client(root, tmp_path / "data", studios, fake_python)
    job = client.post("/api/jobs", json={"values": run_values(max_train_steps=5)}, headers=POST).json()
    wait_for(client, job["id"], lambda j: j["state"] == "finished", "finished")
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [json.loads(part.split("data: ", 1)[1]) for part in text.split("\n\n") if part.startswith("event: job")]
    assert events[-1]["state"] == "finished" and [p[0] for p in events[-1]["progress"]["loss"]] == [1, 2, 3, 4, 5]
    assert events[-1]["progress"]["loss"][-1][1] == pytest.approx(1 / 5)


def test_tools_run_from_checked_argv(root, tmp_path, studios):
    client = studio_client(root, tmp_path / "data", studios)
    fields = client.get("/api/tools").json()["tools"]
    assert {f["name"] for f in fields["excise"]} >= {"input_dir", "output_dir", "words"}
    refused = client.post("/api/tools/inspect", json={"values": {"lora": "../secret.txt"}}, headers=POST)
    assert refused.status_code == 403
    assert client.post("/api/tools/rm", json={"values": {}}, headers=POST).status_code == 400
    flag_like = client.post("/api/tools/excise", json={"values": {"input_dir": "data", "output_dir": "--overwrite",
                                                                  "words": ["star"]}}, headers=POST)
    assert flag_like.status_code == 400 and "would be a flag" in flag_like.json()["error"]
    # what a task runs: `python -m lora_diffusion excise ARGV` (here in this process: a child would
    # spend its time importing torch)
    argv = tool_argv("excise", {"input_dir": "data", "output_dir": "excised", "words": ["red"]}, root)
    assert argv == ["--words", "red", "--", "data", "excised"]
    assert cli.main(["excise", *argv]) == 0
    assert (root / "excised" / "10_star" / "a.txt").read_text().strip() == "a star"
    assert cli.main(["excise", *argv]) == 2  # the tool's own refusal (no --overwrite), as one line


def test_the_command_prints_the_token_once_and_refuses_bad_flags(tmp_path, monkeypatch, capsys):
    import argparse

    import uvicorn

    from lora_diffusion.studio import command

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: served.append((host, port)))
    monkeypatch.chdir(tmp_path)

    def run(*flags):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        return command.run(parser.parse_args(list(flags)))

    assert run("--host", "0.0.0.0", "--port", "7999") == 0
    token = (tmp_path / ".studio" / "token").read_text().strip()
    first = capsys.readouterr().out
    assert f"http://0.0.0.0:7999/?token={token}" in first and "printed this once" in first
    assert run("--host", "0.0.0.0", "--port", "7999") == 0
    again = capsys.readouterr().out
    assert token not in again and "the token in" in again
    assert run() == 0 and "http://127.0.0.1:7860/" in capsys.readouterr().out
    assert served == [("0.0.0.0", 7999), ("0.0.0.0", 7999), ("127.0.0.1", 7860)]
    for flags, message in ((["--root", "nowhere"], "--root nowhere: not a folder"),
                           (["--max_jobs", "0"], "--max_jobs 0"), (["--port", "70000"], "--port 70000")):
        with pytest.raises(ValueError, match=message):
            run(*flags)
