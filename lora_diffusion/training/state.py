"""Resumable training state (--save_state / --resume) in safetensors and JSON only, written atomically.

A state folder holds exactly:
    train_state.json      loop position (step, epoch, batch_in_epoch, extra), the optimizer's settings and
                          scalars, the lr scheduler's and GradScaler's state
    network.safetensors   the network's state_dict
    optimizer.safetensors the optimizer's state tensors, as "<param index>/<name>"
    rng-<i>.safetensors   process i's torch CPU/CUDA generator states; python and numpy states in its header
The main process writes every file (the other processes' random states are gathered to it); resuming on several
nodes needs the folder where every node can read it (a shared disk, or a copy on each node). Nothing in it is
ever unpickled, so a state folder from anywhere cannot run code: a folder holding any other file (a .pkl,
accelerate's optimizer.bin ...) is refused, and so is one with a missing or garbled file. It is written
to `<dir>.tmp` and renamed into place (io.replace_folder), so a crash mid-save leaves the previous state as it was.
"""

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from lora_diffusion.formats.io import atomic_write, new_staging_folder, old_folder_names, replace_folder

TRAIN_STATE_FILE = "train_state.json"
STATE_FORMAT = 2


class StateNotFoundError(FileNotFoundError):
    """--resume points at something that is not a training state folder."""


class StateError(ValueError):
    """A state folder that cannot be saved or loaded as it is (foreign, tampered, garbled, another network)."""


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


# -- JSON with tuples (betas) and tensors (kept beside it in a safetensors file, referenced by key) --------------


def _to_json(value, where, tensors=None, key=""):
    if isinstance(value, torch.Tensor):
        if tensors is not None:
            tensors[key] = value
            return {"__tensor__": key}
        if value.numel() == 1:
            return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, where, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json(v, where, tensors, f"{key}/{k}") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StateError(f"cannot save {where}: a value of type {type(value).__name__} ({value!r:.60}) is not plain data")


def _from_json(value, tensors=None):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__tensor__"} and tensors is not None:
            return tensors[value["__tensor__"]]
        return {k: _from_json(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    return value


# -- saving -------------------------------------------------------------------------------------------------------


def _write_tensors(path, tensors, metadata=None):
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # clone: no shared storage
    data = save_safetensors_bytes(tensors, metadata)
    atomic_write(path, lambda f: f.write(data))


def _rng_state():
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    header = {"python": json.dumps([version, list(internal), gauss]),
              "numpy": json.dumps([kind, keys.tolist(), pos, has_gauss, cached])}
    return tensors, header


def _optimizer_parts(optimizer):
    """(tensors, JSON with references to them) of an optimizer's state_dict."""
    state_dict, tensors = optimizer.state_dict(), {}
    state = {str(i): _to_json(v, "the optimizer state", tensors, str(i)) for i, v in state_dict["state"].items()}
    return tensors, {"state": state, "param_groups": _to_json(state_dict["param_groups"], "the optimizer settings")}


def save_state(state_dir, *, network, optimizer, lr_scheduler, step, epoch, batch_in_epoch, extra=None,
               accelerator=None):
    """Save everything needed to resume into `state_dir` (replacing an older state there). Call on all processes.

    step: optimizer steps done; epoch: current epoch (the caller's convention, stored as given); batch_in_epoch:
    batches of that epoch already consumed; extra: any JSON-able dict. Refuses (StateError) to write NaN/inf.
    """
    state_dir = Path(state_dir)
    tmp_dir = state_dir.with_name(state_dir.name + ".tmp")  # what new_staging_folder(fixed_name=True) makes
    main = accelerator is None or accelerator.is_main_process
    world = 1 if accelerator is None else accelerator.num_processes
    weights = network.state_dict()
    optimizer_tensors, optimizer_rest = _optimizer_parts(optimizer)
    bad = non_finite(weights) + [f"optimizer {k}" for k in non_finite(optimizer_tensors)]
    if bad:
        raise StateError(f"not saving {state_dir}: {len(bad)} tensor(s) hold NaN/inf, e.g. {bad[0]}")
    scaler = getattr(accelerator, "scaler", None)
    record = dict(format=STATE_FORMAT, step=int(step), epoch=int(epoch), batch_in_epoch=int(batch_in_epoch),
                  extra=_to_json(extra or {}, "extra"), processes=world, optimizer=optimizer_rest,
                  lr_scheduler=_to_json(lr_scheduler.state_dict(), "the lr scheduler"),
                  scaler=None if scaler is None else _to_json(scaler.state_dict(), "the GradScaler"))
    text = json.dumps(record, indent=1)  # every check above runs on every process, before any of them waits
    # Every process's random states go to the main process, which writes the whole folder: on several nodes each
    # rng-<i> file lands in the one folder that is renamed into place, whichever disk the other nodes write to.
    rng_states = _gather(accelerator, _rng_state())
    if main:
        new_staging_folder(state_dir, fixed_name=True)  # a leftover of an interrupted save there is deleted
        for i, (rng_tensors, rng_header) in enumerate(rng_states):
            _write_tensors(tmp_dir / f"rng-{i}.safetensors", rng_tensors, rng_header)
        _write_tensors(tmp_dir / "network.safetensors", weights)
        _write_tensors(tmp_dir / "optimizer.safetensors", optimizer_tensors)
        atomic_write(tmp_dir / TRAIN_STATE_FILE, lambda f: f.write(text), mode="w")  # last: the folder is whole
        replace_folder(tmp_dir, state_dir)
    _wait(accelerator)  # no process goes on (to rotate, to resume) before the folder is in place
    return state_dir


def _gather(accelerator, value) -> list:
    """`value` of every process, in rank order (on the main process; the others get theirs too)."""
    if accelerator is None or accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _wait(accelerator):
    if accelerator is not None and accelerator.num_processes > 1:
        accelerator.wait_for_everyone()


# -- loading ------------------------------------------------------------------------------------------------------

EXPECTED = "a folder written by --save_state (train_state.json, network.safetensors, optimizer.safetensors, " \
           "rng-<i>.safetensors)"


def _read_record(state_dir):
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        hint, old = "", old_folder_names(state_dir)
        if old:
            hint = f" ({old[-1].name} exists: a save was interrupted between two renames; rename it back)"
        raise StateNotFoundError(f"--resume {state_dir}: no such folder; expected {EXPECTED}{hint}")
    path = state_dir / TRAIN_STATE_FILE
    if not path.is_file():
        raise StateNotFoundError(
            f"--resume {state_dir}: {TRAIN_STATE_FILE} is missing (an incomplete or foreign folder); expected "
            f"{EXPECTED}. To start from LoRA weights instead of resuming, use --network_weights FILE.safetensors")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if record.get("format") != STATE_FORMAT:
            raise StateError(
                f"--resume {state_dir}: format {record.get('format')!r} is not this trainer's state format "
                f"{STATE_FORMAT} (format 1 states held accelerate pickles, which are never loaded: start from the "
                f"LoRA file with --network_weights instead)")
        for key in ("step", "epoch", "batch_in_epoch", "processes"):
            if type(record.get(key)) is not int or record[key] < 0:
                raise ValueError(f"{key} is {record.get(key)!r}, expected a whole number >= 0")
        if not 1 <= record["processes"] <= 4096:
            raise ValueError(f"processes is {record['processes']}, expected 1 to 4096")
        if not isinstance(record.get("extra"), dict) or not isinstance(record.get("optimizer"), dict):
            raise ValueError("extra/optimizer are not JSON objects")
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, StateError):
            raise
        raise StateError(f"--resume {state_dir}: {TRAIN_STATE_FILE} is unreadable ({e}); expected {EXPECTED}") from None
    return record


def read_train_state(state_dir):
    """dict(step, epoch, batch_in_epoch, extra) of a state folder, checked but without loading its tensors."""
    record = _read_record(state_dir)
    _check_files(Path(state_dir), record["processes"])
    return dict(step=record["step"], epoch=record["epoch"], batch_in_epoch=record["batch_in_epoch"],
                extra=_from_json(record["extra"]))


def _check_files(state_dir, processes):
    expected = {TRAIN_STATE_FILE, "network.safetensors", "optimizer.safetensors"}
    expected |= {f"rng-{i}.safetensors" for i in range(processes)}
    present = {p.name for p in state_dir.iterdir()}
    foreign = sorted(present - expected)
    if foreign:
        raise StateError(f"--resume {state_dir}: unexpected {foreign[0]!r} in the folder; a state folder holds only "
                         f"{', '.join(sorted(expected))} (pickles and other files are never loaded: a tampered or "
                         f"foreign folder?)")
    missing = sorted(expected - present)
    if missing:
        raise StateError(f"--resume {state_dir}: {missing[0]} is missing (an incomplete or damaged state)")
    odd = sorted(name for name in expected if (state_dir / name).is_symlink() or not (state_dir / name).is_file())
    if odd:
        raise StateError(f"--resume {state_dir}: {odd[0]} is not a plain file (a link or a folder)")


def _read_tensors(state_dir, name):
    path = Path(state_dir) / name
    try:
        data = path.read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        return load_safetensors_bytes(data), header
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds on a garbled file
        raise StateError(f"--resume {state_dir}: {name} is unreadable ({type(e).__name__}: {e})") from None


def load_state(state_dir, *, network, optimizer, lr_scheduler, accelerator=None):
    """Restore what save_state saved into the same kind of objects; returns dict(step, epoch, batch_in_epoch, extra).

    Skip `batch_in_epoch` batches of `epoch` to continue. Every problem is a StateError naming the folder."""
    state_dir = Path(state_dir)
    record = _read_record(state_dir)
    _check_files(state_dir, record["processes"])
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    if record["processes"] != world:
        raise StateError(f"--resume {state_dir}: saved by {record['processes']} process(es), this run has {world}; "
                         f"resume with the same number of processes")

    def bad(what):
        return StateError(f"--resume {state_dir}: {what}")

    weights, _ = _read_tensors(state_dir, "network.safetensors")
    own = network.state_dict()
    if set(weights) != set(own):
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        raise bad(f"network.safetensors is for another network (missing {missing[:2]}, unexpected {unexpected[:2]}; "
                  f"other --network_args or trained parts?)")
    for key, value in own.items():
        if weights[key].shape != value.shape:
            raise bad(f"network.safetensors is for another network: {key} is {tuple(weights[key].shape)}, this "
                      f"run's is {tuple(value.shape)} (another --network_dim or --network_args?)")
    if non_finite(weights):
        raise bad(f"network.safetensors holds NaN/inf ({non_finite(weights)[0]})")

    optimizer_tensors, _ = _read_tensors(state_dir, "optimizer.safetensors")
    try:
        saved = record["optimizer"]
        groups = _from_json(saved["param_groups"])
        state = {int(i): _from_json(v, optimizer_tensors) for i, v in saved["state"].items()}
        current = optimizer.state_dict()["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
            raise ValueError(f"{len(groups)} parameter group(s) of {[len(g['params']) for g in groups]} tensors, "
                             f"this run has {[len(g['params']) for g in current]} (other trained parts?)")
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise bad(f"the optimizer state does not fit this run's optimizer ({type(e).__name__}: {e})") from None
    try:
        lr_scheduler.load_state_dict(_from_json(record["lr_scheduler"]))
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and record.get("scaler") is not None:
            scaler.load_state_dict(_from_json(record["scaler"]))
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise bad(f"the lr scheduler state is unreadable ({type(e).__name__}: {e})") from None

    rng, header = _read_tensors(state_dir, f"rng-{rank}.safetensors")
    try:
        version, internal, gauss = json.loads(header["python"])
        kind, keys, pos, has_gauss, cached = json.loads(header["numpy"])
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(rng["torch_cpu"])
        cuda = [rng[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in rng))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise bad(f"rng-{rank}.safetensors is unreadable ({type(e).__name__}: {e})") from None
    network.load_state_dict(weights)
    return dict(step=record["step"], epoch=record["epoch"], batch_in_epoch=record["batch_in_epoch"],
                extra=_from_json(record["extra"]))


# -- rotation -----------------------------------------------------------------------------------------------------


def rotate(written, keep_last_n, *, owned=None):
    """Delete all but the newest `keep_last_n` of the outputs (files or state folders) this run `written`, oldest
    first. Never looks at other files; `owned(path)` (optional) must also say yes before a path is deleted, e.g.
    that the file still carries this run's session id. keep_last_n None keeps everything. Returns what was
    deleted."""
    if keep_last_n is None:
        return []
    if keep_last_n < 1:
        raise ValueError(f"--save_last_n_epochs must be >= 1, got {keep_last_n}")
    removed = []
    for path in list(written)[: max(0, len(written) - keep_last_n)]:
        path = str(path)
        if not os.path.exists(path) or (owned is not None and not owned(path)):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(path)
    return removed
