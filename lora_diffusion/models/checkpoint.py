"""Reading one base-model checkpoint file (.safetensors, or .ckpt/.pt through torch.load) a tensor at a time.

    reader = CheckpointReader("v1-5-pruned-emaonly.safetensors", torch.float16)
    reader.names                                  # every key in the file
    reader.get("first_stage_model.encoder.conv_in.weight")   # one tensor, cast to fp16

Memory stays low: safetensors are read with plain file reads (not memory-mapped), and the pages of
memory-mapped .ckpt tensors are released once each tensor has been copied out.
"""

import ctypes
import ctypes.util
import json
import math
import os
import pickle
from pathlib import Path

import torch

from lora_diffusion.formats.io import refused_pickle_detail

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def load_libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if os.name == "posix" else None
    except OSError:
        return None


LIBC = load_libc()
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if LIBC is not None else 4096
MADV_DONTNEED = 4  # Linux and macOS


class ModelLoadError(ValueError):
    """A model path or file that cannot be loaded; the message names the file and what was expected."""


class CheckpointReader:
    """Key names of a checkpoint file, and each tensor on demand, cast to `dtype`."""

    def __init__(self, path, dtype):
        self.path, self.dtype = Path(path), dtype
        suffix = self.path.suffix.lower()
        if suffix not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(
                f"{self.path} is not a model checkpoint: expected a .safetensors or .ckpt/.pt file "
                "in the original SD1.x/2.x layout"
            )
        try:
            if suffix == ".safetensors":
                self.file, self.mapped = SafetensorsFile(self.path), False
                self.names = list(self.file.entries)
            else:
                self.file, self.mapped = read_torch_checkpoint(self.path)
                self.names = list(self.file)
        except ModelLoadError:
            raise
        except Exception as error:  # json, zipfile and pickle each raise their own kinds
            reason = f"{self.path} could not be read (corrupt, truncated or not a checkpoint?): {error}"
            raise ModelLoadError(reason) from error

    def get(self, name):
        tensor = self.file[name]
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        if not self.mapped:
            return tensor.to(dtype)
        owned = tensor.to(dtype, copy=True)  # the model must not keep pages of the file
        release_file_pages(tensor)
        return owned


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
# the precision names of our flags (generate --dtype, the model tools' --precision / --save_precision)
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


MAX_HEADER_SIZE = 100_000_000  # safetensors' own limit


class SafetensorsFile:
    """Reads one tensor at a time with plain file reads. Memory-mapping (safe_open) would leave every page it
    touched resident and counted in the process's memory until the file is closed: a 4 GB fp32 file loaded as
    fp16 would peak at 6 GB instead of 2 GB. The format: 8-byte little-endian header size, a JSON header
    {name: {dtype, shape, data_offsets}}, then the data. The header is checked as strictly as safetensors itself
    checks it (the file may come from anywhere): every tensor's bytes are exactly its dtype's itemsize x its shape,
    and the tensors tile the data from its first byte to the file's last, without gap or overlap."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= header_size <= min(size - 8, MAX_HEADER_SIZE):
                raise self.error(f"its header size {header_size} does not fit a file of {size} bytes "
                                 f"(at most {MAX_HEADER_SIZE}; truncated, or not a safetensors file?)")
            raw = f.read(header_size)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self.error(f"its header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise self.error(f"its header is a JSON {type(header).__name__}, not an object")
        self.data_start = 8 + header_size
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(v, str) for v in metadata.values())):
            raise self.error("its __metadata__ is not an object of strings")
        self.entries = header
        self.check_layout(size - self.data_start)

    def error(self, reason):
        return ModelLoadError(f"{self.path} could not be read as a safetensors file: {reason}")

    def check_layout(self, data_size):
        spans = []
        for name, entry in self.entries.items():
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise self.error(f"tensor {name!r}: expected an object with dtype, shape and data_offsets, "
                                 f"got {entry!r}")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise self.error(f"tensor {name!r} has dtype {dtype!r}; supported: {', '.join(SAFETENSORS_DTYPES)}")
            if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
                raise self.error(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise self.error(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end] with "
                                 f"0 <= begin <= end")
            expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
            if offsets[1] - offsets[0] != expected:
                raise self.error(f"tensor {name!r} has data_offsets {offsets} ({offsets[1] - offsets[0]} bytes), but "
                                 f"{dtype} x {shape} is {expected} bytes")
            spans.append((offsets[0], offsets[1], name))
        spans.sort()
        for (_, end, previous), (begin, later_end, name) in zip(spans, spans[1:]):
            if begin < end:
                raise self.error(f"the data of tensor {name!r} {[begin, later_end]} overlaps that of {previous!r} "
                                 f"(which ends at {end})")
        position, previous = 0, None
        for begin, end, name in spans:
            if begin > position:
                raise self.error(f"{begin - position} bytes before tensor {name!r} belong to no tensor (data_offsets "
                                 f"{[begin, end]}; the previous tensor ends at {position})")
            position, previous = end, name
        if position != data_size:
            where = f"the tensors end at byte {position} of the data" + (f" (after {previous!r})" if previous else "")
            raise self.error(f"{where}, but the file holds {data_size} bytes of data "
                             f"({'truncated?' if position > data_size else 'trailing bytes that belong to no tensor'})")

    def __getitem__(self, name):
        entry = self.entries[name]
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            f.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def read_torch_checkpoint(path):
    """(state dict, memory-mapped?) of a .ckpt/.pt file, read with weights_only=True: pickled code never runs."""
    try:
        try:
            checkpoint, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            checkpoint, mapped = torch.load(path, map_location="cpu", weights_only=True), False  # legacy format
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise  # a corrupt pickle, reported as such by the caller
        detail = refused_pickle_detail(error)
        if "global" not in detail.lower():  # an opcode the safe loader does not know: most likely not a checkpoint
            raise ModelLoadError(f"{path} could not be read (corrupt, truncated or not a checkpoint?): {detail}; "
                                 "only tensors are loaded from .ckpt files, for safety") from None
        raise ModelLoadError(
            f"{path} is refused for safety: it holds pickled objects other than tensors ({detail}), "
            "and loading those can run arbitrary code. Use a .safetensors version of the model, or convert this "
            "file to .safetensors with a tool you trust"
        ) from None  # torch's own text suggests weights_only=False, which we never do
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{path} does not hold a state dict (found {type(checkpoint).__name__})")
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}, mapped


def release_file_pages(tensor):
    """Drop the pages of a memory-mapped (read-only, file-backed) tensor from this process's resident memory;
    they are re-read from the file if touched again. Without this, every page read stays counted, and a 4 GB
    fp32 .ckpt loaded as fp16 would peak at 6 GB. Only for tensors from torch.load(mmap=True): on ordinary
    memory MADV_DONTNEED would zero the data."""
    if LIBC is None:
        return
    storage = tensor.untyped_storage()
    start = storage.data_ptr() & ~(PAGE_SIZE - 1)
    end = storage.data_ptr() + storage.nbytes()
    if end > start:
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)

