"""iA3 (LyCORIS' algo=ia3) against the lycoris-lora package: LyCORIS' modules' tensors load in ours with the same
outputs and merged weights, ours load in LyCORIS' modules and network, trainer-shaped networks have LyCORIS' targets,
and the update is the formula W * (1 + m * w) along the chosen axis."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from conftest import build_tiny_text_encoder, build_tiny_unet, text_ids, unet_inputs

pytest.importorskip("lycoris")
import lycoris.kohya as lycoris_kohya  # noqa: E402
from lycoris.config import PRESET  # noqa: E402
from lycoris.modules import IA3Module  # noqa: E402

from lora_diffusion import create_network, load_network  # noqa: E402
from lora_diffusion.core.adapters import ALGORITHMS, IA3Layer  # noqa: E402
from lora_diffusion.core.kohya import LoRAFileError, parse_state_dict  # noqa: E402
from lora_diffusion.core.network import LoRANetwork, layer_from_file  # noqa: E402
from test_lycoris import BASES, NAME  # noqa: E402  (the same bases as the other LyCORIS algorithms)

logging.getLogger("lycoris").setLevel(logging.ERROR)
CASES = [(b, on_input) for b in BASES for on_input in (False, True)]


def expected_weight(weight, w, on_input, multiplier):
    """The iA3 formula, written out: W' = W * (1 + m * w), w on W's input (dim 1) or output (dim 0) channels."""
    w = w.reshape(-1)
    if on_input:
        scale = w.reshape(1, -1, *[1] * (weight.dim() - 2))
    else:
        scale = w.reshape(-1, *[1] * (weight.dim() - 1))
    return weight * (1 + multiplier * scale)


def run(base, x, module=None):
    """base(x), with `module` applied (a LyCORIS module or one of ours) and taken off again."""
    if module is not None:
        module.apply_to()
    with torch.no_grad():
        y = base(x)
    if module is not None:
        module.restore() if hasattr(module, "restore") else module.remove()
    return y


@pytest.mark.parametrize("base_kind,on_input", CASES, ids=[f"{b}-{'in' if i else 'out'}" for b, i in CASES])
def test_ia3_module_matches_lycoris_both_ways(base_kind, on_input):
    make_base, x_shape = BASES[base_kind]
    torch.manual_seed(0)
    base, x = make_base(), torch.randn(*x_shape)
    theirs = IA3Module(NAME, base, 1.0, train_on_input=on_input)
    with torch.no_grad():
        theirs.weight.normal_(0, 0.5)
    plain = run(base, x)

    # (a) LyCORIS' state dict (its file keys) read by our reader, built as our layer
    file = {f"{NAME}.{k}": v for k, v in theirs.state_dict().items()}
    assert set(file) == {f"{NAME}.weight", f"{NAME}.on_input"}
    weights = parse_state_dict(file)[NAME]
    assert weights.label == "iA3"
    ours = layer_from_file(base, weights, NAME, "test")
    assert isinstance(ours, IA3Layer) and ours.train_on_input == on_input
    for multiplier in (1.0, 0.6):
        theirs.multiplier = ours.multiplier = multiplier
        y_theirs, y_ours = run(base, x, theirs), run(base, x, ours)
        assert (y_theirs - plain).abs().max() > 1e-2
        torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
        merged = base.weight + multiplier * ours.delta_weight()
        torch.testing.assert_close(merged, theirs.get_merged_weight(multiplier)[0].reshape(merged.shape).detach())
        torch.testing.assert_close(merged, expected_weight(base.weight, theirs.weight.detach(), on_input, multiplier))

    # (b) our layer, other weights, written by our writer, loaded strictly by a LyCORIS module
    with torch.no_grad():
        ours.weight.normal_(0, 0.5)
    ours.multiplier = 1.0
    tensors = LoRANetwork({NAME: ours}, rank=1, alpha=1, network_module="lycoris.kohya").file_tensors()
    loaded = IA3Module(NAME, base, 1.0, train_on_input=on_input)
    loaded.load_state_dict({k.removeprefix(NAME + "."): v for k, v in tensors.items()}, strict=True)
    torch.testing.assert_close(run(base, x, loaded), run(base, x, ours), rtol=1e-5, atol=1e-5)

    # merge / unmerge: the update depends on the base weight, so unmerging takes back what merging added
    before = base.weight.detach().clone()
    y = run(base, x, ours)
    ours.apply_to()
    ours.merge()
    torch.testing.assert_close(base.weight, expected_weight(before, ours.weight.detach(), on_input, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)
    ours.unmerge()
    ours.remove()
    torch.testing.assert_close(base.weight, before, rtol=0, atol=1e-6)


def lycoris_ia3_network(unet, text_encoder, monkeypatch, **network_args):
    """lycoris.kohya.create_network(algo=ia3), as kohya's train_network.py calls it; with the "full" preset minus
    its `TimestepEmbedding` class entry, which duplicates the time_embedding names on a diffusers SD U-Net."""
    preset = dict(PRESET["full"])
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    monkeypatch.setitem(lycoris_kohya.PRESET, "full", preset)
    network = lycoris_kohya.create_network(1.0, 4, 2, None, text_encoder, unet, algo="ia3", **network_args)
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    return network


def outputs(unet, text_encoder):
    x, t, context = unet_inputs()
    with torch.no_grad():
        return unet(x, t, context).sample, text_encoder(text_ids(length=12)).last_hidden_state


def for_lycoris(tensors):
    """Our text-encoder names in the spelling LyCORIS finds on a transformers-5 CLIPTextModel (no `text_model.`)."""
    return {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}


def test_ia3_network_loads_in_lycoris_and_lycoris_files_load_in_ours(tmp_path, monkeypatch):
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    plain = outputs(unet, text_encoder)
    ours = create_network(unet, text_encoder, rank=4, alpha=2, algo="ia3")
    assert all(isinstance(layer, IA3Layer) for layer in ours.layers().values())
    assert ours.network_module == "lycoris.kohya" and ours.network_args["algo"] == "ia3"
    g = torch.Generator().manual_seed(3)
    for p in ours.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.2
    y_ours = outputs(unet, text_encoder)
    path = tmp_path / "ia3.safetensors"
    ours.save_weights(path)
    ours.remove()

    theirs = lycoris_ia3_network(unet, text_encoder, monkeypatch)
    names = {m.lora_name.replace("lora_te_", "lora_te_text_model_") for m in theirs.unet_loras +
             theirs.text_encoder_loras}
    assert names == set(ours.layers())  # LyCORIS' targets: 282 U-Net + 72 text-encoder modules on SD1.5's layout
    assert len(theirs.unet_loras) == 282 and len(theirs.text_encoder_loras) == 72
    lycoris_file = tmp_path / "for_lycoris.safetensors"
    save_file(for_lycoris(parse_file(path)), str(lycoris_file))
    state = theirs.load_weights(str(lycoris_file))
    assert not state, state  # no missing, no unexpected key: LyCORIS' exact key set
    y_theirs = outputs(unet, text_encoder)
    for a, b, p in zip(y_ours, y_theirs, plain):
        assert (a - p).abs().max() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # LyCORIS' own file (its save_weights, on_input as it stores it) loads in ours with the same outputs
    with torch.no_grad():
        for module in theirs.unet_loras + theirs.text_encoder_loras:
            module.weight.mul_(-0.5)
    y_theirs = outputs(unet, text_encoder)
    written = tmp_path / "lycoris_written.safetensors"
    theirs.save_weights(str(written), torch.float16, None)
    for module in theirs.unet_loras + theirs.text_encoder_loras:
        module.restore()
    loaded = load_network(written, unet, text_encoder)
    assert {type(layer) for layer in loaded.layers().values()} == {IA3Layer}
    for a, b in zip(outputs(unet, text_encoder), y_theirs):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # the file is fp16


def parse_file(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_lycoris_kohya_create_network_drops_train_on_input(monkeypatch):
    """What kohya_ss' "LyCORIS/iA3" (`preset=full ... train_on_input=True algo=ia3`) gets from lycoris-lora 4.1.3:
    create_network does not pass train_on_input to the modules, so every module scales its output. Ours honours
    the option; the trainer decides which to follow (see docs/format.md)."""
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    theirs = lycoris_ia3_network(unet, text_encoder, monkeypatch, train_on_input="True")
    assert {int(m.on_input) for m in theirs.unet_loras + theirs.text_encoder_loras} == {0}
    ours = create_network(build_tiny_unet(), build_tiny_text_encoder(), algo="ia3", train_on_input=True)
    assert {layer.train_on_input for layer in ours.layers().values()} == {True}
    assert ours.network_args["train_on_input"] is True


def test_ia3_trains_only_its_scales_and_round_trips_through_a_file(tmp_path):
    unet = build_tiny_unet()
    network = create_network(unet, None, algo="ia3", train_on_input=True, include=[r"attentions"])
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in network.parameters()}
    assert all(p.dim() in (1, 4) for p in trainable)
    x, t, context = unet_inputs()
    unet(x, t, context).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    with torch.no_grad():
        for p in trainable:
            p.normal_(0, 0.3)
        y = unet(x, t, context).sample
    path = tmp_path / "ia3.safetensors"
    network.save_weights(path, dtype=torch.float16)
    file = parse_file(path)
    assert not any(k.endswith(".alpha") for k in file)  # LyCORIS' iA3 has no alpha
    assert all(float(v) == 1 for k, v in file.items() if k.endswith(".on_input"))
    network.remove()
    loaded = load_network(path, unet, None)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context).sample, y, rtol=2e-3, atol=2e-3)
    loaded.remove()
    # loading into a network of the other side is refused (the shapes may even agree)
    other = create_network(unet, None, algo="ia3", include=[r"attentions"])
    with pytest.raises(LoRAFileError, match="on_input"):
        other.load_weights(path)


def test_ia3_refuses_what_it_cannot_do():
    unet = build_tiny_unet()
    for option in (dict(dropout=0.1), dict(rank_dropout=0.1), dict(dora_wd=True)):
        with pytest.raises(ValueError, match=next(iter(option))):
            create_network(unet, None, algo="ia3", **option)
    with pytest.raises(ValueError, match="train_on_input.*algo="):
        create_network(unet, None, train_on_input=True)
    with pytest.raises(LoRAFileError, match="on_input"):
        parse_state_dict({f"{NAME}.weight": torch.ones(4), f"{NAME}.on_input": torch.tensor(2)})
    with pytest.raises(LoRAFileError, match="one algorithm"):
        parse_state_dict({f"{NAME}.weight": torch.ones(4), f"{NAME}.on_input": torch.tensor(1),
                          f"{NAME}.hada_w1_a": torch.ones(4, 1)})
    assert ALGORITHMS["ia3"] is IA3Layer
