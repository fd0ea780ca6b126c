"""The run's output folder: checked before any work, other runs' files told apart (ss_session_id), LoRA files
written with the run's metadata, the last samples summarized."""

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .errors import TrainingError

# --save_precision (kohya's names: float, fp16, bf16; None keeps the training dtype)
SAVE_PRECISION_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_output_dir(output_dir: Path):
    """Create --output_dir and make sure a file can be written there, before any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file; expected a folder (or a path to create one at)")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise TrainingError(f"--output_dir {output_dir} is not writable ({e.strerror or e})") from None


def session_of(path: Path):
    """The ss_session_id of a LoRA file, or the session_id a state folder records (None when unreadable)."""
    from safetensors import safe_open

    try:
        if path.is_dir():
            return json.loads((path / "train_state.json").read_text(encoding="utf-8"))["extra"]["session_id"]
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("ss_session_id")
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return None


def outputs_of_other_runs(output_dir: Path, output_name: str, session_id: str) -> list[Path]:
    """Files and state folders this run would write (final, epoch, step) that another run wrote."""
    names = re.compile(re.escape(output_name) + r"((-\d{6}|-step\d{8})?(\.safetensors|-state)|_emb\.safetensors)")
    return sorted(p for p in output_dir.iterdir() if names.fullmatch(p.name) and session_of(p) != session_id)


def check_free_space(output_dir: Path, network, args):
    """Roughly: two copies of the largest save (an atomic write keeps the old file until the new one is whole)."""
    n = sum(p.numel() for p in network.parameters())
    bytes_per_value = (SAVE_PRECISION_DTYPES[args.save_precision] or torch.float32).itemsize
    size = n * bytes_per_value + (n * 4 * 4 if args.save_state else 0)
    free = shutil.disk_usage(output_dir).free
    if free < 2 * size:
        raise TrainingError(f"--output_dir {output_dir}: only {free / 2**20:.1f} MiB free, each save needs about "
                            f"{size / 2**20:.1f} MiB (twice that while it replaces an older file)")


def save_lora(run, path, *, epoch, step, final=False):
    """One LoRA file with the whole run's settings in its metadata, written by the main process only."""
    from . import training_metadata

    if not run.accelerator.is_main_process:
        return
    args, models = run.args, run.models
    metadata = {} if args.no_metadata else training_metadata(
        **run.metadata, ss_epoch=epoch, ss_steps=step, ss_training_finished_at=time.time() if final else None)
    metadata.update(modelspec_metadata(args))
    run.network.save_weights(path, dtype=SAVE_PRECISION_DTYPES[args.save_precision], metadata=metadata,
                             output_name=args.output_name, v2=models.v2,
                             v_parameterization=models.v_parameterization, resolution=run.resolution)
    run.accelerator.print(f"saved {path}")


MODELSPEC_KEYS = ("title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                  "trigger_phrase", "preprocessor", "is_negative_embedding")


def modelspec_metadata(args) -> dict[str, str]:
    """kohya's --metadata_<key> flags as the file's modelspec.<key> entries (only those given)."""
    return {f"modelspec.{key}": str(getattr(args, f"metadata_{key}")) for key in MODELSPEC_KEYS
            if getattr(args, f"metadata_{key}", None) is not None}


def summarize_last_samples(paths, grid_path) -> list[str]:
    """The last sampling's images in one grid, and the shapes world judge's verdict when the prompts are its own."""
    from PIL import Image

    from lora_diffusion.world import parse_caption
    from lora_diffusion.world.quality import fmt, summarize_samples

    grid_path, accuracy = summarize_samples(paths, grid_path)
    lines = [f"samples of the last sampling in one grid: {grid_path}"]
    if accuracy:
        judged = sum(parse_caption(Image.open(p).text.get("prompt", "")) is not None for p in paths)
        lines.append(f"judged (shapes world): {fmt(accuracy)} of {judged} samples")
    return lines
