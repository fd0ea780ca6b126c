"""base_checkpoint's own safetensors reader on hand-built bad files: every file safetensors' own reader refuses is
refused here too, with a message naming the file and the tensor, and through the model loader and the convert
tool, never converted without a word."""

import json
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_diffusion.cli import main
from lora_diffusion.models import load_models
from lora_diffusion.models.checkpoint import ModelLoadError, SafetensorsFile


def raw_file(path, header, data, header_size=None):
    """A .safetensors file byte by byte: 8-byte little-endian header length, the JSON header, the data."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if header_size is None else header_size) + encoded + data)
    return path


def entry(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


GOOD = {"conv_in.weight": entry([2, 2], 0, 16), "conv_out.weight": entry([2, 2], 16, 32)}
DATA = struct.pack("<8f", *range(8))
BAD = {  # name: (header, data, header_size, words the message must hold)
    "overlap": ({**GOOD, "conv_in.weight": entry([2, 2], 16, 32), "extra": entry([4], 0, 16)}, DATA, None,
                ["overlaps"]),
    "same bytes": ({"conv_in.weight": entry([2, 2], 16, 32), "conv_out.weight": entry([2, 2], 16, 32)},
                   DATA[16:] * 2, None, ["conv_in.weight", "overlaps", "conv_out.weight"]),
    "gap": ({"conv_in.weight": entry([2, 2], 0, 16), "conv_out.weight": entry([2, 2], 20, 36)}, DATA + b"\0" * 4,
            None, ["conv_out.weight", "belong to no tensor"]),
    "past the end": (GOOD, DATA[:24], None, ["conv_out.weight", "truncated"]),
    "trailing bytes": (GOOD, DATA + b"\0" * 8, None, ["trailing bytes"]),
    "size not shape": ({**GOOD, "conv_out.weight": entry([2, 3], 16, 32)}, DATA, None,
                       ["conv_out.weight", "24 bytes"]),
    "reversed offsets": ({**GOOD, "conv_out.weight": entry([0], 32, 16)}, DATA[:16], None,
                         ["conv_out.weight", "data_offsets"]),
    "unknown dtype": ({**GOOD, "conv_out.weight": entry([2, 2], 16, 32, dtype="F99")}, DATA, None,
                      ["conv_out.weight", "F99"]),
    "negative dimension": ({**GOOD, "conv_out.weight": entry([-2, -2], 16, 32)}, DATA, None,
                           ["conv_out.weight", "shape"]),
    "huge header length": (GOOD, DATA, 2 ** 40, ["header size"]),
    "header past the end": (GOOD, DATA, 10_000, ["header size"]),
}


def test_a_good_hand_built_file_reads_as_safetensors_reads_it(tmp_path):
    path = raw_file(tmp_path / "good.safetensors", GOOD, DATA)
    ours, theirs = SafetensorsFile(path), load_file(str(path))
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    assert ours["conv_out.weight"].flatten().tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_refused_as_safetensors_refuses_them(tmp_path, case):
    header, data, header_size, words = BAD[case]
    path = raw_file(tmp_path / "bad.safetensors", header, data, header_size)
    with pytest.raises((SafetensorError, ValueError, OSError)):
        load_file(str(path))  # the library itself refuses it: the reference for "as strictly as safetensors"
    with pytest.raises(ModelLoadError) as error:
        SafetensorsFile(path)
    message = str(error.value)
    assert str(path) in message and all(w in message for w in words), message


def test_header_that_is_not_json_or_has_bad_metadata(tmp_path):
    path = tmp_path / "text.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"\xff\xfe{[}" + DATA)
    with pytest.raises(ModelLoadError, match="header is not JSON"):
        SafetensorsFile(path)
    raw_file(path, {**GOOD, "__metadata__": {"format": 1}}, DATA)
    with pytest.raises(ModelLoadError, match="__metadata__"):
        SafetensorsFile(path)


def original_checkpoint_with_overlap(tmp_path):
    """The tiny model as an original-layout single file whose U-Net conv_in ([32, 4, 3, 3]) points at the bytes of
    its conv_out ([4, 32, 3, 3]: the same size, so only the overlap gives it away); everything else valid."""
    from test_models import original_checkpoint

    models = load_models("builtin:tiny")
    tensors = original_checkpoint(models.text_encoder, models.vae, models.unet)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + size])
    conv_in, conv_out = "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"
    header[conv_in]["data_offsets"] = list(header[conv_out]["data_offsets"])
    raw_file(path, header, path.read_bytes()[8 + size:])  # offsets count from the data's start: still valid
    return path


def test_an_overlapping_base_model_is_neither_loaded_nor_converted(tmp_path, capsys):
    path = original_checkpoint_with_overlap(tmp_path)
    with pytest.raises((SafetensorError, ValueError)):
        load_file(str(path))
    with pytest.raises(ModelLoadError, match="overlaps") as error:
        load_models(path)
    assert str(path) in str(error.value) and "input_blocks.0.0.weight" in str(error.value)
    assert main(["convert", str(path), str(tmp_path / "folder")]) == 2
    err = capsys.readouterr().err
    assert "overlaps" in err and str(path) in err and not (tmp_path / "folder").exists()
