"""dim_from_weights (kohya's --dim_from_weights) and merge_base_weights (--base_weights): ranks, alphas and updates
read from the files' tensors here, independently of the library's reader."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import build_tiny_text_encoder, build_tiny_unet, unet_inputs
from lora_diffusion import create_network, dim_from_weights, merge_base_weights
from lora_diffusion.core.kohya import LoRAFileError


def randomized(network, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=g) * std
    return network


def file_modules(path):
    """{module: (rank, alpha, dW)} straight from the file: alpha / r * up @ down (a kxk down, then a 1x1 up)."""
    tensors = load_file(str(path))
    modules = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
            rank = down.shape[0]
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
            if down.dim() == 4:
                delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            else:
                delta = up @ down
            modules[name] = (rank, alpha, delta * alpha / rank)
    return modules


def test_dim_from_weights_takes_modules_ranks_and_alphas_from_the_file(tmp_path):
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    attention = create_network(unet, text_encoder, rank=4, alpha=2, include=[r"attn1", r"self_attn"])
    convs = create_network(unet, None, rank=2, alpha=1, conv_rank=3, conv_alpha=3, include=[r"resnets\.0\."])
    path = tmp_path / "mixed.safetensors"
    tensors = {**randomized(attention, 1).file_tensors(), **randomized(convs, 2).file_tensors()}
    save_file(tensors, str(path))
    x, t, context = unet_inputs()
    with torch.no_grad():
        y_trained = unet(x, t, context).sample
        convs.remove()
        attention.remove()
        plain = unet(x, t, context).sample

    network = dim_from_weights(path, unet, text_encoder)
    expected = file_modules(path)
    assert set(network.layers()) == set(expected)
    for name, layer in network.layers().items():
        rank, alpha, _ = expected[name]
        assert (layer.rank, layer.alpha.item()) == (rank, alpha), name
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context).sample, plain)  # fresh: up = 0
    trainable = {id(p) for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in network.parameters()}
    network.load_weights(path)  # --network_weights
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context).sample, y_trained, rtol=1e-4, atol=1e-5)


def test_dim_from_weights_refuses_what_kohya_cannot_read(tmp_path):
    unet = build_tiny_unet()
    loha = randomized(create_network(unet, None, rank=2, algo="loha", include=[r"attn1"]), 3)
    path = tmp_path / "loha.safetensors"
    loha.save_weights(path)
    loha.remove()
    with pytest.raises(LoRAFileError, match="LoHa.*plain LoRA"):
        dim_from_weights(path, unet, None)


def test_merge_base_weights_adds_each_file_at_its_multiplier(tmp_path):
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    paths = []
    for seed, options in ((1, dict(rank=4, alpha=2)), (2, dict(rank=2, alpha=2, conv_rank=2, conv_alpha=1))):
        network = randomized(create_network(unet, text_encoder, **options), seed)
        paths.append(tmp_path / f"base{seed}.safetensors")
        network.save_weights(paths[-1])
        network.remove()
    merge_base_weights(paths, unet, text_encoder, multipliers=[0.5])  # the second at kohya's default, 1
    expected = {k: v.clone() for k, v in before.items()}
    te_expected = {k: v.clone() for k, v in te_before.items()}
    paths_of = {"lora_unet_" + p.replace(".", "_"): p for p, _ in unet.named_modules()}
    te_paths = {"lora_te_" + ("" if p.startswith("text_model.") else "text_model_") + p.replace(".", "_"): p
                for p, _ in text_encoder.named_modules()}
    for path, multiplier in zip(paths, (0.5, 1.0)):
        for name, (_, _, delta) in file_modules(path).items():
            if name in paths_of:
                key, target = f"{paths_of[name]}.weight", expected
            else:
                key, target = f"{te_paths[name]}.weight", te_expected
            target[key] = target[key] + multiplier * delta.reshape(target[key].shape)
    after = unet.state_dict()
    assert set(after) == set(before)  # no `.lora` children left
    for key in before:
        torch.testing.assert_close(after[key], expected[key], rtol=1e-5, atol=1e-6)
    for key, value in text_encoder.state_dict().items():
        torch.testing.assert_close(value, te_expected[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="multipliers"):
        merge_base_weights(paths, unet, text_encoder, multipliers=[1, 1, 1])
