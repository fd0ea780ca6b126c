"""core/deltas.py: the LoRA file math below the tools and the concepts library; one LoRA + LoRA merge
(merge_lora_files) that tools.merge.merge_loras and concepts.baselines.merge_concept_files share, with its checks."""

import ast
from pathlib import Path

import pytest
import torch

from lora_diffusion.concepts.baselines import merge_concept_files
from lora_diffusion.core import deltas
from lora_diffusion.core.kohya import read_lora_file, write_lora_file
from lora_diffusion.tools import fuse, merge, model_files
from lora_diffusion.tools.merge import merge_loras

PACKAGE = Path(__file__).resolve().parents[1] / "lora_diffusion"
MOVED = ("SGM_UNET_NAME", "ModelToolError", "bundled_embedding_tensors", "canonical_modules", "check_module_fits",
         "factored_svd", "fit", "is_sdxl_lora", "lora_file_tensors", "lowrank_factors", "module_bias_delta",
         "module_delta", "on_meta", "read_loras")


def lora_file(path, modules, seed=0):
    """A plain LoRA file: {module name: (out, in, rank)}."""
    torch.manual_seed(seed)
    tensors = {}
    for name, (out, inp, rank) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    write_lora_file(str(path), tensors, {"ss_network_module": "networks.lora"})
    return str(path)


def test_the_moved_names_are_the_same_objects_in_model_files():
    for name in MOVED:
        assert getattr(model_files, name) is getattr(deltas, name), name
    assert merge.only_plain_lora is deltas.only_plain_lora


@pytest.mark.parametrize("floor", ["core", "concepts"])
def test_core_and_concepts_import_no_tool(floor):
    for path in (PACKAGE / floor).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith("lora_diffusion.tools") for n in names), path


def test_a_merge_of_two_files_adds_their_updates(tmp_path):
    a = lora_file(tmp_path / "a.safetensors", {"lora_unet_m": (6, 10, 2), "lora_te_t": (4, 4, 1)}, seed=1)
    b = lora_file(tmp_path / "b.safetensors", {"lora_unet_m": (6, 10, 3)}, seed=2)
    report = merge_loras([a, f"{b}:0.5"], tmp_path / "ab.safetensors", dtype=torch.float32)
    assert report["lora_unet_m"] == (5, 1.0) and len(report) == 2
    (ma, _), (mb, _) = read_lora_file(a), read_lora_file(b)
    merged, metadata = read_lora_file(str(tmp_path / "ab.safetensors"))
    torch.testing.assert_close(deltas.module_delta(merged["lora_unet_m"]),
                               deltas.module_delta(ma["lora_unet_m"]) + 0.5 * deltas.module_delta(mb["lora_unet_m"]))
    assert metadata["ss_training_comment"] == f"merged by lora-diffusion from {a}:1, {b}:0.5"
    assert metadata["ss_network_module"] == "networks.lora"  # the first file's metadata is kept


def test_the_baseline_merge_has_the_merge_checks_now(tmp_path):
    sd = lora_file(tmp_path / "sd.safetensors", {"lora_unet_m": (6, 10, 2)})
    xl = lora_file(tmp_path / "xl.safetensors", {"lora_unet_m": (6, 10, 2), "lora_te2_t": (4, 4, 1)})
    wide = lora_file(tmp_path / "wide.safetensors", {"lora_unet_m": (6, 12, 2)})
    for merge_files in (lambda files, out: merge_concept_files(files, out, rank=2),
                        lambda files, out: merge_loras(files, out)):
        with pytest.raises(deltas.ModelToolError, match="is an SDXL LoRA but .*sd.safetensors is not"):
            merge_files([sd, xl], tmp_path / "out.safetensors")
        with pytest.raises(deltas.ModelToolError, match=r"wide.safetensors: module lora_unet_m has shape \(6, 12\)"):
            merge_files([sd, wide], tmp_path / "out.safetensors")
        with pytest.raises(deltas.ModelToolError, match="is the input"):
            merge_files([sd, wide], sd)
    with pytest.raises(deltas.ModelToolError, match=r"1 weight\(s\) for 2 LoRA file\(s\)"):
        merge_concept_files([sd, sd], tmp_path / "out.safetensors", weights=[1.0])


def test_the_baseline_records_its_rank_and_method(tmp_path):
    a = lora_file(tmp_path / "a.safetensors", {"lora_unet_m": (6, 10, 2)}, seed=1)
    b = lora_file(tmp_path / "b.safetensors", {"lora_unet_m": (6, 10, 2)}, seed=2)
    report = merge_concept_files([a, b], tmp_path / "t.safetensors", rank=3, method="dare_linear", density=1.0,
                                 dtype=torch.float32)
    assert 0.9 < report["lora_unet_m"] < 1  # the sum has rank 4; its first 3 singular values keep most of it
    merged, metadata = read_lora_file(str(tmp_path / "t.safetensors"))
    assert metadata["ss_network_dim"] == "3" and metadata["ss_training_comment"].startswith("dare_linear (density 1)")
    (ma, _), (mb, _) = read_lora_file(a), read_lora_file(b)
    expected = deltas.module_delta(ma["lora_unet_m"]) + deltas.module_delta(mb["lora_unet_m"])
    assert merged["lora_unet_m"].rank == 3
    assert (deltas.module_delta(merged["lora_unet_m"]) - expected).norm() < 0.5 * expected.norm()


def test_check_lora_output(tmp_path):
    source = lora_file(tmp_path / "a.safetensors", {"lora_unet_m": (2, 2, 1)})
    with pytest.raises(deltas.ModelToolError, match="is a folder"):
        deltas.check_lora_output(tmp_path, [source])
    with pytest.raises(deltas.ModelToolError, match="is the input"):
        deltas.check_lora_output(source, [source], overwrite=True)
    with pytest.raises(deltas.ModelToolError, match="exists; choose a new path or pass --overwrite"):
        deltas.check_lora_output(source, [])
    assert deltas.check_lora_output(tmp_path / "new.safetensors", [source]) == tmp_path / "new.safetensors"


def test_fuse_reads_a_shipped_base_rather_than_writing_one(tmp_path):
    from lora_diffusion.models import MINI_FOLDER
    assert fuse.shipped_folder(str(tmp_path)) == tmp_path
    assert fuse.shipped_folder("builtin:tiny") is None  # built in memory: fuse writes it out
    shipped = (MINI_FOLDER / "model_index.json").is_file()
    assert fuse.shipped_folder("builtin:mini") == (MINI_FOLDER if shipped else None)
