"""GLoRA (LyCORIS' algo=glora) against the lycoris-lora package and against its formula written out here:
dW = (W @ a1 @ a2 + b1 @ b2) * alpha / r on the base weight's input side."""

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import build_tiny_text_encoder, build_tiny_unet, lycoris_full_preset_for_diffusers, text_ids, unet_inputs

pytest.importorskip("lycoris")
import lycoris.kohya as lycoris_kohya  # noqa: E402
from lycoris.modules import GLoRAModule, get_module, make_module  # noqa: E402

from lora_diffusion import create_network, load_network  # noqa: E402
from lora_diffusion.core.adapters import GLoRALayer  # noqa: E402
from lora_diffusion.core.kohya import LoRAFileError, parse_state_dict  # noqa: E402
from lora_diffusion.core.network import LoRANetwork, layer_from_file  # noqa: E402
from test_adapters_ia3 import run  # noqa: E402  (base(x) with a module applied)

logging.getLogger("lycoris").setLevel(logging.ERROR)
NAME = "lora_unet_x"
BASES = {
    "linear": (lambda: nn.Linear(24, 40), (3, 5, 24)),
    "conv3x3": (lambda: nn.Conv2d(16, 24, 3, padding=1, stride=2), (2, 16, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(16, 24, 1), (2, 16, 6, 6)),
}


def expected_delta(weight, t, alpha):
    """GLoRA's update, written out over flattened matrices: W @ (a1 @ a2) on the input channels, + b1 @ b2."""
    out_dim, in_dim = weight.shape[:2]
    a = t["a1.weight"].reshape(in_dim, -1) @ t["a2.weight"].reshape(-1, in_dim)
    rank = t["a2.weight"].shape[0]
    w = weight.reshape(out_dim, in_dim, -1)  # [out, in, k*k]
    wa = (w.permute(0, 2, 1) @ a).permute(0, 2, 1).reshape(weight.shape)
    wb = (t["b1.weight"].reshape(out_dim, rank) @ t["b2.weight"].reshape(rank, -1)).reshape(weight.shape)
    return (wa + wb) * alpha / rank


@pytest.mark.parametrize("base_kind", list(BASES))
def test_glora_module_matches_lycoris_both_ways(base_kind):
    make_base, x_shape = BASES[base_kind]
    torch.manual_seed(0)
    base, x = make_base(), torch.randn(*x_shape)
    theirs = GLoRAModule(NAME, base, 1.0, lora_dim=4, alpha=2)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
        plain = base(x)
    file = {f"{NAME}.{k}": v.clone() for k, v in theirs.state_dict().items()}
    assert set(file) == {f"{NAME}.{k}" for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha")}
    weights = parse_state_dict(file)[NAME]
    assert weights.label == "GLoRA" and weights.rank == 4
    ours = layer_from_file(base, weights, NAME, "test")
    torch.testing.assert_close(ours.delta_weight(), theirs.get_diff_weight()[0].reshape(base.weight.shape).detach())
    unprefixed = {k.removeprefix(NAME + "."): v.detach() for k, v in file.items()}
    torch.testing.assert_close(ours.delta_weight(), expected_delta(base.weight.detach(), unprefixed, 2.0))
    for multiplier in (1.0, 0.6):
        theirs.multiplier = ours.multiplier = multiplier
        y_theirs, y_ours = run(base, x, theirs), run(base, x, ours)
        assert (y_theirs - plain).abs().max() > 1e-2
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)

    # ours, other weights, through our writer and LyCORIS' own loader (get_module + make_module)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ours.multiplier = 1.0
    tensors = LoRANetwork({NAME: ours}, rank=4, alpha=2, network_module="lycoris.kohya").file_tensors()
    assert set(tensors) == set(file)
    kind, params = get_module(tensors, NAME)
    assert kind is GLoRAModule
    loaded = make_module(kind, params, NAME, base)
    torch.testing.assert_close(run(base, x, loaded), run(base, x, ours), rtol=1e-5, atol=1e-5)

    # merge / unmerge around a base-dependent update
    before = base.weight.detach().clone()
    ours.apply_to()
    ours.merge()
    written = {k.removeprefix(NAME + "."): v.detach() for k, v in tensors.items()}
    torch.testing.assert_close(base.weight.detach(), before + expected_delta(before, written, 2.0))
    ours.unmerge()
    ours.remove()
    torch.testing.assert_close(base.weight, before, rtol=0, atol=1e-6)


def test_glora_network_has_lycoris_targets_and_loads_there(tmp_path, monkeypatch):
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    x, t, context = unet_inputs()
    ids = text_ids(length=12)
    with torch.no_grad():
        plain = unet(x, t, context).sample
    ours = create_network(unet, text_encoder, rank=4, alpha=2, algo="glora")
    assert ours.network_args["algo"] == "glora"
    g = torch.Generator().manual_seed(4)
    for p in ours.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    with torch.no_grad():
        y_ours = unet(x, t, context).sample, text_encoder(ids).last_hidden_state
    path = tmp_path / "glora.safetensors"
    ours.save_weights(path)
    ours.remove()

    lycoris_full_preset_for_diffusers(monkeypatch)
    theirs = lycoris_kohya.create_network(1.0, 4, 2, None, text_encoder, unet, algo="glora")
    theirs.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    assert {m.lora_name.replace("lora_te_", "lora_te_text_model_") for m in
            theirs.unet_loras + theirs.text_encoder_loras} == set(ours.layers())
    renamed = tmp_path / "for_lycoris.safetensors"
    save_file({k.replace("lora_te_text_model_", "lora_te_"): v for k, v in load_file(str(path)).items()}, str(renamed))
    assert not theirs.load_weights(str(renamed))  # no missing, no unexpected key
    with torch.no_grad():
        y_theirs = unet(x, t, context).sample, text_encoder(ids).last_hidden_state
    assert (y_theirs[0] - plain).abs().max() > 1e-2
    for a, b in zip(y_ours, y_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for module in theirs.unet_loras + theirs.text_encoder_loras:
        module.restore()
    loaded = load_network(renamed, unet, text_encoder)  # LyCORIS' text-encoder spelling too
    assert {type(layer) for layer in loaded.layers().values()} == {GLoRALayer}
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context).sample, y_ours[0], rtol=1e-4, atol=1e-5)


def test_glora_refusals():
    unet = build_tiny_unet()
    for option in (dict(dropout=0.1), dict(rank_dropout=0.1), dict(dora_wd=True)):
        with pytest.raises(ValueError, match=next(iter(option))):
            create_network(unet, None, algo="glora", **option)
    t = {f"{NAME}.a1.weight": torch.zeros(8, 2), f"{NAME}.a2.weight": torch.zeros(2, 8),
         f"{NAME}.b1.weight": torch.zeros(8, 2), f"{NAME}.b2.weight": torch.zeros(3, 8)}
    with pytest.raises(LoRAFileError, match="do not fit together"):
        parse_state_dict(t)
    with pytest.raises(LoRAFileError, match="Tucker GLoRA"):
        parse_state_dict({**t, f"{NAME}.bm.weight": torch.zeros(2, 2, 3, 3)})
