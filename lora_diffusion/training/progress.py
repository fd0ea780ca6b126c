"""The run's progress as JSON lines, for programs that watch a run (the studio): `<output_dir>/<output_name>.progress
.jsonl` unless --progress_file names another path, appended by the main process, one object a line, each written
whole in one write and flushed. Every object has "event" and "time" (unix seconds); the events and their fields:

    start       pid, max_train_steps, epochs, output_dir, output_name, step (0, or where a resumed run starts)
    step        step, epoch, loss, loss_average, lr (each parameter group's), steps_per_s, eta_s (every step)
    sample      step, epoch, path (the PNG), prompt
    validation  step, epoch, metrics (name -> number: validation_loss, judge_shape, fid, ...)
    checkpoint  step, epoch, path (the .safetensors), state (its state folder, or null)
    end         status ("finished", "stopped" or "failed"), step, files (the paths this run wrote that are still
                there), error (the message, or null)

`epoch` counts from 1 (the epoch the step belongs to, or the one just done). A resumed run appends to the file of
the run it resumes; each run's lines begin with its start event.
"""

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

RECENT_STEPS = 20  # steps_per_s is the pace over the last ones


class ProgressFile:
    """Appends the events of one run; a writer that is not `enabled` (the other processes) writes nothing."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path, self.enabled = path, enabled and path is not None
        self.step, self.files, self.step_times = 0, [], []
        self.descriptor = None  # opened for appending at the first line, closed after the end event

    def write(self, event: str, **fields):
        if "step" in fields:
            self.step = fields["step"]
        for key in ("path", "state"):
            if fields.get(key) is not None:
                fields[key] = str(fields[key])
                self.files.append(fields[key])
        if not self.enabled:
            return
        line = json.dumps({"event": event, "time": time.time(), **fields}) + "\n"
        if self.descriptor is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self.descriptor, line.encode("utf-8"))  # one write of a whole line: a reader never sees half of one

    def start(self, *, max_train_steps, epochs, output_dir, output_name, step):
        self.step_times = [(time.time(), step)]
        self.write("start", pid=os.getpid(), max_train_steps=max_train_steps, epochs=epochs,
                   output_dir=str(output_dir), output_name=output_name, step=step)

    def step_done(self, *, step, epoch, loss, loss_average, lr, max_train_steps):
        now = time.time()
        self.step_times = (self.step_times + [(now, step)])[-RECENT_STEPS - 1:]
        first_time, first_step = self.step_times[0]
        seconds = now - first_time
        steps_per_s = (step - first_step) / seconds if seconds > 0 and step > first_step else None
        eta_s = (max_train_steps - step) / steps_per_s if steps_per_s else None
        self.write("step", step=step, epoch=epoch, loss=loss, loss_average=loss_average, lr=list(lr),
                   steps_per_s=steps_per_s, eta_s=eta_s)

    def end(self, status: str, error: str | None = None):
        files = sorted({f for f in self.files if Path(f).exists()})
        self.write("end", status=status, step=self.step, files=files, error=error)
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None

    @contextmanager
    def ending(self):
        """The end event of the run inside: finished, stopped (Ctrl-C, SIGTERM) or failed (with the message)."""
        try:
            yield self
        except KeyboardInterrupt:
            self.end("stopped")
            raise
        except BaseException as e:
            self.end("failed", error=str(e) or type(e).__name__)
            raise
        self.end("finished")


def progress_path(args) -> Path:
    """--progress_file, else <output_dir>/<output_name>.progress.jsonl."""
    if args.progress_file:
        return Path(args.progress_file)
    return Path(args.output_dir) / f"{args.output_name}.progress.jsonl"
