"""A full disk while a tool writes: the error names the file being written (the system's own "[Errno 28] No space
left on device" names none), the command exits with it and no traceback, and nothing half-written is left."""

import errno
import os

import pytest
import torch

from lora_diffusion import create_network
from lora_diffusion.cli import main
from lora_diffusion.formats import io
from lora_diffusion.models import build_tiny_models


class FullDisk:
    """A file whose writes fail as on a full disk, once `budget` bytes are written."""

    def __init__(self, file, budget):
        self.file, self.budget = file, budget

    def write(self, data):
        if len(data) > self.budget:
            self.file.write(data[:self.budget])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


@pytest.fixture
def full_disk(monkeypatch):
    """Call it to fill the disk: from then on every file opened by io.atomic_write takes 1000 bytes, no more."""
    real = os.fdopen
    return lambda: monkeypatch.setattr(io.os, "fdopen", lambda *a, **k: FullDisk(real(*a, **k), budget=1000))


def test_atomic_write_names_the_file_when_the_disk_is_full(tmp_path, full_disk):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    full_disk()
    with pytest.raises(OSError) as error:
        io.atomic_write(target, lambda f: f.write(b"x" * 5000))
    assert error.value.errno == errno.ENOSPC
    assert str(target) in str(error.value) and "No space left on device" in str(error.value)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_folder_writer_names_the_folder(tmp_path, monkeypatch):
    def fill(folder):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # e.g. save_pretrained's own write

    with pytest.raises(OSError) as error:
        io.build_folder_atomically(tmp_path / "model", fill)
    assert str(error.value) == f"[Errno 28] No space left on device: '{tmp_path / 'model'}'"
    assert list(tmp_path.iterdir()) == []


def test_resize_on_a_full_disk_says_which_file(tmp_path, full_disk, capsys):
    models = build_tiny_models()
    network = create_network(models.unet, models.text_encoder, rank=4)
    with torch.no_grad():
        for layer in network.layers().values():
            layer.lora_up.weight.normal_(0, 0.1)
    source = tmp_path / "lora.safetensors"
    network.save_weights(str(source), dtype=torch.float32)
    output = tmp_path / "small.safetensors"
    full_disk()
    assert main(["resize", str(source), str(output), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert f"error: [Errno 28] No space left on device: '{output}'" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
