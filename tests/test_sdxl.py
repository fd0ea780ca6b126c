"""SDXL: kohya's module counts on the full-size configs (meta device), builtin:tiny-xl, our files in diffusers'
StableDiffusionXLPipeline.load_lora_weights, kohya-style SDXL files (names made here from kohya's rules) in ours,
single files in the original SGM layout, and `lora-diffusion generate` on SDXL."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_diffusion import create_network, load_network
from lora_diffusion.cli import main
from lora_diffusion.core.kohya import LoRAFileError, read_lora_file
from lora_diffusion.models import ASSETS, load_models
from lora_diffusion.models.sdxl import build_tiny_xl_models, sdxl_pipeline
from test_models import assert_same_weights, flat_clip_key, randomize, unet_to_original, vae_to_original

TINY_XL = ASSETS / "tiny-xl"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# --- kohya's naming rules, written here independently of lora_diffusion.core.targets -----------------------------


def sgm_path(unet, path):
    """kohya's SDXL U-Net is the original (SGM) one: its module paths are the original checkpoint's keys."""
    added = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if path in added:
        return added[path]
    has_attention = ["Attn" in t for t in unet.config.up_block_types]
    return unet_to_original(path + ".weight", has_attention).removesuffix(".weight")


def kohya_sdxl_names(unet, text_encoder, text_encoder_2, *, conv=False):
    """{kohya name: module} as kohya's SDXL LoRA builds it: every Linear (and 1x1 conv) under a Transformer2DModel,
    with conv=True also ResnetBlock2D's / Downsample2D's / Upsample2D's Linear and Conv2d; CLIPAttention and CLIPMLP
    Linears of both text encoders."""
    names = {}
    for path, module in unet.named_modules():
        in_transformer = ".attentions." in path and isinstance(module, torch.nn.Linear)
        in_conv_block = any(f".{k}." in path for k in ("resnets", "downsamplers", "upsamplers")) and \
            isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        if in_transformer or (conv and in_conv_block):
            names["lora_unet_" + sgm_path(unet, path).replace(".", "_")] = module
    for prefix, encoder in (("lora_te1", text_encoder), ("lora_te2", text_encoder_2)):
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and (".self_attn." in path or ".mlp." in path):
                flat = path.removeprefix("text_model.")
                names[f"{prefix}_text_model_{flat}".replace(".", "_")] = module
    return names


def test_full_size_sdxl_has_kohyas_module_counts():
    """kohya on SDXL base: 722 U-Net modules (10 Linears per transformer block x 70 blocks + proj_in/out of 11
    Transformer2DModels), 72 + 192 text-encoder modules (12 and 32 layers x 6); LoCon adds 62 ResNet modules (17
    blocks x conv1/conv2/time_emb_proj + 11 conv_shortcuts) and 4 sampler convs."""
    configs = ASSETS / "sdxl"
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text()))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(str(configs / "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(configs / "text_encoder_2")))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's U-Net
    assert sum(p.numel() for p in te2.parameters()) == 694_659_840
    expected, expected_locon = set(kohya_sdxl_names(unet, te1, te2)), set(kohya_sdxl_names(unet, te1, te2, conv=True))
    network = create_network(unet, (te1, te2), rank=4, alpha=1)
    names = set(network.layers())
    assert len(network.unet_layers) == 722
    assert sum(n.startswith("lora_te1_") for n in names) == 72 and sum(n.startswith("lora_te2_") for n in names) == 192
    assert names == expected
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in names
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names
    network.remove()
    locon = create_network(unet, (te1, te2), rank=4, alpha=1, conv_rank=2, conv_alpha=1)
    assert len(locon.unet_layers) == 788 and set(locon.layers()) == expected_locon
    assert {"lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv",
            "lora_unet_input_blocks_1_0_in_layers_2"} <= set(locon.layers())


# --- builtin:tiny-xl ---------------------------------------------------------------------------------------------


def test_builtin_tiny_xl_builds_a_diffusers_sdxl_pipeline():
    models = load_models("builtin:tiny-xl")
    assert models.sdxl and not models.v2 and models.name == "builtin:tiny-xl"
    assert isinstance(models.text_encoder_2, CLIPTextModelWithProjection)
    assert models.tokenizer.pad_token == "<|endoftext|>" and models.tokenizer_2.pad_token == "!"
    assert models.tokenizer_2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert_same_weights(models.unet, build_tiny_xl_models(seed=0).unet)
    assert models.text_encoders == (models.text_encoder, models.text_encoder_2)
    pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoder,
                                     text_encoder_2=models.text_encoder_2, tokenizer=models.tokenizer,
                                     tokenizer_2=models.tokenizer_2, unet=models.unet,
                                     scheduler=models.noise_scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, width=64, height=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(image)).all()


# --- outputs -----------------------------------------------------------------------------------------------------


def sdxl_inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    ids = torch.randint(1, 49000, (batch, 77), generator=g)
    ids[:, 0], ids[:, -1] = 49406, 49407
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 7, 64, generator=g), added, ids)


@torch.no_grad()
def outputs(unet, te1, te2):
    x, t, context, added, ids = sdxl_inputs()
    second = te2(ids)
    return (unet(x, t, context, added_cond_kwargs=added).sample, te1(ids).last_hidden_state,
            second.last_hidden_state, second.text_embeds)


def assert_outputs_close(ours, theirs, tolerance=1e-4):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


def randomize_network(network, seed=3):
    g = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05


CASES = {"lora": dict(conv=None, multiplier=1.0), "locon-multiplier": dict(conv=(4, 2.0), multiplier=0.7)}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_diffusers_sdxl_load_lora_weights_matches_our_network(tmp_path, case):
    c = CASES[case]
    models = build_tiny_xl_models()
    base = outputs(models.unet, models.text_encoder, models.text_encoder_2)
    conv_rank, conv_alpha = c["conv"] or (None, None)
    network = create_network(models.unet, models.text_encoders, rank=4, alpha=2.0, conv_rank=conv_rank,
                             conv_alpha=conv_alpha)
    randomize_network(network)
    network.set_multiplier(c["multiplier"])
    ours = outputs(models.unet, models.text_encoder, models.text_encoder_2)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(ours[:3], base[:3]))  # the LoRA changes each model
    network.save_weights(tmp_path / "xl.safetensors")
    _, metadata = read_lora_file(tmp_path / "xl.safetensors")
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["modelspec.resolution"] == "1024x1024"

    theirs = build_tiny_xl_models()
    pipe = sdxl_pipeline(theirs)
    pipe.load_lora_weights(str(tmp_path), weight_name="xl.safetensors")
    pipe.fuse_lora(lora_scale=c["multiplier"])
    assert_outputs_close(ours, outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2))


@pytest.mark.parametrize("spelling", ["kohya-sgm", "diffusers-paths"])
def test_kohya_style_sdxl_file_loads_with_equal_outputs(tmp_path, spelling):
    """A file named by kohya's rules (written here, not by our code) gives the outputs of its update added to the
    weights by hand; so does one naming the U-Net by diffusers paths (as some exporters do)."""
    reference = build_tiny_xl_models()
    modules = kohya_sdxl_names(reference.unet, reference.text_encoder, reference.text_encoder_2, conv=True)
    paths = {id(m): p for p, m in reference.unet.named_modules()}
    g = torch.Generator().manual_seed(5)
    tensors = {}
    with torch.no_grad():
        for name, module in modules.items():
            weight = module.weight
            rank, alpha = 2, 1.5
            down = torch.randn(rank, *weight.shape[1:], generator=g) * 0.1
            up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else []), generator=g) * 0.1
            delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha / rank
            weight += delta
            if spelling == "diffusers-paths" and name.startswith("lora_unet_"):
                name = "lora_unet_" + paths[id(module)].replace(".", "_")
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(alpha)})
    save_file(tensors, str(tmp_path / "kohya.safetensors"))
    expected = outputs(reference.unet, reference.text_encoder, reference.text_encoder_2)

    models = build_tiny_xl_models()
    network = load_network(tmp_path / "kohya.safetensors", models.unet, models.text_encoders)
    assert len(network.layers()) == len(modules) and network.sdxl
    assert_outputs_close(expected, outputs(models.unet, models.text_encoder, models.text_encoder_2))
    network.save_weights(tmp_path / "again.safetensors")  # written back with kohya's names, whatever was read
    assert set(read_lora_file(tmp_path / "again.safetensors")[0]) == set(modules)


def test_sdxl_file_errors_name_the_problem(tmp_path):
    models = build_tiny_xl_models()
    network = create_network(models.unet, models.text_encoders, rank=2)
    network.save_weights(tmp_path / "xl.safetensors")
    network.remove()
    hint = r"SDXL file: pass text_encoder=\(text_encoder, text_encoder_2\).*lora_te2_"
    with pytest.raises(LoRAFileError, match=hint):
        load_network(tmp_path / "xl.safetensors", None, models.text_encoder)
    sd1 = load_models("builtin:tiny")
    with pytest.raises(LoRAFileError, match="match nothing"):
        load_network(tmp_path / "xl.safetensors", sd1.unet, sd1.text_encoder)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_lycoris_algorithms_on_sdxl_round_trip(tmp_path, algo):
    models = build_tiny_xl_models()
    network = create_network(models.unet, models.text_encoders, rank=4, alpha=2, algo=algo)
    assert any(n.startswith("lora_te2_") for n in network.layers())
    assert "lora_unet_input_blocks_0_0" in network.layers()  # LyCORIS' conv_in, by its SGM name
    randomize_network(network)
    ours = outputs(models.unet, models.text_encoder, models.text_encoder_2)
    network.save_weights(tmp_path / f"{algo}.safetensors")
    fresh = build_tiny_xl_models()
    load_network(tmp_path / f"{algo}.safetensors", fresh.unet, fresh.text_encoders)
    assert_outputs_close(ours, outputs(fresh.unet, fresh.text_encoder, fresh.text_encoder_2))


# --- single files in the original (SGM) layout -------------------------------------------------------------------


def sgm_checkpoint(text_encoder, text_encoder_2, vae, unet):
    """The state dict of Stability's SDXL base for these modules (generative-models' key names)."""
    ckpt = {"model.diffusion_model." + sgm_path(unet, key.removesuffix("." + key.split(".")[-1])) + "." +
            key.split(".")[-1]: value.clone() for key, value in unet.state_dict().items()}
    for key, value in vae.state_dict().items():
        original = vae_to_original(key)
        if ".mid.attn_1." in original and original.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        ckpt["first_stage_model." + original] = value.clone()
    for key, value in text_encoder.state_dict().items():
        ckpt["conditioner.embedders.0.transformer.text_model." + flat_clip_key(key)] = value.clone()
    te2 = {flat_clip_key(k): v for k, v in text_encoder_2.state_dict().items()}
    prefix = "conditioner.embedders.1.model."
    ckpt.update({prefix + "token_embedding.weight": te2["embeddings.token_embedding.weight"],
                 prefix + "positional_embedding": te2["embeddings.position_embedding.weight"],
                 prefix + "ln_final.weight": te2["final_layer_norm.weight"],
                 prefix + "ln_final.bias": te2["final_layer_norm.bias"],
                 prefix + "text_projection": te2["text_projection.weight"].T.contiguous(),  # used as x @ P
                 prefix + "logit_scale": torch.tensor(4.6)})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(text_encoder_2.config.num_hidden_layers):
        block = f"{prefix}transformer.resblocks.{i}."
        for ours, theirs in names.items():
            for leaf in ("weight", "bias"):
                ckpt[f"{block}{theirs}.{leaf}"] = te2[f"encoder.layers.{i}.{ours}.{leaf}"].clone()
        for leaf in ("weight", "bias"):
            ckpt[f"{block}attn.in_proj_{leaf}"] = torch.cat(
                [te2[f"encoder.layers.{i}.self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    ckpt["model_ema.decay"] = torch.tensor(0.9999)
    return ckpt


def test_single_file_sdxl_is_detected_and_loads(tmp_path):
    source = build_tiny_xl_models(seed=4)
    for seed, part in enumerate(("text_encoder", "text_encoder_2", "vae", "unet")):
        randomize(getattr(source, part), 40 + seed)  # biases and norms too: a swapped key cannot hide
    ckpt = sgm_checkpoint(source.text_encoder, source.text_encoder_2, source.vae, source.unet)
    assert "model.diffusion_model.label_emb.0.0.weight" in ckpt
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(tmp_path / "xl.safetensors"))
    models = load_models(tmp_path / "xl.safetensors", config_dir=TINY_XL)
    assert models.sdxl and not models.v2 and models.tokenizer_2.pad_token == "!"
    for part in ("text_encoder", "text_encoder_2", "vae", "unet"):
        assert_same_weights(getattr(models, part), getattr(source, part))
    assert_outputs_close(outputs(source.unet, source.text_encoder, source.text_encoder_2),
                         outputs(models.unet, models.text_encoder, models.text_encoder_2))

    del ckpt["conditioner.embedders.1.model.ln_final.bias"]
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"broken.safetensors.*text encoder 2.*final_layer_norm.bias"):
        load_models(tmp_path / "broken.safetensors", config_dir=TINY_XL)
    unet_only = {k: v for k, v in ckpt.items() if not k.startswith("conditioner.embedders.1.")}
    save_file({k: v.contiguous() for k, v in unet_only.items()}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"SDXL.*missing OpenCLIP bigG"):
        load_models(tmp_path / "partial.safetensors", config_dir=TINY_XL)


def test_tiny_xl_diffusers_folder_round_trip(tmp_path):
    from lora_diffusion.models.sdxl import save_tiny_xl_diffusers_folder

    folder = save_tiny_xl_diffusers_folder(tmp_path / "xl", seed=2)
    models = load_models(folder)
    source = build_tiny_xl_models(seed=2)
    assert models.sdxl and models.tokenizer_2.pad_token == "!"
    for part in ("text_encoder", "text_encoder_2", "vae", "unet"):
        assert_same_weights(getattr(models, part), getattr(source, part))


# --- generate ----------------------------------------------------------------------------------------------------


def test_generate_draws_on_tiny_xl_with_a_lora(tmp_path, capsys):
    models = build_tiny_xl_models()
    network = create_network(models.unet, models.text_encoders, rank=2)
    randomize_network(network)
    network.save_weights(tmp_path / "xl.safetensors")
    for name, extra in (("plain", []), ("lora", ["--lora", str(tmp_path / "xl.safetensors") + ":0.8"])):
        assert main(["generate", "--model", "builtin:tiny-xl", "--prompt", "a red circle --d 3", "--width", "64",
                     "--height", "64", "--steps", "2", "--out", str(tmp_path / name), *extra]) == 0
    plain, lora = (sorted((tmp_path / n).glob("*.png")) for n in ("plain", "lora"))
    assert len(plain) == 1 and len(lora) == 1
    assert plain[0].read_bytes() != lora[0].read_bytes()


def test_sd1_networks_keep_their_names():
    models = load_models("builtin:tiny")
    network = create_network(models.unet, models.text_encoder, rank=2)
    assert not network.sdxl and len(network.unet_layers) == 192 and len(network.text_encoder_layers) == 72
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in network.layers()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in network.layers()
