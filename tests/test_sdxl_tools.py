"""The model tools on SDXL (builtin:tiny-xl): convert, merge into a model, merge and resize LoRA files, extract,
inspect. Each result is checked against an independent computation: Stability's key layout written by
test_sdxl.py's own writer, diffusers' from_single_file and StableDiffusionXLPipeline.load_lora_weights, updates
W + ratio * alpha / rank * up @ down computed here from the file tensors, and torch.linalg.svd."""

import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from lora_diffusion import create_network, load_network
from lora_diffusion.cli import main
from lora_diffusion.core.kohya import read_lora_file
from lora_diffusion.models import ASSETS, build_tiny_models, load_models, save_tiny_diffusers_folder
from lora_diffusion.models.sdxl import build_tiny_xl_models, save_tiny_xl_diffusers_folder, sdxl_pipeline
from lora_diffusion.tools.extract import extract_lora
from lora_diffusion.tools.inspect import inspect_lora
from lora_diffusion.tools.merge import merge_into_model, merge_loras
from lora_diffusion.tools.model_convert import convert_model
from lora_diffusion.tools.model_files import ModelToolError
from lora_diffusion.tools.resize import resize_lora
from test_model_tools import module_delta_from_file, random_lora
from test_models import assert_same_weights
from test_sdxl import assert_outputs_close, kohya_sdxl_names, outputs, randomize_network, sgm_checkpoint

TINY_XL = ASSETS / "tiny-xl"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """builtin:tiny-xl as a diffusers folder and as a single file in Stability's layout (written by our convert)."""
    root = tmp_path_factory.mktemp("xl")
    folder = save_tiny_xl_diffusers_folder(root / "folder")
    return folder, convert_model(folder, root / "xl.safetensors")


def sdxl_lora(path, seed, rank=4, alpha=2.0, conv_rank=None):
    """An SDXL LoRA over the U-Net and both text encoders, every factor random, saved in fp32."""
    models = build_tiny_xl_models()
    network = create_network(models.unet, models.text_encoders, rank=rank, alpha=alpha, conv_rank=conv_rank,
                             conv_alpha=1.0 if conv_rank else None)
    randomize_network(network, seed)
    network.save_weights(path, dtype=torch.float32)
    return path


def modules_by_kohya_name(models):
    """{kohya name: module} by kohya's SDXL naming rules (test_sdxl.py), with LoCon's convs."""
    return kohya_sdxl_names(models.unet, models.text_encoder, models.text_encoder_2, conv=True)


# --- convert ------------------------------------------------------------------------------------------------------


def test_convert_writes_stabilitys_layout_and_reads_it_back(xl, tmp_path):
    folder, single = xl
    source = build_tiny_xl_models()
    theirs = sgm_checkpoint(source.text_encoder, source.text_encoder_2, source.vae, source.unet)
    ours = load_file(str(single))
    extras = {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
              "conditioner.embedders.1.model.logit_scale", "model_ema.decay"}
    assert set(ours) - extras == set(theirs) - extras
    for key, value in ours.items():
        if key not in extras:
            assert torch.equal(value, theirs[key].reshape(value.shape)) and value.shape == theirs[key].shape, key
    back = load_models(convert_model(single, tmp_path / "back", config_dir=TINY_XL))
    assert back.sdxl and back.tokenizer_2.pad_token == "!"
    for part in PARTS:
        assert_same_weights(getattr(back, part), getattr(source, part))
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    # not text_encoder_2: diffusers (0.42) tells SDXL's encoders apart by width, equal (32) in tiny-xl, and reads
    # ViT-L's keys for both; the comparison with Stability's layout above covers it
    for part in PARTS[:3]:
        assert_same_weights(getattr(pipe, part), getattr(source, part))


# --- merge into a model -------------------------------------------------------------------------------------------


def expected_merge(lora, ratio):
    """tiny-xl with ratio * alpha / rank * up @ down added to each module's weight, by kohya's names."""
    models = build_tiny_xl_models()
    modules = modules_by_kohya_name(models)
    with torch.no_grad():
        for name, delta in module_delta_from_file(lora).items():
            weight = modules[name].weight
            weight += ratio * delta.reshape(weight.shape)
    return models


@pytest.mark.parametrize("into", ["folder", "single file"])
def test_merge_into_an_sdxl_model_adds_the_update_by_hand(xl, tmp_path, into):
    folder, single = xl
    lora = sdxl_lora(tmp_path / "xl.safetensors", seed=1, conv_rank=2)
    out = tmp_path / ("merged" if into == "folder" else "merged.safetensors")
    merged = merge_into_model(folder if into == "folder" else single, [f"{lora}:0.7"], out, config_dir=TINY_XL)
    assert len(merged) == len(read_lora_file(lora)[0])
    ours = load_models(out, config_dir=TINY_XL)
    expected = expected_merge(lora, 0.7)
    for part in PARTS:
        a, b = getattr(ours, part).state_dict(), getattr(expected, part).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6, msg=f"{part}.{key}")
    pipe = sdxl_pipeline(build_tiny_xl_models())  # diffusers' own loader and fuse: the same outputs
    pipe.load_lora_weights(str(tmp_path), weight_name="xl.safetensors")
    pipe.fuse_lora(lora_scale=0.7)
    assert_outputs_close(outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2),
                         outputs(ours.unet, ours.text_encoder, ours.text_encoder_2))


def test_merge_reads_the_unet_by_diffusers_paths_and_refuses_other_families(xl, tmp_path):
    folder, _ = xl
    lora = sdxl_lora(tmp_path / "xl.safetensors", seed=2)
    models = build_tiny_xl_models()
    paths = {id(m): p for p, m in models.unet.named_modules()}
    renamed = {}
    for name, module in modules_by_kohya_name(models).items():  # the U-Net named as some exporters do
        other = "lora_unet_" + paths[id(module)].replace(".", "_") if name.startswith("lora_unet_") else name
        renamed.update({k.replace(name + ".", other + "."): v for k, v in load_file(str(lora)).items()
                        if k.startswith(name + ".")})
    save_file(renamed, str(tmp_path / "paths.safetensors"))
    merge_into_model(folder, [str(lora)], tmp_path / "a")
    merge_into_model(folder, [str(tmp_path / "paths.safetensors")], tmp_path / "b")
    for part in PARTS:
        a, b = (load_file(str(tmp_path / x / part / f"{'model' if 'text' in part else 'diffusion_pytorch_model'}"
                                                       ".safetensors")) for x in "ab")
        assert all(torch.equal(a[k], b[k]) for k in a)
    sd1_lora = random_lora(build_tiny_models(), tmp_path / "sd1.safetensors", seed=3)
    with pytest.raises(ModelToolError, match=r"match no weight of .*SDXL diffusers folder"):
        merge_into_model(folder, [str(sd1_lora)], tmp_path / "c")
    assert not (tmp_path / "c").exists()


# --- LoRA files: merge, resize ------------------------------------------------------------------------------------


def test_merge_and_resize_sdxl_lora_files_keep_kohyas_names(tmp_path):
    a = sdxl_lora(tmp_path / "a.safetensors", seed=4, conv_rank=2)
    b = sdxl_lora(tmp_path / "b.safetensors", seed=5, rank=3, alpha=3.0)
    names = set(read_lora_file(a)[0])
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    merge_loras([f"{a}:0.5", f"{b}:2"], tmp_path / "ab.safetensors", dtype=torch.float32)
    da, db, dab = (module_delta_from_file(p) for p in (a, b, tmp_path / "ab.safetensors"))
    assert set(dab) == names
    for name in dab:
        torch.testing.assert_close(dab[name], 0.5 * da[name] + 2 * db.get(name, 0), rtol=1e-5, atol=1e-6)
    _, metadata = read_lora_file(tmp_path / "ab.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"

    report = resize_lora(tmp_path / "ab.safetensors", tmp_path / "r2.safetensors", rank=2, dtype=torch.float32)
    low = module_delta_from_file(tmp_path / "r2.safetensors")
    assert set(low) == names and all(new == 2 for _, new, _ in report.values())
    for name, delta in low.items():
        u, s, vh = torch.linalg.svd(dab[name].double())
        torch.testing.assert_close(delta.double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
    assert read_lora_file(tmp_path / "r2.safetensors")[1]["ss_base_model_version"] == "sdxl_base_v1-0"
    models = build_tiny_xl_models()
    assert len(load_network(tmp_path / "r2.safetensors", models.unet, models.text_encoders).layers()) == len(names)

    sd1 = random_lora(build_tiny_models(), tmp_path / "sd1.safetensors", seed=6)
    with pytest.raises(ModelToolError, match="is an SDXL LoRA but .*sd1.safetensors is not"):
        merge_loras([str(a), str(sd1)], tmp_path / "mixed.safetensors")


# --- extract ------------------------------------------------------------------------------------------------------


def test_extract_recovers_a_low_rank_fine_tune_of_the_unet_and_both_encoders(xl, tmp_path):
    folder, _ = xl
    tuned = build_tiny_xl_models()
    g = torch.Generator().manual_seed(7)
    weights = [tuned.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k").weight,
               tuned.unet.get_submodule("up_blocks.0.resnets.1.conv1").weight]
    for encoder in (tuned.text_encoder, tuned.text_encoder_2):  # out_proj: diffusers needs one to tell the format
        layer = dict(encoder.named_modules())
        weights += [m.weight for p, m in layer.items() if p.endswith("layers.1.self_attn.out_proj")
                    or p.endswith("layers.0.mlp.fc1")]
    with torch.no_grad():
        for weight in weights:
            up = torch.randn(weight.shape[0], 2, generator=g) * 0.1
            weight += (up @ torch.randn(2, weight[0].numel(), generator=g) * 0.1).reshape(weight.shape)
    tuned_dir = tmp_path / "tuned"
    shutil.copytree(folder, tuned_dir)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        getattr(tuned, part).save_pretrained(tuned_dir / part)
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(folder, tuned_dir, out, rank=4, conv_rank=4, dtype=torch.float32)
    assert len(report) == 6 and all(error < 1e-5 for _, error in report.values())
    assert {n.split("_")[1] for n in report} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in report  # kohya's SGM name
    assert read_lora_file(out)[1]["ss_base_model_version"] == "sdxl_base_v1-0"

    pipe = sdxl_pipeline(build_tiny_xl_models())
    pipe.load_lora_weights(str(tmp_path), weight_name="extracted.safetensors")
    assert_outputs_close(outputs(tuned.unet, tuned.text_encoder, tuned.text_encoder_2),
                         outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
    sd1 = save_tiny_diffusers_folder(tmp_path / "sd1")
    with pytest.raises(ModelToolError, match=r"architecture of .*SD1.x diffusers folder"):
        extract_lora(sd1, folder, tmp_path / "x.safetensors", rank=4)


# --- inspect ------------------------------------------------------------------------------------------------------


def test_inspect_names_sdxl_blocks_and_both_encoders(tmp_path, capsys):
    lora = sdxl_lora(tmp_path / "xl.safetensors", seed=8)
    info = inspect_lora(lora)
    deltas = module_delta_from_file(lora)
    expected = sum(d.norm() ** 2 for n, d in deltas.items() if n.startswith("lora_unet_input_blocks_4_")) ** 0.5
    assert info["blocks"]["unet input_blocks.4"] == pytest.approx(float(expected), rel=1e-3)
    expected = sum(d.norm() ** 2 for n, d in deltas.items() if n.startswith("lora_te2_text_model_encoder_layers_1_"))
    assert info["blocks"]["text_encoder_2 layer  1"] == pytest.approx(float(expected) ** 0.5, rel=1e-3)
    assert "text_encoder layer  1" in info["blocks"] and "unet middle_block" in info["blocks"]
    assert "SDXL" in info["loaders"]["note"]
    assert main(["inspect", str(lora)]) == 0
    assert "text_encoder_2 layer" in capsys.readouterr().out
