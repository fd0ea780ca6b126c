"""DoRA as a variant a layer holds (core/adapters/dora.py): the layer asks `layer.variant`; the magnitude stays the
layer's own `dora_scale` parameter; the old names (is_dora, dora_weight, dora_merged, row_norms, ...) still work."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.core import adapters
from lora_diffusion.core.adapters import DoRA, LoHaLayer, LoKrLayer, LoRALayer, base, dora
from lora_diffusion.core.spec import NetworkSpec
from lora_diffusion.formats.errors import LoRAFileError


def randomised(layer):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("cls", [LoRALayer, LoHaLayer, LoKrLayer])
def test_a_dora_layer_holds_the_variant_and_its_magnitude_parameter(cls):
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    layer = cls(linear, 4, 2, dora_wd=True)
    assert isinstance(layer.variant, DoRA) and layer.is_dora and not layer.variant.on_input
    assert isinstance(layer.dora_scale, nn.Parameter)
    assert torch.equal(layer.dora_scale, dora.row_norms(linear.weight.detach().float()))
    assert "dora_scale" in dict(layer.named_parameters())
    plain = cls(nn.Linear(16, 12), 4, 2)
    assert plain.variant is None and plain.dora_scale is None and not plain.is_dora


def test_the_forward_is_the_base_op_with_the_merged_weight_and_merging_takes_it_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = randomised(LoRALayer(conv, 2, 1, dora_wd=True, multiplier=0.7)).apply_to()
    x = torch.randn(2, 6, 5, 5)
    weight = conv.weight.detach().clone()
    expected = F.conv2d(x, dora.dora_merged(weight, layer.delta_weight(), layer.dora_scale, 0.7), conv.bias,
                        padding=1)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.dora_weight(0.7), layer.variant.merged_weight(layer, 0.7))
        before = conv(x)
        layer.merge()
        torch.testing.assert_close(conv(x), before, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(conv.weight.detach(), weight, rtol=0, atol=1e-6)


def test_at_multiplier_zero_the_variant_still_computes():
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    layer = randomised(LoRALayer(linear, 2, 1, dora_wd=True, multiplier=0.0)).apply_to()
    x = torch.randn(3, 8)
    with torch.no_grad():
        w_plus_dw = linear.weight + layer.delta_weight()
        torch.testing.assert_close(linear(x), F.linear(x, w_plus_dw, linear.bias), rtol=1e-5, atol=1e-5)
    assert not DoRA.inactive_at_zero


def test_the_input_axis_the_spec_asks_for_and_that_a_file_brings():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12)
    variant = NetworkSpec(algo="lora", dora_wd=True, wd_on_output=False).variant
    assert isinstance(variant, DoRA) and variant.on_input
    assert NetworkSpec(algo="lora").variant is None
    layer = LoRALayer(linear, 4, 2, dora_wd=variant)
    assert layer.variant is not variant  # each layer its own (loading may change its axis)
    assert layer.dora_scale.shape == (1, 16)
    assert torch.equal(layer.dora_scale, dora.column_norms(linear.weight.detach().float()))
    # a per-output layer loading a per-input file takes the file's axis
    other = LoRALayer(nn.Linear(16, 12), 4, 2, dora_wd=True)
    assert other.dora_scale.shape == (12, 1)
    magnitude = torch.rand(1, 16) + 0.5
    other.variant.load_file(other, magnitude, "x: lora_unet_m")
    assert other.variant.on_input and torch.equal(other.dora_scale.detach(), magnitude)
    assert dict(other.variant.file_tensors(other, torch.float16))["dora_scale"].dtype == torch.float16
    with pytest.raises(LoRAFileError, match=r"x: lora_unet_m\.dora_scale is \(7, 1\), expected \(12, 1\)"):
        layer = LoRALayer(nn.Linear(16, 12), 4, 2, dora_wd=True)
        layer.variant.load_file(layer, torch.ones(7, 1), "x: lora_unet_m")


def test_a_file_magnitude_of_another_shape_is_refused():
    DoRA.check_file_tensor("m", torch.ones(12, 1), "f")
    DoRA.check_file_tensor("m", torch.ones(1, 16, 1, 1), "f")
    with pytest.raises(LoRAFileError, match=r"f: m\.dora_scale is \(3, 4\)"):
        DoRA.check_file_tensor("m", torch.ones(3, 4), "f")


def test_file_delta_is_the_merged_weight_minus_the_base():
    torch.manual_seed(0)
    weight, delta, magnitude = torch.randn(6, 10), torch.randn(6, 10) * 0.1, torch.rand(6, 1) + 0.5
    got = DoRA.file_delta(weight, delta, magnitude, 0.5)
    torch.testing.assert_close(got, dora.dora_merged(weight, delta, magnitude, 0.5) - weight)


def test_the_old_names_still_import():
    for name in ("row_norms", "column_norms", "dora_merged", "dora_on_input"):
        assert getattr(base, name) is getattr(dora, name) is getattr(adapters, name)
    from lora_diffusion.core.adapters.lora import fit_shape
    assert fit_shape is dora.fit_shape
    assert "dora_scale" in adapters.file_keys()
