"""Resumable training state (--save_state / --resume), written atomically, and output rotation.

A state folder is what `accelerator.save_state` writes (prepared models, optimizer, lr scheduler, the
python/numpy/torch/cuda RNG states, objects registered with accelerator.register_for_checkpointing)
plus `train_state.json` with the loop position (step, epoch, batch_in_epoch, extra). It is written to
`<dir>.tmp` and renamed into place, so a crash mid-save leaves the previous state as it was; a folder
without train_state.json is never treated as a state.
Tip: prepare only the LoRA network (not the frozen U-Net/text encoder) with the accelerator when you
can, or every state folder holds a full copy of the base models.
"""

import glob
import json
import os
import re
import shutil
from pathlib import Path

from ..io import atomic_write

TRAIN_STATE_FILE = "train_state.json"
STATE_FORMAT = 1


def _replace_dir(new_dir, final_dir):
    """Move new_dir to final_dir; an existing final_dir is moved aside first and deleted only afterwards."""
    old_dir = final_dir.with_name(final_dir.name + ".old")
    if old_dir.exists():
        shutil.rmtree(old_dir)
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(new_dir, final_dir)
    if old_dir.exists():
        shutil.rmtree(old_dir)


def save_state(state_dir, *, accelerator, step, epoch, batch_in_epoch, extra=None):
    """Save everything needed to resume into `state_dir` (replacing an older state there). Call on all processes.

    step: optimizer steps done; epoch: current epoch (0-based or 1-based, the caller's convention, stored
    as given); batch_in_epoch: batches of that epoch already consumed; extra: any JSON-able dict.
    """
    state_dir = Path(state_dir)
    tmp_dir = state_dir.with_name(state_dir.name + ".tmp")
    if accelerator.is_main_process and tmp_dir.exists():
        shutil.rmtree(tmp_dir)  # leftover of an interrupted save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = dict(format=STATE_FORMAT, step=int(step), epoch=int(epoch), batch_in_epoch=int(batch_in_epoch))
        record["extra"] = extra or {}
        text = json.dumps(record, indent=2)
        atomic_write(tmp_dir / TRAIN_STATE_FILE, lambda f: f.write(text), mode="w")
        _replace_dir(tmp_dir, state_dir)
    accelerator.wait_for_everyone()
    return state_dir


class StateNotFoundError(FileNotFoundError):
    """--resume points at something that is not a complete training state."""


def read_train_state(state_dir):
    """The train_state.json of a state folder as a dict (no accelerator needed)."""
    state_dir = Path(state_dir)
    expected = f"a folder written by --save_state, holding {TRAIN_STATE_FILE} and accelerate's optimizer/RNG files"
    if not state_dir.is_dir():
        hint = ""
        if state_dir.with_name(state_dir.name + ".old").is_dir():
            hint = f" ({state_dir.name}.old exists: a save was interrupted between two renames; rename it back)"
        raise StateNotFoundError(f"--resume {state_dir}: no such folder; expected {expected}{hint}")
    path = state_dir / TRAIN_STATE_FILE
    if not path.is_file():
        raise StateNotFoundError(
            f"--resume {state_dir}: {TRAIN_STATE_FILE} is missing (an incomplete or foreign folder); expected {expected}. "
            f"To start from LoRA weights instead of resuming, use --network_weights FILE.safetensors"
        )
    try:
        record = json.loads(path.read_text())
        return dict(
            step=int(record["step"]),
            epoch=int(record["epoch"]),
            batch_in_epoch=int(record["batch_in_epoch"]),
            extra=dict(record.get("extra") or {}),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise StateNotFoundError(f"--resume {state_dir}: {path.name} is unreadable ({e}); expected {expected}") from e


def load_state(state_dir, *, accelerator):
    """Restore what save_state saved (call after accelerator.prepare, with the same objects registered).

    Returns dict(step, epoch, batch_in_epoch, extra): skip that many batches of that epoch to continue.
    """
    record = read_train_state(state_dir)
    accelerator.load_state(str(state_dir))
    return record


def _natural_key(path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", os.path.basename(path))]


def rotate(paths_pattern, keep_last_n):
    """Delete all but the newest `keep_last_n` outputs matching a glob pattern (files or state folders).

    "Newest" is by the numbers in the names (name-000003 < name-000010; zero-padded names sort the same).
    keep_last_n None keeps everything. Returns the deleted paths.
    """
    if keep_last_n is None:
        return []
    if keep_last_n < 1:
        raise ValueError(f"--save_last_n_epochs/--save_last_n_steps must be >= 1, got {keep_last_n}")
    matches = [p for p in glob.glob(str(paths_pattern)) if not p.endswith((".tmp", ".old"))]
    matches.sort(key=_natural_key)
    removed = matches[: max(0, len(matches) - keep_last_n)]
    for path in removed:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return removed
