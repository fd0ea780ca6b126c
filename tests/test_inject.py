"""inject_trainable_lora: cloneofsimo/lora's call shape on diffusers and transformers models."""

import itertools

import pytest
import torch
from torch import nn

from conftest import unet_inputs
from lora_diffusion import create_network, inject_trainable_lora
from lora_diffusion.lora import TEXT_ENCODER_DEFAULT_TARGET_REPLACE, lora_network, remove_lora


def test_unet_default_targets(tiny_unet):
    params, names = inject_trainable_lora(tiny_unet, r=4)
    # 16 transformer blocks x (attn1 q,k,v,out + attn2 q,k,v,out + GEGLU proj)
    assert len(names) == 16 * 9
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj" in names
    assert len(params) == 2 * len(names)
    lora = list(itertools.chain(*params))
    trainable = [p for p in tiny_unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora}  # the LoRA is in the model; only it trains
    assert all(p.requires_grad for p in lora) and len(list(itertools.chain(*params))) == len(lora)
    optimizer = torch.optim.AdamW(itertools.chain(*params), lr=1e-2)
    x, t, c = unet_inputs()
    tiny_unet(x, t, c).sample.pow(2).mean().backward()
    assert all(p.grad is not None for p in lora)
    optimizer.step()
    assert all(p.abs().sum() > 0 for p in lora[0::2])  # every zero-initialised lora_up has moved


def test_text_encoder_targets_and_class_renames(tiny_text_encoder):
    # cloneofsimo's default: attention only (q, k, v, out of 12 layers)
    params, names = inject_trainable_lora(tiny_text_encoder, target_replace_module=TEXT_ENCODER_DEFAULT_TARGET_REPLACE,
                                          r=2)
    assert len(names) == 48 and len(params) == 96
    remove_lora(tiny_text_encoder)
    _, names = inject_trainable_lora(tiny_text_encoder, target_replace_module={"CLIPAttention", "CLIPMLP"}, r=2)
    assert len(names) == 72
    # a class name from another transformers version matches today's class
    remove_lora(tiny_text_encoder)
    _, names = inject_trainable_lora(tiny_text_encoder, target_replace_module={"CLIPSdpaAttention"}, r=2)
    assert len(names) == 48


def test_scale_dropout_and_saving(tmp_path, tiny_unet):
    x, t, c = unet_inputs()
    params, _ = inject_trainable_lora(tiny_unet, r=4, scale=0.5, dropout_p=0.1)
    network = lora_network(tiny_unet)
    g = torch.Generator().manual_seed(0)
    for p in itertools.chain(*params):
        p.data = torch.randn(p.shape, generator=g) * 0.01
    network.eval()
    with torch.no_grad():
        half = tiny_unet(x, t, c).sample
    network.set_multiplier(1.0)
    with torch.no_grad():
        full = tiny_unet(x, t, c).sample
    network.save_weights(tmp_path / "inj.safetensors")
    remove_lora(tiny_unet)
    with torch.no_grad():
        base = tiny_unet(x, t, c).sample
    torch.testing.assert_close(half - base, 0.5 * (full - base), rtol=0.05, atol=2e-4)

    # loras= starts from a saved file
    inject_trainable_lora(tiny_unet, r=4, loras=str(tmp_path / "inj.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(tiny_unet(x, t, c).sample, full, rtol=1e-5, atol=1e-5)


def test_file_from_create_network_loads_into_injected_model(tmp_path, tiny_unet):
    network = create_network(tiny_unet, None, rank=4, alpha=4)
    for p in network.parameters():
        p.data.normal_(0, 0.05)
    x, t, c = unet_inputs()
    with torch.no_grad():
        expected = tiny_unet(x, t, c).sample
    network.save_weights(tmp_path / "c.safetensors")
    network.remove()
    inject_trainable_lora(tiny_unet, r=4, loras=str(tmp_path / "c.safetensors"))
    with torch.no_grad():
        actual = tiny_unet(x, t, c).sample
    # inject covers attention + GEGLU, not proj_in/proj_out/ff.net.2: only those modules' deltas are missing
    assert (actual - expected).abs().max() > 0
    network_inj = lora_network(tiny_unet)
    injected = network_inj.layers()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in injected
    # each injected pair is the file's pair (alpha = rank: scale 1), read here with safetensors itself
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "c.safetensors"))
    for name, layer in injected.items():
        assert torch.equal(layer.lora_up.weight, tensors[f"{name}.lora_up.weight"].to(layer.lora_up.weight.dtype))
        assert torch.equal(layer.lora_down.weight, tensors[f"{name}.lora_down.weight"].to(layer.lora_up.weight.dtype))
    # and the model's output is the full network's with the modules inject does not cover left out
    remove_lora(tiny_unet)
    partial = create_network(tiny_unet, None, rank=4, alpha=4)
    partial.load_weights(tmp_path / "c.safetensors")
    with torch.no_grad():
        for name, layer in partial.layers().items():
            if name not in injected:
                layer.lora_up.weight.zero_()
        assert torch.allclose(tiny_unet(x, t, c).sample, actual, atol=1e-5)


def test_nothing_matched_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="found no nn.Linear under modules of class"):
        inject_trainable_lora(model)


def test_merge_and_unload_bakes_every_algorithm(tiny_unet):
    """peft's merge_and_unload for LyCORIS' algorithms too (LoHa, and iA3, whose update depends on the weight)."""
    from lora_diffusion.core.inject import merge_and_unload

    keys = set(tiny_unet.state_dict())
    g = torch.Generator().manual_seed(0)
    for algo, include in (("loha", r"attn1"), ("ia3", r"attn2")):
        network = create_network(tiny_unet, None, rank=2, algo=algo, include=[include])
        for p in network.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = tiny_unet(x, t, context).sample
        merge_and_unload(tiny_unet)
        assert set(tiny_unet.state_dict()) == keys
        torch.testing.assert_close(tiny_unet(x, t, context).sample, expected, rtol=1e-4, atol=1e-5)
