"""network.apply_max_norm (kohya's --scale_weight_norms) against kohya's rule written out here, and LoKr against
LyCORIS' own apply_max_norm."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.core.adapters import IA3Layer, LoHaLayer, LoKrLayer, LoRALayer
from lora_diffusion.core.network import LoRANetwork


def kohya_updown(up, down, alpha):
    """networks/lora.py apply_max_norm_regularization's update of one module, written out."""
    scale = alpha / down.shape[0]
    if up.dim() == 4 and down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None] * scale
    if down.dim() == 4:  # a kxk down then a 1x1 up: one kxk conv
        return F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
    return up @ down * scale


def random_network(seed=0):
    torch.manual_seed(seed)
    layers = {
        "lora_unet_big": LoRALayer(nn.Linear(32, 48), 4, 2),            # scaled
        "lora_unet_small": LoRALayer(nn.Linear(32, 48), 4, 2),          # within the norm: untouched
        "lora_unet_conv": LoRALayer(nn.Conv2d(8, 16, 3, padding=1), 4, 1),
        "lora_unet_conv1": LoRALayer(nn.Conv2d(8, 16, 1), 2, 2),
        "lora_unet_loha": LoHaLayer(nn.Linear(32, 48), 4, 2),
        "lora_unet_lokr": LoKrLayer(nn.Linear(32, 48), 2, 1, decompose_both=True, factor=4),
        "lora_unet_ia3": IA3Layer(nn.Linear(32, 48)),
    }
    for name, layer in layers.items():
        for p in layer.parameters():
            p.data = torch.randn(p.shape) * (0.01 if name == "lora_unet_small" else 1.0)
    return LoRANetwork(layers, rank=4, alpha=2)


def test_lora_modules_are_scaled_as_kohya_does():
    network = random_network()
    max_norm = 1.0
    before = {name: (layer.lora_up.weight.detach().clone(), layer.lora_down.weight.detach().clone(), layer.alpha.item())
              for name, layer in network.layers().items() if isinstance(layer, LoRALayer)}
    others = {name: layer.delta_weight().detach().clone() for name, layer in network.layers().items()
              if isinstance(layer, (LoHaLayer, LoKrLayer))}
    ia3 = network.lora_unet_ia3.weight.clone()
    keys_scaled, mean_norm, top_norm = network.apply_max_norm(max_norm)

    expected_scaled, expected_norms = 0, []
    for name, (up, down, alpha) in before.items():
        norm = kohya_updown(up, down, alpha).norm().clamp(min=max_norm / 2)
        desired = norm.clamp(max=max_norm)
        ratio = desired / norm
        if ratio != 1:
            expected_scaled += 1
        layer = network.layers()[name]
        torch.testing.assert_close(layer.lora_up.weight, up * ratio.sqrt())
        torch.testing.assert_close(layer.lora_down.weight, down * ratio.sqrt())
        expected_norms.append(float(kohya_updown(up, down, alpha).norm().detach() * ratio))
    for name, delta in others.items():  # LoHa, LoKr: the update is scaled to max_norm (formula: times the ratio)
        ratio = min(1.0, max_norm / float(delta.norm()))
        torch.testing.assert_close(network.layers()[name].delta_weight(), delta * ratio, rtol=1e-5, atol=1e-7)
        expected_scaled += ratio < 1
        expected_norms.append(float(delta.norm()) * ratio)
    assert torch.equal(network.lora_unet_ia3.weight, ia3)  # iA3: not a max-norm algorithm (as LyCORIS)
    assert expected_scaled == 5 and keys_scaled == expected_scaled  # all but "small"
    assert mean_norm == pytest.approx(sum(expected_norms) / len(expected_norms), rel=1e-5)
    assert top_norm == pytest.approx(max(expected_norms), rel=1e-5)
    # a second pass finds every module within the norm (up to rounding)
    assert network.apply_max_norm(max_norm * 1.0001)[0] == 0


def test_lokr_matches_lycoris_apply_max_norm():
    lycoris = pytest.importorskip("lycoris")
    from lycoris.modules import LokrModule

    from lora_diffusion.core.kohya import parse_state_dict
    from lora_diffusion.core.network import layer_from_file

    torch.manual_seed(1)
    base = nn.Linear(32, 48)
    theirs = LokrModule("lora_unet_x", base, 1.0, lora_dim=2, alpha=1, decompose_both=True, factor=4)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    file = {f"lora_unet_x.{k}": v.clone() for k, v in theirs.state_dict().items()}
    ours = layer_from_file(base, parse_state_dict(file)["lora_unet_x"], "lora_unet_x", "test")
    with torch.no_grad():
        scaled, norm = theirs.apply_max_norm(0.5)
    assert scaled
    keys, mean, top = LoRANetwork({"lora_unet_x": ours}, rank=2, alpha=1).apply_max_norm(0.5)
    assert keys == 1 and mean == pytest.approx(float(norm), rel=1e-5) and top == pytest.approx(0.5, rel=1e-5)
    for key, tensor in ours._tensors().items():
        torch.testing.assert_close(tensor, getattr(theirs, key), rtol=1e-5, atol=1e-7)
    assert lycoris  # the oracle was there


def test_bad_max_norm_and_merged_networks_are_refused():
    network = random_network()
    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(ValueError, match="max_norm"):
            network.apply_max_norm(bad)
    network.apply_to()
    network.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        network.apply_max_norm(1.0)
    assert math.isfinite(network.lora_unet_big.lora_up.weight.detach().sum())
