"""LyCORIS' train_norm=True (trained LayerNorm/GroupNorm weights and biases, keys w_norm/b_norm) against the
lycoris-lora package and the formula norm(x) * (weight + m * w_norm) + bias + m * b_norm written out here."""

import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import build_tiny_text_encoder, build_tiny_unet, lycoris_full_preset_for_diffusers, text_ids, unet_inputs

pytest.importorskip("lycoris")
import lycoris.kohya as lycoris_kohya  # noqa: E402
from lycoris.modules import NormModule, get_module, make_module  # noqa: E402

from lora_diffusion import create_network, load_network  # noqa: E402
from lora_diffusion.core.adapters import NormLayer  # noqa: E402
from lora_diffusion.core.kohya import parse_state_dict  # noqa: E402
from lora_diffusion.core.network import LoRANetwork, layer_from_file  # noqa: E402
from test_adapters_ia3 import run  # noqa: E402  (base(x) with a module applied)

logging.getLogger("lycoris").setLevel(logging.ERROR)
NAME = "lora_unet_x_norm"
BASES = {"layernorm": (lambda: nn.LayerNorm(24), (3, 5, 24)), "groupnorm": (lambda: nn.GroupNorm(4, 16), (2, 16, 5, 5))}


def expected(base, x, w, b, multiplier):
    """The norm with weight + m * w_norm and bias + m * b_norm, written out."""
    weight, bias = base.weight + multiplier * w, base.bias + multiplier * b
    if isinstance(base, nn.LayerNorm):
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
    return F.group_norm(x, base.num_groups, weight, bias, base.eps)


@pytest.mark.parametrize("kind", list(BASES))
def test_norm_module_matches_lycoris_both_ways(kind):
    make_base, x_shape = BASES[kind]
    torch.manual_seed(0)
    base, x = make_base(), torch.randn(*x_shape)
    with torch.no_grad():
        base.weight.normal_(1, 0.2)
        base.bias.normal_(0, 0.2)
    theirs = NormModule(NAME, base, 1.0)
    with torch.no_grad():
        theirs.w_norm.normal_(0, 0.5)
        theirs.b_norm.normal_(0, 0.5)
    file = {f"{NAME}.{k}": v.clone() for k, v in theirs.state_dict().items()}
    assert set(file) == {f"{NAME}.w_norm", f"{NAME}.b_norm"}
    ours = layer_from_file(base, parse_state_dict(file)[NAME], NAME, "test")
    assert isinstance(ours, NormLayer)
    for multiplier in (1.0, 0.6):
        theirs.multiplier = ours.multiplier = multiplier
        y_ours = run(base, x, ours)
        torch.testing.assert_close(y_ours, run(base, x, theirs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y_ours, expected(base, x, theirs.w_norm.detach(), theirs.b_norm.detach(),
                                                    multiplier), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.5)
    ours.multiplier = 1.0
    tensors = LoRANetwork({NAME: ours}, rank=1, alpha=1, network_module="lycoris.kohya").file_tensors()
    kind_, params = get_module(tensors, NAME)
    assert kind_ is NormModule
    torch.testing.assert_close(run(base, x, make_module(kind_, params, NAME, base)), run(base, x, ours),
                               rtol=1e-5, atol=1e-5)
    # merging adds to the weight and the bias, unmerging takes both back
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    ours.apply_to()
    ours.merge()
    torch.testing.assert_close(base.bias.detach(), bias + ours.b_norm.detach())
    ours.unmerge()
    ours.remove()
    torch.testing.assert_close(base.weight.detach(), weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(base.bias.detach(), bias, rtol=0, atol=1e-6)


def test_train_norm_network_is_lycoris_one(tmp_path, monkeypatch):
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    x, t, context = unet_inputs()
    ours = create_network(unet, text_encoder, rank=4, alpha=2, algo="lora", train_norm=True)
    norms = {n for n, layer in ours.layers().items() if isinstance(layer, NormLayer)}
    assert len(norms) == 108 and ours.network_args["train_norm"] is True
    g = torch.Generator().manual_seed(5)
    for p in ours.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    with torch.no_grad():
        y_ours = unet(x, t, context).sample, text_encoder(text_ids(length=12)).last_hidden_state
    path = tmp_path / "norm.safetensors"
    ours.save_weights(path)
    ours.remove()

    lycoris_full_preset_for_diffusers(monkeypatch)
    theirs = lycoris_kohya.create_network(1.0, 4, 2, None, text_encoder, unet, algo="lora", train_norm="True")
    theirs.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    names = {m.lora_name.replace("lora_te_", "lora_te_text_model_") for m in theirs.unet_loras +
             theirs.text_encoder_loras}
    assert names == set(ours.layers())
    assert {m.lora_name for m in theirs.unet_loras if isinstance(m, NormModule)} == norms
    renamed = tmp_path / "for_lycoris.safetensors"
    save_file({k.replace("lora_te_text_model_", "lora_te_"): v for k, v in load_file(str(path)).items()}, str(renamed))
    assert not theirs.load_weights(str(renamed))  # no missing, no unexpected key
    with torch.no_grad():
        y_theirs = unet(x, t, context).sample, text_encoder(text_ids(length=12)).last_hidden_state
    for a, b in zip(y_ours, y_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for module in theirs.unet_loras + theirs.text_encoder_loras:
        module.restore()
    loaded = load_network(path, unet, text_encoder)
    assert sum(isinstance(layer, NormLayer) for layer in loaded.layers().values()) == 108
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context).sample, y_ours[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="train_norm.*algo="):
        create_network(unet, None, train_norm=True)
    with pytest.raises(ValueError, match="not supported"):
        create_network(unet, None, algo="norm")
