"""Jobs as train_lora.py subprocesses: each gets a TOML made from its form values (so a job is exactly what the
CLI would do) and runs in a session of its own (it outlives the studio and the page). The runner starts queued
jobs while fewer than --max_jobs run, sends SIGTERM for a stop (the trainer saves a LoRA and a state, then exits)
and settles each ended job from its progress file's end record, or from its exit status when there is none."""

import glob
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from lora_diffusion.formats.io import atomic_write
from lora_diffusion.training.progress import progress_path

from .form import FormError, parse, toml_text
from .jobs import ENDED, JobQueue, process_alive, process_start_time
from .paths import PathRefused, inside_root, relative_to_root
from .progress import read_events, written_paths


class Runner:
    def __init__(self, queue: JobQueue, data_dir: Path, root: Path, max_running: int = 1, python=sys.executable):
        self.queue, self.data_dir, self.root = queue, Path(data_dir), Path(root).resolve()
        self.max_running, self.python = max_running, python
        self.children = {}  # job id -> Popen of the jobs this studio started
        self.signalled = set()

    # -- files of a job -------------------------------------------------------------------------------------

    def job_dir(self, job_id: int) -> Path:
        return self.data_dir / "jobs" / str(job_id)

    def log_path(self, job_id: int) -> Path:
        return self.job_dir(job_id) / "train.log"

    def progress_path(self, job: dict) -> Path:
        """Where the job's trainer writes its progress (the trainer's own rule), under the root."""
        path = progress_path(SimpleNamespace(progress_file=job["options"].get("progress_file"),
                                             output_dir=job["output_dir"], output_name=job["output_name"]))
        return path if path.is_absolute() else self.root / path

    def events(self, job: dict) -> list[dict]:
        """This job's events: those after its own start (a resumed run's progress file may hold an earlier one)."""
        events = read_events(self.progress_path(job))
        starts = [i for i, e in enumerate(events) if e["event"] == "start"]
        if job["pid"] and starts and events[starts[-1]].get("pid") not in (None, job["pid"]):
            return []  # the last start is another process' (this job's never started writing)
        return events

    def log_tail(self, job_id: int, lines: int = 40) -> list[str]:
        try:
            with open(self.log_path(job_id), "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        parts = [p.rstrip() for line in text.split("\n") for p in line.split("\r")[-1:]]  # tqdm's last redraw
        return [p for p in parts if p][-lines:]

    # -- the loop ------------------------------------------------------------------------------------------

    def recover(self):
        """After a (re)start: a job recorded as running is either still running (adopted: watched by pid) or
        gone (settled from what it wrote)."""
        for job in self.queue.in_state("running"):
            if not process_alive(job["pid"], job["pid_started"]):
                self.settle(job, None)

    def tick(self):
        for job in self.queue.in_state("running"):
            child = self.children.get(job["id"])
            returncode = child.poll() if child is not None else None
            alive = returncode is None if child is not None else process_alive(job["pid"], job["pid_started"])
            if alive:
                if job["stop_requested"] and job["id"] not in self.signalled:
                    self.signal(job)
                continue
            self.children.pop(job["id"], None)
            self.settle(job, returncode)
        while (job := self.queue.claim_next(self.max_running)) is not None:
            self.start(job)

    def start(self, job: dict):
        folder = self.job_dir(job["id"])
        folder.mkdir(parents=True, exist_ok=True)
        try:
            args, parser = parse(job["options"])
            toml = toml_text(args, parser)
        except (FormError, PathRefused) as e:
            self.queue.end(job["id"], "failed", error=str(e))
            return
        config = folder / "config.toml"
        atomic_write(config, lambda f: f.write(toml), mode="w")
        argv = [self.python, "-m", "lora_diffusion.cli", "train", "--config_file", str(config)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            with open(self.log_path(job["id"]), "ab") as log:
                child = subprocess.Popen(argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        except OSError as e:
            self.queue.end(job["id"], "failed", error=f"could not start {argv[0]}: {e}")
            return
        self.children[job["id"]] = child
        self.queue.set_process(job["id"], child.pid, process_start_time(child.pid))

    def signal(self, job: dict):
        self.signalled.add(job["id"])
        try:
            os.kill(job["pid"], signal.SIGTERM)  # the trainer's own graceful stop (a LoRA and a state saved)
        except (ProcessLookupError, TypeError):
            pass

    def stop(self, job_id: int) -> dict:
        job = self.queue.request_stop(job_id)
        if job["state"] == "running" and job["pid"] and process_alive(job["pid"], job["pid_started"]):
            self.signal(job)
        return job

    def settle(self, job: dict, returncode: int | None):
        """The job's end state: the trainer's end record when it wrote one, else what the exit status says."""
        end = next((e for e in reversed(self.events(job)) if e["event"] == "end"), None)
        if end is not None and end.get("status") in ENDED:
            state, error = end["status"], end.get("error")
        elif returncode == 0:
            state, error = "finished", None
        elif job["stop_requested"]:
            state, error = "stopped", None
        elif returncode is None:
            state, error = "failed", "the process ended while the studio was not watching, with no end record"
        else:
            state, error = "failed", (self.log_tail(job["id"], 1) or [f"exit status {returncode}"])[0]
        self.signalled.discard(job["id"])
        self.queue.end(job["id"], state, returncode, error)

    # -- what a job wrote ----------------------------------------------------------------------------------

    def resume_state(self, job: dict, events=None) -> str | None:
        """The newest state folder of the job, as the page names it (relative to the root): from its checkpoint
        records, else the newest -state folder of its output name. `events`: self.events(job), when read."""
        events = self.events(job) if events is None else events
        states = [Path(e["state"]) for e in events if e["event"] == "checkpoint" and e.get("state")]
        if not states:
            output = self.root / job["output_dir"]
            states = sorted(output.glob(f"{glob.escape(job['output_name'])}*-state"), key=lambda p: p.stat().st_mtime)
        for state in reversed(states):
            try:
                path = inside_root(self.root, str(state))  # an absolute record stays itself
            except PathRefused:
                continue
            if path.is_dir() and path != self.root:
                return relative_to_root(self.root, path)
        return None

    def written(self, job: dict, events=None) -> list[Path]:
        """The files and state folders the job's progress file names, under its output folder or the root.
        `events`: self.events(job), when read."""
        output = inside_root(self.root, job["output_dir"] or ".", "--output_dir")
        paths = []
        for text in written_paths(self.events(job) if events is None else events):
            try:
                path = inside_root(self.root, text)
            except PathRefused:
                continue
            if output in path.parents and path.exists():
                paths.append(path)
        progress = self.progress_path(job)
        if output in progress.parents and progress.exists():
            paths.append(progress)
        return paths

    def delete_outputs(self, job: dict) -> list[str]:
        """Deletes what the job wrote (never a folder of the user's: only the run's own -state folders)."""
        removed = []
        for path in self.written(job):
            if path.is_dir() and not path.is_symlink():
                if path.name.endswith("-state"):
                    shutil.rmtree(path)
                    removed.append(str(path))
            else:
                path.unlink(missing_ok=True)
                removed.append(str(path))
        shutil.rmtree(self.job_dir(job["id"]), ignore_errors=True)
        return removed






