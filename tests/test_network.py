"""LoRANetwork on SD1.5-topology models: which modules, how many parameters, training, merge/remove."""

import pytest
import torch
from torch import nn

from conftest import ASSETS, build_tiny_text_encoder, build_tiny_unet, text_ids, unet_inputs
from lora_diffusion import create_network


def randomize(network, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=g) * std


def outputs(unet, text_encoder):
    x, t, c = unet_inputs(size=16)
    with torch.no_grad():
        return unet(x, t, c).sample, text_encoder(text_ids()).last_hidden_state


def test_default_targets_on_sd15_topology(tiny_unet, tiny_text_encoder):
    network = create_network(tiny_unet, tiny_text_encoder, rank=4)
    assert len(network.unet_layers) == 192 and len(network.text_encoder_layers) == 72
    names = set(network.layers())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert "lora_unet_up_blocks_3_attentions_2_proj_out" in names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj" in names


def test_locon_targets(tiny_unet, tiny_text_encoder):
    network = create_network(tiny_unet, tiny_text_encoder, rank=4, alpha=2, conv_rank=8, conv_alpha=1)
    layers = network.layers()
    assert len(network.unet_layers) == 278 and len(network.text_encoder_layers) == 72
    conv1 = layers["lora_unet_down_blocks_1_resnets_0_conv1"]
    assert conv1.rank == 8 and conv1.alpha.item() == 1 and conv1.lora_down.weight.shape[2:] == (3, 3)
    shortcut = layers["lora_unet_down_blocks_1_resnets_0_conv_shortcut"]
    assert shortcut.rank == 4 and shortcut.alpha.item() == 2  # 1x1 convs use the linear rank, as kohya
    assert layers["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].rank == 4
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in layers
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in layers
    assert network.network_args == {"conv_dim": 8, "conv_alpha": 1}


def _lora_params_from_shapes(module_shapes, rank):
    return sum(rank * (i + o) for i, o in module_shapes)


def test_sd15_parameter_formula_on_the_real_configuration():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ASSETS / "v1" / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(ASSETS / "v1" / "text_encoder" / "config.json"))
    for rank in (1, 8):
        network = create_network(unet, text_encoder, rank=rank)
        assert len(network.layers()) == 264
        count = sum(p.numel() for p in network.parameters())
        assert count == 589_824 * rank
        # the same number from the base modules' shapes, counted independently
        shapes = []
        for m in list(unet.modules()) + list(text_encoder.modules()):
            if m._forward_hooks:
                w = m.weight
                shapes.append((w.shape[1], w.shape[0]))
        assert _lora_params_from_shapes(shapes, rank) == count
        network.remove()


def test_include_exclude_and_single_model(tiny_unet, tiny_text_encoder):
    only_attn1 = create_network(tiny_unet, None, rank=2, include=[r"attn1\.to_[qkv]$"])
    assert len(only_attn1.layers()) == 16 * 3
    only_attn1.remove()
    no_ff = create_network(tiny_unet, tiny_text_encoder, rank=2, exclude=[r"\.ff\.", "mlp"])
    assert len(no_ff.unet_layers) == 16 * 10 and len(no_ff.text_encoder_layers) == 48
    no_ff.remove()
    te_only = create_network(tiny_unet, tiny_text_encoder, rank=2, train_unet=False)
    assert len(te_only.unet_layers) == 0 and len(te_only.text_encoder_layers) == 72
    te_only.remove()
    unet_only = create_network(tiny_unet, None, rank=2)
    assert len(unet_only.text_encoder_layers) == 0 and len(unet_only.unet_layers) == 192
    with pytest.raises(ValueError, match="matched no module"):
        create_network(tiny_unet, None, rank=2, include=["nothing-like-this"])


class Transformers4Layout(nn.Module):
    """transformers 4.x CLIPTextModel: the same modules one `text_model.` level down."""

    def __init__(self, flat):
        super().__init__()
        self.text_model = flat


def test_text_encoder_names_are_canonical_in_both_transformers_layouts(tiny_text_encoder):
    flat = create_network(None, tiny_text_encoder, rank=2)
    flat_names = set(flat.layers())
    flat.remove()
    nested = create_network(None, Transformers4Layout(tiny_text_encoder), rank=2)
    assert set(nested.layers()) == flat_names
    assert all(n.startswith("lora_te_text_model_encoder_layers_") for n in flat_names)


def test_every_lora_parameter_gets_a_gradient_within_two_steps(tiny_unet, tiny_text_encoder):
    tiny_unet.requires_grad_(False)
    tiny_text_encoder.requires_grad_(False)
    network = create_network(tiny_unet, tiny_text_encoder, rank=4, conv_rank=4)
    network.train()
    optimizer = torch.optim.AdamW(network.param_groups(unet_lr=1e-3, text_encoder_lr=5e-4), lr=1e-3)
    touched = {name: False for name, _ in network.named_parameters()}
    x, t, _ = unet_inputs(size=16)  # 16x16 latents: the mid block attends over 4 tokens, not 1
    for _ in range(2):
        optimizer.zero_grad()
        context = tiny_text_encoder(text_ids()[:, :7]).last_hidden_state
        loss = tiny_unet(x, t, context).sample.pow(2).mean()
        loss.backward()
        for name, p in network.named_parameters():
            if p.grad is not None and p.grad.abs().sum() > 0:
                touched[name] = True
        optimizer.step()
    untouched = [n for n, ok in touched.items() if not ok]
    assert not untouched, f"{len(untouched)} LoRA parameters got no gradient, e.g. {untouched[:3]}"
    lora = {id(p) for p in network.parameters()}
    assert all(id(p) in lora for p in tiny_unet.parameters() if p.requires_grad or p.grad is not None)


def test_param_groups_have_separate_learning_rates(tiny_unet, tiny_text_encoder):
    network = create_network(tiny_unet, tiny_text_encoder, rank=2)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("text_encoder", 5e-5)]
    assert len(groups[0]["params"]) == 192 * 2 and len(groups[1]["params"]) == 72 * 2
    assert [g["name"] for g in network.param_groups(unet_lr=1e-4, text_encoder_lr=0)] == ["unet"]
    defaulted = network.param_groups(default_lr=3e-4)
    assert [g["lr"] for g in defaulted] == [3e-4, 3e-4]


def test_merge_unmerge_remove_round_trips(tiny_unet, tiny_text_encoder):
    base_unet, base_te = outputs(tiny_unet, tiny_text_encoder)
    weights_before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    network = create_network(tiny_unet, tiny_text_encoder, rank=4, alpha=2, conv_rank=4, conv_alpha=1)
    randomize(network)
    network.set_multiplier(0.75)
    lora_unet, lora_te = outputs(tiny_unet, tiny_text_encoder)
    assert (lora_unet - base_unet).abs().max() > 1e-3 and (lora_te - base_te).abs().max() > 1e-3
    network.merge()
    merged_unet, merged_te = outputs(tiny_unet, tiny_text_encoder)
    torch.testing.assert_close(merged_unet, lora_unet, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_te, lora_te, rtol=1e-4, atol=1e-4)
    network.unmerge()
    torch.testing.assert_close(outputs(tiny_unet, tiny_text_encoder)[0], lora_unet, rtol=1e-4, atol=1e-4)
    network.remove()
    after_unet, after_te = outputs(tiny_unet, tiny_text_encoder)
    torch.testing.assert_close(after_unet, base_unet, rtol=0, atol=1e-5)  # fp32 rounding of merge + unmerge
    torch.testing.assert_close(after_te, base_te, rtol=0, atol=1e-5)
    for k, v in tiny_unet.state_dict().items():
        assert torch.allclose(v, weights_before[k], atol=1e-6), k
    assert not any(m._forward_hooks for m in tiny_unet.modules())
    assert set(tiny_unet.state_dict()) == set(weights_before)


def test_remove_without_merge_is_exact(tiny_unet, tiny_text_encoder):
    base_unet, base_te = outputs(tiny_unet, tiny_text_encoder)
    network = create_network(tiny_unet, tiny_text_encoder, rank=4, conv_rank=4)
    randomize(network)
    network.remove()
    after_unet, after_te = outputs(tiny_unet, tiny_text_encoder)
    assert torch.equal(after_unet, base_unet) and torch.equal(after_te, base_te)


def test_multiplier_scales_the_delta_linearly(tiny_unet, tiny_text_encoder):
    base_unet, _ = outputs(tiny_unet, tiny_text_encoder)
    network = create_network(tiny_unet, None, rank=4)
    randomize(network, std=0.01)
    network.set_multiplier(1.0)
    full = outputs(tiny_unet, tiny_text_encoder)[0] - base_unet
    network.set_multiplier(0.0)
    assert torch.equal(outputs(tiny_unet, tiny_text_encoder)[0], base_unet)
    network.set_multiplier(0.5)
    half = outputs(tiny_unet, tiny_text_encoder)[0] - base_unet
    torch.testing.assert_close(half, 0.5 * full, rtol=0.05, atol=2e-4)


def test_base_cast_before_injecting_keeps_lora_in_fp32_and_to_moves_it_after(tiny_unet, tiny_text_encoder):
    tiny_unet.to(torch.bfloat16)
    network = create_network(tiny_unet, None, rank=4)
    randomize(network)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    x, t, _ = unet_inputs()
    c = torch.randn(2, 7, 32)
    out = tiny_unet(x.bfloat16(), t, c.bfloat16()).sample
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in network.parameters())
    # the LoRA is part of the model: a later cast or move takes it along, like any other module's weights
    torch.nn.Module.to(tiny_unet, torch.float16)
    assert all(p.dtype == torch.float16 for p in network.parameters())
    assert all(b.dtype == torch.float16 for b in network.buffers())


def test_load_weights_accepts_every_text_encoder_spelling(tmp_path, tiny_unet, tiny_text_encoder):
    """--network_weights with a file whose text-encoder keys are `lora_te1_...` or transformers-5 short names."""
    from safetensors.torch import save_file

    network = create_network(tiny_unet, tiny_text_encoder, rank=2)
    randomize(network)
    tensors = network.file_tensors()
    for spelling in ("lora_te1_text_model_", "lora_te_", "lora_te1_"):
        renamed = {k.replace("lora_te_text_model_", spelling): v for k, v in tensors.items()}
        save_file(renamed, tmp_path / "f.safetensors")
        fresh = create_network(tiny_unet, tiny_text_encoder, rank=2)
        fresh.load_weights(str(tmp_path / "f.safetensors"))
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, network.state_dict()[name]), (spelling, name)
        fresh.remove()


def test_create_network_freezes_the_base_and_agrees_with_inject(tiny_unet, tiny_text_encoder):
    """Models fresh from from_config are trainable: afterwards only the adapters are (peft, inject_trainable_lora),
    and a network already on the model keeps its own trainable parameters."""
    from lora_diffusion import inject_trainable_lora

    assert all(p.requires_grad for p in tiny_unet.parameters())
    first = create_network(tiny_unet, tiny_text_encoder, rank=2, include=[r"attn1", r"self_attn"])
    second = create_network(tiny_unet, tiny_text_encoder, rank=2, algo="loha", include=[r"attn2", r"mlp"])
    adapters = {id(p) for net in (first, second) for p in net.parameters()}
    for model in (tiny_unet, tiny_text_encoder):
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable and trainable <= adapters
    assert all(p.requires_grad for net in (first, second) for p in net.parameters())

    unet = build_tiny_unet()
    params, _ = inject_trainable_lora(unet, r=2)
    injected = {id(p) for group in params for p in group}
    assert {id(p) for p in unet.parameters() if p.requires_grad} == injected


def test_new_token_names_as_other_tools_write_them(tiny_text_encoder):
    """<V>, <v> (cloneofsimo, diffusers textual inversion, Mix-of-Show) are tokens: any name without whitespace that
    the tokenizer reads back as one new token. CLIP lower-cases prompts, so <V> is read as <v>."""
    from lora_diffusion import TokenEmbeddings
    from lora_diffusion.core.network import check_token_name
    from lora_diffusion.models.tokenizer import load_clip_tokenizer

    for name in ("<V>", "<v>", "<s1>", "sks", "Sks", "a-b"):
        check_token_name(name)
    for name in ("a b", "", "sks\n", None):
        with pytest.raises(ValueError, match="without whitespace") as error:
            check_token_name(name)
        assert "--" not in str(error.value)  # library errors name no trainer flag
    for name, prompt in (("<V>", "a photo of <v> dog"), ("<v>", "a photo of <V> dog")):
        tokenizer, encoder = load_clip_tokenizer(), build_tiny_text_encoder()
        size = len(tokenizer)
        embedding = TokenEmbeddings.create(tokenizer, encoder, name, "star", num_vectors=1)
        ids = tokenizer(prompt).input_ids
        assert ids[4] == size and len(ids) == 7  # <start> a photo of <v> dog <end>: one token, the new id
        with torch.no_grad():
            states = encoder(torch.tensor([ids])).last_hidden_state
            embedding.weight.mul_(3)
            assert not torch.allclose(states, encoder(torch.tensor([ids])).last_hidden_state)
    with pytest.raises(ValueError, match="already in the tokenizer") as error:
        TokenEmbeddings.create(load_clip_tokenizer(), build_tiny_text_encoder(), "Star")
    assert "--" not in str(error.value)
