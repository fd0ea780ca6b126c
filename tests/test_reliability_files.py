"""Reliability of what the library writes and reads back: file modes, the latent cache, loader details."""

import os
import stat

import pytest
import torch

from lora_diffusion.io import atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_and_folders_honour_the_umask(tmp_path, umask_022):
    from lora_diffusion import create_network
    from lora_diffusion.tools.excise import excise_captions
    from conftest import build_tiny_unet

    assert mode(atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))) == 0o644
    assert mode(atomic_write(tmp_path / "a.txt", lambda f: f.write("x"), mode="w")) == 0o644
    network = create_network(build_tiny_unet(), None, rank=2)
    network.save_weights(tmp_path / "lora.safetensors")
    assert mode(tmp_path / "lora.safetensors") == 0o644
    os.umask(0o027)  # a stricter umask is honoured too
    assert mode(atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"))) == 0o640
    os.umask(0o022)

    (tmp_path / "data" / "1_x").mkdir(parents=True)
    (tmp_path / "data" / "1_x" / "a.txt").write_text("a woman")
    excise_captions(tmp_path / "data", tmp_path / "out", ["woman"])
    assert mode(tmp_path / "out") == 0o755  # the staging folder of the tools is made with mkdtemp's 0o700
    assert mode(tmp_path / "out" / "1_x") == 0o755 and mode(tmp_path / "out" / "1_x" / "a.txt") == 0o644
