"""LoRANetwork.bypassed(): the base model alone, for the base-model targets of --reg_target base_model. A DoRA
network at multiplier 0 is not the base model (LyCORIS' formula still renormalises W + dW), so only bypassing
gives the output of the U-Net without the network, computed here before the network was made."""

import pytest
import torch

from conftest import build_tiny_unet, unet_inputs
from lora_diffusion import create_network


@pytest.mark.parametrize("algo_args", [dict(algo="lora", dora_wd=True), dict()])
def test_bypassed_is_the_base_model_and_the_layers_come_back(algo_args):
    unet = build_tiny_unet()
    x, t, context = unet_inputs()
    with torch.no_grad():
        base = unet(x, t, context).sample
    network = create_network(unet, None, rank=4, alpha=4, train_text_encoder=False, **algo_args)
    g = torch.Generator().manual_seed(3)
    for p in network.parameters():
        p.data += torch.randn(p.shape, generator=g) * 0.05
    with torch.no_grad():
        trained = unet(x, t, context).sample
        with network.bypassed():
            bypassed = unet(x, t, context).sample
        network.set_multiplier(0.0)
        at_zero = unet(x, t, context).sample
        network.set_multiplier(1.0)
        again = unet(x, t, context).sample
    assert torch.equal(bypassed, base)
    assert torch.equal(again, trained) and not torch.equal(trained, base)
    assert torch.equal(at_zero, base) != ("dora_wd" in algo_args)  # DoRA computes at 0; plain LoRA is the base there
