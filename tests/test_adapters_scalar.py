"""LyCORIS' use_scalar, rank_dropout_scale and bypass_mode on LoRA/LoHa/LoKr, against lycoris-lora's modules (same
outputs with the same parameters; the file holds the scalar folded in, as LyCORIS' custom_state_dict writes it) and
against the rank-dropout rule written out here."""

import logging

import pytest
import torch
from torch import nn

from conftest import build_tiny_unet

pytest.importorskip("lycoris")
from lycoris.modules import LoConModule, LohaModule, LokrModule, get_module, make_module  # noqa: E402

from lora_diffusion import create_network  # noqa: E402
from lora_diffusion.core.adapters import LoHaLayer, LoKrLayer, LoRALayer  # noqa: E402
from lora_diffusion.core.kohya import parse_state_dict  # noqa: E402
from lora_diffusion.core.network import LoRANetwork  # noqa: E402

logging.getLogger("lycoris").setLevel(logging.ERROR)
NAME = "lora_unet_x"
CASES = {  # ours, theirs (our tensor names are LyCORIS' parameter names)
    "lora": (lambda b: LoRALayer(b, 4, 2, use_scalar=True), lambda b: LoConModule(NAME, b, 1.0, 4, 2, use_scalar=True)),
    "loha": (lambda b: LoHaLayer(b, 4, 2, use_scalar=True), lambda b: LohaModule(NAME, b, 1.0, 4, 2, use_scalar=True)),
    "lokr": (lambda b: LoKrLayer(b, 2, 1, decompose_both=True, factor=4, use_scalar=True),
             lambda b: LokrModule(NAME, b, 1.0, 2, 1, decompose_both=True, factor=4, use_scalar=True)),
}


def params_of(layer):
    if isinstance(layer, LoRALayer):
        return {"lora_down.weight": layer.lora_down.weight, "lora_up.weight": layer.lora_up.weight}
    return layer._tensors()


@pytest.mark.parametrize("case", list(CASES))
def test_use_scalar_matches_lycoris(case):
    make_ours, make_theirs = CASES[case]
    torch.manual_seed(0)
    base, x = nn.Linear(32, 48), torch.randn(3, 32)
    ours = make_ours(base)
    assert float(ours.scalar.detach()) == 0 and float(ours.delta_weight().detach().abs().max()) == 0  # no change
    assert all(float(t.abs().max()) > 0 for t in params_of(ours).values())  # ... though no factor is zero
    with torch.no_grad():
        ours.scalar.fill_(0.7)
    theirs = make_theirs(base)
    with torch.no_grad():
        for key, tensor in params_of(ours).items():
            theirs.get_parameter(key).copy_(tensor)
        theirs.scalar.copy_(ours.scalar)
    ours.apply_to()
    with torch.no_grad():
        y_ours = base(x)
    ours.remove()
    theirs.apply_to()
    with torch.no_grad():
        y_theirs = base(x)
    theirs.restore()
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    # the file: LyCORIS' custom_state_dict (the scalar folded into one factor), read back with scalar 1
    tensors = LoRANetwork({NAME: ours}, rank=ours.rank, alpha=ours.alpha.item()).file_tensors()
    custom = theirs.custom_state_dict()
    assert set(tensors) == {f"{NAME}.{k}" for k in custom}
    for key, value in custom.items():
        ours_tensor = tensors[f"{NAME}.{key}"]
        torch.testing.assert_close(ours_tensor, value.detach().float().reshape(ours_tensor.shape))
    loaded = make_module(*get_module(tensors, NAME), NAME, base)  # LyCORIS' loader, its scalar 1
    loaded.apply_to()
    with torch.no_grad():
        y_loaded = base(x)
    loaded.restore()
    torch.testing.assert_close(y_loaded, y_ours, rtol=1e-5, atol=1e-6)
    fresh = make_ours(base)
    fresh.load_file(parse_state_dict(tensors)[NAME], "test")
    assert float(fresh.scalar.detach()) == 1
    torch.testing.assert_close(fresh.delta_weight(), ours.delta_weight(), rtol=1e-5, atol=1e-6)


def test_rank_dropout_scale_divides_by_the_mask_mean():
    torch.manual_seed(1)
    base = nn.Linear(16, 12)
    layer = LoHaLayer(base, 4, 2, rank_dropout=0.5, rank_dropout_scale=True)
    with torch.no_grad():
        layer.hada_w2_a.normal_()
    layer.train()
    torch.manual_seed(7)
    delta = layer.training_delta()
    torch.manual_seed(7)
    keep = (torch.rand(12) > 0.5).float()  # LyCORIS: whole output rows kept with 1 - p, then / mean
    torch.testing.assert_close(delta, layer.delta_weight() * (keep / keep.mean())[:, None])


def test_network_options_are_lycoris_only_and_recorded():
    unet = build_tiny_unet()
    network = create_network(unet, None, rank=4, algo="loha", use_scalar=True, rank_dropout_scale=True,
                             bypass_mode=True, include=[r"attn1"])
    assert all(layer.scalar is not None and layer.rank_dropout_scale for layer in network.layers().values())
    assert {k: network.network_args[k] for k in ("use_scalar", "rank_dropout_scale", "bypass_mode")} == \
        {"use_scalar": True, "rank_dropout_scale": True, "bypass_mode": True}
    network.remove()
    for option in ("use_scalar", "rank_dropout_scale", "bypass_mode"):
        with pytest.raises(ValueError, match=f"{option}.*algo="):
            create_network(unet, None, rank=4, **{option: True})
    with pytest.raises(ValueError, match="use_scalar"):
        create_network(unet, None, rank=4, algo="glora", use_scalar=True)
