"""LoRALayer against formulas written out here: forward, merge/unmerge, dropouts, precision."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion import LoRALayer


def randomized(layer: LoRALayer, seed: int = 0) -> LoRALayer:
    g = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    return layer


def test_init_matches_kohya_and_changes_nothing():
    base = nn.Linear(16, 8)
    layer = LoRALayer(base, rank=4, alpha=2)
    assert layer.lora_down.weight.shape == (4, 16) and layer.lora_up.weight.shape == (8, 4)
    assert torch.count_nonzero(layer.lora_up.weight) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 16
    assert layer.lora_down.weight.abs().max() <= bound and layer.lora_down.weight.std() > bound / 4
    assert layer.alpha.dim() == 0 and layer.scaling == 0.5
    x = torch.randn(3, 16)
    expected = base(x)
    layer.apply_to()
    assert torch.equal(base(x), expected)


def test_wraps_in_place_without_copying_the_weight():
    base = nn.Linear(16, 8)
    pointer = base.weight.data_ptr()
    layer = LoRALayer(base, rank=4).apply_to()
    assert base.weight.data_ptr() == pointer
    assert "weight" not in dict(layer.named_parameters()) and len(list(layer.parameters())) == 2
    assert type(base) is nn.Linear and base.lora is layer
    assert set(base.state_dict()) == {"weight", "bias", "lora.lora_down.weight", "lora.lora_up.weight", "lora.alpha"}
    layer.remove()
    assert set(base.state_dict()) == {"weight", "bias"} and not base._forward_hooks and "lora" not in base._modules


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_linear_forward_formula(multiplier):
    base = nn.Linear(16, 8)
    layer = randomized(LoRALayer(base, rank=4, alpha=3, multiplier=multiplier))
    x = torch.randn(2, 5, 16)
    w = base.weight + multiplier * (3 / 4) * layer.lora_up.weight @ layer.lora_down.weight
    expected = F.linear(x, w, base.bias)
    layer.apply_to()
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2), (2, 2, 0)])
def test_conv_forward_and_merge_formula(kernel, stride, padding):
    base = nn.Conv2d(6, 10, kernel, stride, padding)
    layer = randomized(LoRALayer(base, rank=3, alpha=1.5))
    assert layer.lora_down.weight.shape == (3, 6, kernel, kernel) and layer.lora_up.weight.shape == (10, 3, 1, 1)
    x = torch.randn(2, 6, 9, 9)
    branch = F.conv2d(F.conv2d(x, layer.lora_down.weight, stride=stride, padding=padding), layer.lora_up.weight)
    expected = base(x) + 0.5 * branch
    layer.apply_to()
    torch.testing.assert_close(base(x), expected, rtol=1e-4, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(base(x), expected, rtol=1e-4, atol=1e-5)  # LoRA branch off, delta in the weight


def test_merge_unmerge_round_trip_and_remove():
    base = nn.Linear(32, 16)
    original = base.weight.detach().clone()
    layer = randomized(LoRALayer(base, rank=8, alpha=4, multiplier=0.8)).apply_to()
    x = torch.randn(4, 32)
    lora_out = base(x)
    layer.merge()
    manual = original + 0.8 * 0.5 * layer.lora_up.weight @ layer.lora_down.weight
    torch.testing.assert_close(base.weight, manual)
    torch.testing.assert_close(base(x), lora_out, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    layer.remove()
    assert "forward" not in base.__dict__ and not base._forward_hooks and not base._modules
    torch.testing.assert_close(base(x), F.linear(x, original, base.bias), rtol=0, atol=1e-6)


def test_dropouts_only_in_training_and_rank_dropout_rescales():
    base = nn.Linear(64, 64)
    layer = randomized(LoRALayer(base, rank=16, dropout=0.5, rank_dropout=0.25, module_dropout=0.0)).apply_to()
    x = torch.randn(8, 10, 64)
    layer.eval()
    eval_out = base(x)
    torch.testing.assert_close(base(x), eval_out)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(base(x), eval_out)
    # rank dropout alone is unbiased: averaged over many masks the LoRA branch matches eval mode
    layer.dropout = 0.0
    torch.manual_seed(0)
    mean_delta = torch.stack([layer.lora_delta(x) for _ in range(400)]).mean(0)
    layer.eval()
    expected = layer.lora_delta(x)
    ratio = (mean_delta * expected).sum() / expected.pow(2).sum()  # 0.75 if the 1/(1-p) rescale were missing
    assert abs(ratio.item() - 1.0) < 0.05


def test_module_dropout_skips_whole_branch():
    base = nn.Linear(8, 8)
    layer = randomized(LoRALayer(base, rank=2, module_dropout=1.0)).apply_to()
    x = torch.randn(2, 8)
    layer.train()
    torch.testing.assert_close(base(x), F.linear(x, base.weight, base.bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_lora(dtype):
    base = nn.Linear(32, 32).to(dtype)
    layer = randomized(LoRALayer(base, rank=4)).apply_to()
    assert layer.lora_down.weight.dtype == torch.float32
    x = torch.randn(4, 32).to(dtype)
    out = base(x)
    assert out.dtype == dtype
    reference = F.linear(x.float(), base.weight.float() + layer.lora_up.weight @ layer.lora_down.weight,
                         base.bias.float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert layer.lora_up.weight.grad.dtype == torch.float32 and layer.lora_up.weight.grad.abs().sum() > 0


def test_autocast_bf16_gradients_reach_fp32_lora():
    base = nn.Linear(32, 32).requires_grad_(False)
    layer = randomized(LoRALayer(base, rank=4)).apply_to()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = base(torch.randn(4, 32))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert layer.lora_down.weight.grad.dtype == torch.float32
    assert layer.lora_down.weight.grad.abs().sum() > 0 and base.weight.grad is None


def test_bad_modules_are_rejected():
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        LoRALayer(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="groups=1"):
        LoRALayer(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="rank"):
        LoRALayer(nn.Linear(4, 4), rank=0)
