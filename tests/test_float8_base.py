"""kohya's --fp8_base / --fp8_base_unet: the frozen weights in float8 e4m3, upcast per call. Expected outputs come
from a copy of the model whose weights were rounded through float8 here, kept in fp32 and run unchanged."""

import copy

import torch
from torch import nn

import train_lora
from conftest import unet_inputs
from lora_diffusion import create_network
from lora_diffusion.models.float8 import store_in_float8
from test_train import base_flags, make_dataset


def test_a_float8_unet_computes_what_its_rounded_weights_compute(tiny_unet):
    rounded = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        for name, module in rounded.named_modules():
            if type(module) in (nn.Linear, nn.Conv2d) and name != "conv_in":
                module.weight.copy_(module.weight.to(torch.float8_e4m3fn).float())
    stored = store_in_float8(tiny_unet, keep=("conv_in",))
    assert stored > 0 and tiny_unet.dtype == torch.float32  # conv_in kept: diffusers' dtype is the model's
    assert tiny_unet.down_blocks[0].resnets[0].conv1.weight.dtype == torch.float8_e4m3fn
    assert tiny_unet.down_blocks[0].resnets[0].conv1.weight.element_size() == 1
    x, t, c = unet_inputs()
    with torch.no_grad():
        assert torch.allclose(tiny_unet(x, t, c).sample, rounded(x, t, c).sample, atol=1e-5)
    # a LoRA on top trains in fp32 and its update is added as on any base
    network = create_network(tiny_unet, None, rank=4, alpha=4)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    loss = tiny_unet(x, t, c).sample.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)


def test_a_run_with_fp8_base(tmp_path, capsys):
    data = make_dataset(tmp_path)
    assert train_lora.main(base_flags(tmp_path, data, max_train_steps=2, fp8_base=True)) == 0
    out = capsys.readouterr().out
    assert "--fp8_base: " in out and "base layers stored in float8" in out
    assert (tmp_path / "out" / "t.safetensors").exists()
