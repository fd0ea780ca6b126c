"""Reliability of what the library writes and reads back: file modes, the latent cache, loader details."""

import os
import stat

import pytest

from lora_diffusion.formats.io import atomic_write


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_and_folders_honour_the_umask(tmp_path, umask_022):
    from conftest import build_tiny_unet
    from lora_diffusion import create_network
    from lora_diffusion.tools.excise import excise_captions

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


def test_one_folder_replacer_keeps_a_complete_version_and_ordinary_modes(tmp_path, umask_022):
    from lora_diffusion.formats.io import build_folder_atomically, new_staging_folder, old_folder_names, replace_folder
    from lora_diffusion.models import save_tiny_diffusers_folder

    target = tmp_path / "out"
    build_folder_atomically(target, lambda d: (d / "a.txt").write_text("first"))
    assert (target / "a.txt").read_text() == "first"
    if os.name == "posix":
        assert mode(target) == 0o755

    def failing(d):
        (d / "a.txt").write_text("half")
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        build_folder_atomically(target, failing)
    assert (target / "a.txt").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out"]

    build_folder_atomically(target, lambda d: (d / "b.txt").write_text("second"))
    assert [p.name for p in target.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]

    # the fixed name of a state folder (other processes write into it); a leftover there is replaced
    leftover = tmp_path / "state.tmp"
    leftover.mkdir()
    (leftover / "junk").write_text("x")
    staging = new_staging_folder(tmp_path / "state", fixed_name=True)
    assert staging == leftover and list(staging.iterdir()) == []
    replace_folder(staging, tmp_path / "state")
    assert (tmp_path / "state").is_dir() and old_folder_names(tmp_path / "state") == []

    tiny = save_tiny_diffusers_folder(tmp_path / "tiny")
    if os.name == "posix":  # save_tiny_diffusers_folder's staging folder was mkdtemp's 0o700
        assert mode(tiny) == 0o755
