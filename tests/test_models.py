"""Loading models offline: builtin:tiny, diffusers folders, single-file SD1.x/SD2.x checkpoints, the tokenizer.

Single-file checkpoints are written here in the original (CompVis/Stability) key layout from diffusers modules,
with an inverse key mapping written from the naming rules in this file, and must load back to the same weights.
"""

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lora_diffusion.models import (
    ASSETS,
    ModelLoadError,
    build_tiny_models,
    load_models,
    save_tiny_diffusers_folder,
)
from lora_diffusion.models.tokenizer import load_clip_tokenizer

TINY = ASSETS / "tiny-sd"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- independent helpers -------------------------------------------------------------------------------------


def randomize(module, seed):
    """Every parameter random (norm scales and biases too), so a swapped or dropped key cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.2, generator=generator)
    return module.eval()


def source_modules(config_dir, seed=0):
    config_dir = Path(config_dir)
    te_config = CLIPTextConfig.from_pretrained(str(config_dir / "text_encoder"))
    text_encoder = randomize(CLIPTextModel(te_config), seed)
    vae = randomize(AutoencoderKL.from_config(json.loads((config_dir / "vae" / "config.json").read_text())), seed + 1)
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    unet = randomize(UNet2DConditionModel.from_config(unet_config), seed + 2)
    return text_encoder, vae, unet


def flat_clip_key(key):
    """transformers 4.x nests CLIPTextModel under `text_model.`; 5.x does not. Compare without it."""
    return key.removeprefix("text_model.")


def unet_to_original(key, up_block_has_attention, per_level=3):
    rules = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
             ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]

    def resnet(rest):
        head, leaf = rest.rsplit(".", 1)
        return dict(rules)[head] + "." + leaf

    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, leaf = key.rsplit(".", 1)
    if head in simple:
        return f"{simple[head]}.{leaf}"
    parts = key.split(".")
    if parts[0] == "down_blocks":
        level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + level * per_level + index}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + level * per_level + index}.1.{rest}"
        return f"input_blocks.{1 + level * per_level + 2}.0.op.{rest.removeprefix('conv.')}"
    if parts[0] == "mid_block":
        slot = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[1]}.{parts[2]}"]
        rest = ".".join(parts[3:])
        return f"middle_block.{slot}.{rest if slot == 1 else resnet(rest)}"
    level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "resnets":
        return f"output_blocks.{level * per_level + index}.0.{resnet(rest)}"
    if kind == "attentions":
        return f"output_blocks.{level * per_level + index}.1.{rest}"
    slot = 2 if up_block_has_attention[level] else 1
    return f"output_blocks.{level * per_level + 2}.{slot}.{rest}"


def vae_to_original(key, num_levels=4):
    key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    key = re.sub(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)",
                 lambda m: "mid.attn_1." + attention[m[1]], key)
    key = re.sub(r"encoder\.down_blocks\.(\d)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    key = re.sub(r"decoder\.up_blocks\.(\d)\.resnets", lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.block", key)
    return re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0",
                  lambda m: f"decoder.up.{num_levels - 1 - int(m[1])}.upsample", key)


def original_checkpoint(text_encoder, vae, unet, open_clip=False):
    """The state dict a CompVis/Stability training run would have written for these modules."""
    ckpt = {}
    has_attention = ["Attn" in t for t in unet.config.up_block_types]
    for key, value in unet.state_dict().items():
        ckpt["model.diffusion_model." + unet_to_original(key, has_attention)] = value.clone()
    for key, value in vae.state_dict().items():
        original = vae_to_original(key)
        if ".mid.attn_1." in original and original.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        ckpt["first_stage_model." + original] = value.clone()
    te = {flat_clip_key(k): v for k, v in text_encoder.state_dict().items()}
    if not open_clip:
        for key, value in te.items():
            ckpt["cond_stage_model.transformer.text_model." + key] = value.clone()
        ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        ckpt.update(open_clip_checkpoint(te, text_encoder.config))
    ckpt["model_ema.decay"] = torch.tensor(0.9999)  # present in real files, not part of any module
    ckpt["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    return ckpt


def open_clip_checkpoint(te, config):
    prefix = "cond_stage_model.model."
    out = {
        prefix + "token_embedding.weight": te["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": te["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": te["final_layer_norm.weight"],
        prefix + "ln_final.bias": te["final_layer_norm.bias"],
        prefix + "text_projection": torch.randn(config.hidden_size, config.hidden_size),
        prefix + "logit_scale": torch.tensor(4.6),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(config.num_hidden_layers + 1):  # SD2 skips open_clip's last block: it is in the file only
        block = f"{prefix}transformer.resblocks.{i}."
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                source = te.get(f"encoder.layers.{i}.{ours}.{leaf}")
                if source is None:
                    source = torch.randn_like(te[f"encoder.layers.0.{ours}.{leaf}"])
                out[f"{block}{theirs}.{leaf}"] = source.clone()
        for leaf in ("weight", "bias"):
            qkv = [te.get(f"encoder.layers.{i}.self_attn.{p}_proj.{leaf}") for p in "qkv"]
            if qkv[0] is None:
                qkv = [torch.randn_like(te[f"encoder.layers.0.self_attn.q_proj.{leaf}"]) for _ in range(3)]
            out[f"{block}attn.in_proj_{leaf}"] = torch.cat(qkv, 0)
    return out


def write_checkpoint(ckpt, path, wrap=False):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in ckpt.items()}, str(path))
    else:
        torch.save({"state_dict": ckpt, "global_step": 1234} if wrap else ckpt, str(path))
    return path


def assert_same_weights(loaded, source, dtype=torch.float32):
    a = {flat_clip_key(k): v for k, v in loaded.state_dict().items()}
    b = {flat_clip_key(k): v for k, v in source.state_dict().items()}
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].dtype == (dtype if b[key].is_floating_point() else b[key].dtype), key
        assert torch.equal(a[key], b[key].to(a[key].dtype)), key


def assert_same_outputs(models, text_encoder, vae, unet):
    """Weights are compared exactly elsewhere; outputs may differ in the last bits (kernel choice), hence the
    small tolerance."""
    torch.manual_seed(0)
    ids = torch.randint(0, 49408, (1, 77))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state
        torch.testing.assert_close(models.text_encoder(ids).last_hidden_state, hidden, rtol=1e-4, atol=1e-5)
        latents = vae.encode(image).latent_dist.mean
        torch.testing.assert_close(models.vae.encode(image).latent_dist.mean, latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(models.vae.decode(latents).sample, vae.decode(latents).sample, rtol=1e-4, atol=1e-5)
        t = torch.tensor([500])
        torch.testing.assert_close(models.unet(latents, t, hidden).sample, unet(latents, t, hidden).sample,
                                   rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """Tiny SD1.x diffusers modules and their original-layout checkpoint as .safetensors (built once)."""
    text_encoder, vae, unet = source_modules(TINY, seed=11)
    ckpt = original_checkpoint(text_encoder, vae, unet)
    path = write_checkpoint(ckpt, tmp_path_factory.mktemp("sd1") / "sd1.safetensors")
    return text_encoder, vae, unet, ckpt, path


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_known_ids():
    tokenizer = load_clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A Photo of a CAT", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and ids[7:] == [49407] * 70  # SD1 pads with EOS


def test_tokenizer_v2_pads_with_exclamation_mark():
    tokenizer = load_clip_tokenizer(v2=True)
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token == "!" and ids[7:] == [0] * 70


@pytest.mark.parametrize("v2", [False, True])
def test_saved_tokenizer_folder_loads_in_transformers_4_and_5(tmp_path, v2):
    """transformers 4.x's CLIPTokenizer reads only the files it names (vocab.json, merges.txt); 5.x's
    save_pretrained writes tokenizer.json alone. Our folders carry the former, and they give the same ids."""
    from transformers import CLIPTokenizer

    from lora_diffusion.models.tokenizer import save_tokenizer

    folder = save_tokenizer(load_clip_tokenizer(v2=v2), tmp_path / "tokenizer")
    assert {"vocab.json", "merges.txt"} <= {f.name for f in folder.iterdir()}
    assert not (folder / "tokenizer.json").exists()
    loaded = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = loaded("A Photo of a CAT", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[7:] == ([0] if v2 else [49407]) * 70
    assert loaded.model_max_length == 77 and len(loaded) == 49408


# --- builtin:tiny ----------------------------------------------------------------------------------------------


def test_builtin_tiny_is_deterministic_and_works():
    first, second = load_models("builtin:tiny"), build_tiny_models(seed=0)
    for part in ("text_encoder", "vae", "unet"):
        assert_same_weights(getattr(first, part), getattr(second, part))
    other = build_tiny_models(seed=1)
    assert not torch.equal(other.unet.conv_in.weight, first.unet.conv_in.weight)
    assert first.name == "builtin:tiny" and not first.v2 and not first.v_parameterization
    scheduler = first.noise_scheduler
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.prediction_type == "epsilon"
    assert scheduler.config.num_train_timesteps == 1000
    expected_betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2  # scaled_linear
    torch.testing.assert_close(scheduler.betas, expected_betas)

    image = torch.rand(1, 3, 96, 64) * 2 - 1
    with torch.no_grad():
        latents = first.vae.encode(image).latent_dist.mean
        decoded = first.vae.decode(latents).sample
        ids = first.tokenizer("sks dog", padding="max_length", return_tensors="pt").input_ids
        hidden = first.text_encoder(ids).last_hidden_state
        noise_pred = first.unet(latents * 0.18215, torch.tensor([10]), hidden).sample
    assert latents.shape == (1, 4, 12, 8) and decoded.shape == image.shape
    assert hidden.shape == (1, 77, 32) and noise_pred.shape == latents.shape
    assert all(torch.isfinite(x).all() for x in (latents, decoded, hidden, noise_pred))


def test_builtin_tiny_v_parameterization_and_dtype():
    models = load_models("builtin:tiny", v_parameterization=True, dtype=torch.bfloat16)
    assert models.v_parameterization and models.noise_scheduler.config.prediction_type == "v_prediction"
    for part in (models.text_encoder, models.vae, models.unet):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}


# --- shipped configs -------------------------------------------------------------------------------------------


def test_shipped_v1_configs_have_sd15_sizes():
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((ASSETS / "v1/unet/config.json").read_text()))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(str(ASSETS / "v1/text_encoder")))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert unet.device.type == "meta"


# --- diffusers folder ------------------------------------------------------------------------------------------


def test_diffusers_folder_roundtrip(tmp_path, no_network):
    folder = save_tiny_diffusers_folder(tmp_path / "tiny", seed=5)
    assert (folder / "model_index.json").is_file()
    source = build_tiny_models(seed=5)
    models = load_models(folder)
    for part in ("text_encoder", "vae", "unet"):
        assert_same_weights(getattr(models, part), getattr(source, part))
    assert_same_outputs(models, source.text_encoder, source.vae, source.unet)
    assert models.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not models.v2 and not models.v_parameterization

    shutil.rmtree(folder / "tokenizer")  # falls back to the shipped tokenizer
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(scheduler_file.read_text().replace('"epsilon"', '"v_prediction"'))
    models = load_models(folder, dtype=torch.bfloat16)
    assert models.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert models.v_parameterization and models.noise_scheduler.config.prediction_type == "v_prediction"
    assert {p.dtype for p in models.unet.parameters()} == {torch.bfloat16}
    assert not load_models(folder, v_parameterization=False).v_parameterization


def test_diffusers_folder_with_fp16_variant_only(tmp_path):
    folder = save_tiny_diffusers_folder(tmp_path / "tiny", seed=6)
    source = build_tiny_models(seed=6)
    for part in ("unet", "vae", "text_encoder"):
        for weights in (folder / part).glob("*.safetensors"):
            name, suffix = weights.name.split(".", 1)
            weights.rename(weights.with_name(f"{name}.fp16.{suffix}"))
    models = load_models(folder, dtype=torch.float16)
    assert_same_weights(models.unet, source.unet, dtype=torch.float16)


# --- single-file SD1.x -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename,wrap", [("sd1.safetensors", False), ("sd1.ckpt", True), ("sd1.pt", False)])
def test_single_file_sd1(sd1, tmp_path, filename, wrap, no_network):
    text_encoder, vae, unet, ckpt, path = sd1
    if not filename.endswith(".safetensors"):
        path = write_checkpoint(ckpt, tmp_path / filename, wrap=wrap)
    models = load_models(path, config_dir=TINY)
    assert_same_weights(models.text_encoder, text_encoder)
    assert_same_weights(models.vae, vae)
    assert_same_weights(models.unet, unet)
    if filename.endswith(".safetensors"):  # equal weights imply equal outputs; checked once
        assert_same_outputs(models, text_encoder, vae, unet)
    assert not models.v2 and not models.v_parameterization and models.name == str(path)
    assert models.tokenizer.pad_token == "<|endoftext|>"
    assert models.noise_scheduler.config.prediction_type == "epsilon"


def test_single_file_matches_diffusers_own_converter(sd1):
    """diffusers' converter (a second, independent implementation) maps the same file to the same tensors."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    _, vae, unet, ckpt, path = sd1
    models = load_models(path, config_dir=TINY)
    theirs_unet = single_file_utils.convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    theirs_vae = single_file_utils.convert_ldm_vae_checkpoint(ckpt, dict(vae.config))
    for ours, theirs in ((models.unet.state_dict(), theirs_unet), (models.vae.state_dict(), theirs_vae)):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(ours[key], value.reshape(ours[key].shape)), key


@pytest.mark.parametrize("family", ["v1", "v2", "v2-v"])
def test_shipped_configs_cover_every_original_key(family):
    """At full size (on the meta device): every key of an original-layout file of this family has a place."""
    from lora_diffusion.models import empty_modules
    from lora_diffusion.models.convert import clip_names, unet_names, vae_names

    text_encoder, vae, unet = empty_modules(ASSETS / family)
    ckpt = original_checkpoint(text_encoder, vae, unet, open_clip=family != "v1")
    unet_map = unet_names(ckpt, unet.config.layers_per_block)
    assert sorted(t for targets in unet_map.values() for t, _ in targets) == sorted(unet.state_dict())
    vae_map = vae_names(ckpt, len(vae.config.up_block_types))
    assert sorted(t for targets in vae_map.values() for t, _ in targets) == sorted(vae.state_dict())
    te_map = clip_names(ckpt, hasattr(text_encoder, "text_model"), text_encoder.config.num_hidden_layers)
    assert sorted(t for targets in te_map.values() for t, _ in targets) == sorted(text_encoder.state_dict())


def test_single_file_bfloat16(sd1):
    text_encoder, vae, unet, _, path = sd1
    models = load_models(path, config_dir=TINY, dtype=torch.bfloat16)
    assert_same_weights(models.text_encoder, text_encoder, dtype=torch.bfloat16)
    assert_same_weights(models.vae, vae, dtype=torch.bfloat16)
    assert_same_weights(models.unet, unet, dtype=torch.bfloat16)


# --- single-file SD2.x (OpenCLIP text encoder, linear projections) ---------------------------------------------


def tiny_v2_config_dir(root):
    root = Path(root)
    for part in ("vae", "unet", "text_encoder"):
        (root / part).mkdir(parents=True)
    shutil.copy(TINY / "vae" / "config.json", root / "vae" / "config.json")
    unet = json.loads((TINY / "unet" / "config.json").read_text())
    unet.update(use_linear_projection=True, attention_head_dim=[2, 4, 4, 4])
    (root / "unet" / "config.json").write_text(json.dumps(unet))
    te = json.loads((TINY / "text_encoder" / "config.json").read_text())
    te.update(hidden_act="gelu", num_hidden_layers=3)
    (root / "text_encoder" / "config.json").write_text(json.dumps(te))
    return root


def test_single_file_sd2(tmp_path, no_network):
    config_dir = tiny_v2_config_dir(tmp_path / "configs")
    text_encoder, vae, unet = source_modules(config_dir, seed=21)
    ckpt = original_checkpoint(text_encoder, vae, unet, open_clip=True)
    assert ckpt["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 2  # linear, as in SD2
    path = write_checkpoint(ckpt, tmp_path / "sd2.safetensors")
    models = load_models(path, config_dir=config_dir, v_parameterization=True)
    assert models.v2 and models.v_parameterization
    assert models.noise_scheduler.config.prediction_type == "v_prediction"
    assert models.tokenizer.pad_token == "!"
    assert_same_weights(models.text_encoder, text_encoder)
    assert_same_weights(models.vae, vae)
    assert_same_weights(models.unet, unet)
    assert_same_outputs(models, text_encoder, vae, unet)
    with pytest.raises(ModelLoadError, match="SD2.x"):
        load_models(path, config_dir=config_dir, v2=False)


def test_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.torch import load_file

    from lora_diffusion.models.checkpoint import SafetensorsFile

    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
               "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5)}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ours, theirs = SafetensorsFile(path), load_file(str(path))
    assert sorted(ours.entries) == sorted(theirs)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype and torch.equal(ours[name], expected), name


# --- errors ----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError,
                       match=r"--pretrained_model_name_or_path .*nope.* not found; expected a diffusers folder"):
        load_models(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="builtin:tiny"):
        load_models("runwayml/stable-diffusion-v1-5")


def test_folder_without_model_index_or_parts(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers model folder: model_index.json"):
        load_models(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="has no vae/ subfolder"):
        load_models(tmp_path)
    for part in ("vae", "text_encoder"):
        (tmp_path / part).mkdir()
    with pytest.raises(ModelLoadError, match="could not load the diffusers folder"):
        load_models(tmp_path)  # empty subfolders


def test_not_a_checkpoint(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.txt.*safetensors"):
        load_models(text_file)
    lora = write_checkpoint({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
                            tmp_path / "lora.safetensors")
    with pytest.raises(ModelLoadError, match=r"LoRA file.*model\.diffusion_model\."):
        load_models(lora)
    sdxl = write_checkpoint({"conditioner.embedders.0.transformer.x": torch.zeros(1),
                             "model.diffusion_model.x": torch.zeros(1)}, tmp_path / "xl.safetensors")
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_models(sdxl)
    unet_only = write_checkpoint({"model.diffusion_model.out.2.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(ModelLoadError, match="missing: VAE, text encoder"):
        load_models(unet_only)
    other = write_checkpoint({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError,
                       match=r"not a recognised SD1.x/2.x checkpoint.*encoder.weight.*first_stage_model\."):
        load_models(other)


def test_corrupt_files(sd1, tmp_path):
    good = sd1[-1]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:5000])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    for path in (truncated, garbage):
        with pytest.raises(ModelLoadError, match=f"{path.name} could not be read"):
            load_models(path, config_dir=TINY)


class NotATensor:
    pass


class RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless, but a pickle that calls a function when loaded


def test_ckpt_with_pickled_objects_is_refused(tmp_path):
    for name, value in (("object", NotATensor()), ("code", RunsCode())):
        path = tmp_path / f"unsafe_{name}.ckpt"
        torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": value}, str(path))
        with pytest.raises(ModelLoadError) as caught:
            load_models(path)
        message = str(caught.value)
        assert str(path) in message and "refused for safety" in message and ".safetensors" in message
        assert "likely succeed" not in message and "weights_only=False" not in message.replace(" ", "")
        assert "\n" not in message and caught.value.__cause__ is None  # torch's advice is not chained either


def test_missing_and_unexpected_keys(sd1, tmp_path):
    ckpt = dict(sd1[3])
    del ckpt["model.diffusion_model.out.2.weight"]
    ckpt["model.diffusion_model.input_blocks.1.7.bogus.weight"] = torch.zeros(1)
    path = write_checkpoint(ckpt, tmp_path / "broken.safetensors")
    with pytest.raises(ModelLoadError, match=r"U-Net.*1 missing \(e\.g\. conv_out\.weight\).*1 unexpected "
                                             r"\(e\.g\. model\.diffusion_model\.input_blocks\.1\.7\.bogus\.weight\)"):
        load_models(path, config_dir=TINY)


def test_wrong_config_family_names_the_shapes(sd1):
    path = sd1[-1]
    with pytest.raises(ModelLoadError, match=r"has shape .* expects"):
        load_models(path)  # the shipped SD1.5 configs do not fit tiny weights
