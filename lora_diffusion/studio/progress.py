"""The trainer's progress file (`<output_dir>/<output_name>.progress.jsonl`, or --progress_file): one JSON object a
line with "event" and "time": start, step, sample, validation, checkpoint, end. It is read as it grows; a last
line still being written is left for the next read."""

import json
from pathlib import Path

EVENTS = ("start", "step", "sample", "validation", "checkpoint", "end")


class ProgressReader:
    """The events appended to a progress file since the last read()."""

    def __init__(self, path):
        self.path = Path(path)
        self.offset = 0

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except OSError:  # not written yet
            return []
        if size < self.offset:  # replaced by a new run's file: read it from its start
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        complete = data.rfind(b"\n") + 1  # a partial last line is read once its newline is there
        self.offset += complete
        return [event for event in map(parse_line, data[:complete].splitlines()) if event is not None]


def parse_line(line: bytes) -> dict | None:
    """One event, or None for a line that is no event object (a blank or damaged line is skipped, not fatal)."""
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) and event.get("event") in EVENTS else None


def read_events(path) -> list[dict]:
    return ProgressReader(path).read()


def summarize(events: list[dict]) -> dict:
    """What the page shows of a run: the latest step, the loss and LR curves, samples, validations, checkpoints and
    the end record. A resumed run appends to the same curves (its start event names its first step)."""
    summary = {"step": 0, "epoch": 0, "max_train_steps": None, "epochs": None, "loss": [], "lr": [],
               "steps_per_s": None, "eta_s": None, "samples": [], "validations": [], "checkpoints": [], "end": None,
               "pid": None}
    for event in events:
        kind = event["event"]
        if kind == "start":
            summary.update(max_train_steps=event.get("max_train_steps"), epochs=event.get("epochs"),
                           pid=event.get("pid"), end=None)
            first = event.get("step") or 0  # a resumed run redraws its curves from where the state was saved
            summary["loss"] = [p for p in summary["loss"] if p[0] <= first]
            summary["lr"] = [p for p in summary["lr"] if p[0] <= first]
        elif kind == "step":
            step = event.get("step", 0)
            summary.update(step=step, epoch=event.get("epoch", 0), steps_per_s=event.get("steps_per_s"),
                           eta_s=event.get("eta_s"))
            if isinstance(event.get("loss"), (int, float)):
                summary["loss"].append([step, event["loss"], event.get("loss_average")])
            lr = event.get("lr")
            if isinstance(lr, list) and lr:
                summary["lr"].append([step, *lr])
        elif kind == "sample":
            summary["samples"].append({k: event.get(k) for k in ("step", "epoch", "path", "prompt")})
        elif kind == "validation":
            summary["validations"].append({k: event.get(k) for k in ("step", "epoch", "metrics")})
        elif kind == "checkpoint":
            summary["checkpoints"].append({k: event.get(k) for k in ("step", "epoch", "path", "state")})
        elif kind == "end":
            summary["end"] = {k: event.get(k) for k in ("status", "step", "files", "error")}
            if isinstance(event.get("step"), int):
                summary["step"] = event["step"]
    return summary


def written_paths(events: list[dict]) -> list[str]:
    """Every file or state folder the progress file says the run wrote (what deleting a job may remove)."""
    paths = []
    for event in events:
        if event["event"] == "sample":
            paths.append(event.get("path"))
        elif event["event"] == "checkpoint":
            paths += [event.get("path"), event.get("state")]
        elif event["event"] == "end":
            paths += list(event.get("files") or [])
    return [p for p in dict.fromkeys(paths) if isinstance(p, str) and p]
