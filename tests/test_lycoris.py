"""LoHa, LoKr and DoRA against the LyCORIS package itself (lycoris-lora): its modules' files load in ours with the
same outputs, ours load in LyCORIS with the same outputs, trainer files load in both, the target names are
LyCORIS', and `merge` adds LyCORIS' update."""

import contextlib
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import build_tiny_text_encoder, build_tiny_unet, unet_inputs

lycoris = pytest.importorskip("lycoris")
from lycoris.config import PRESET  # noqa: E402
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights  # noqa: E402
from lycoris.modules import LoConModule, LohaModule, LokrModule, get_module, make_module  # noqa: E402

from lora_diffusion import create_network, load_network  # noqa: E402
from lora_diffusion.core.kohya import LoRAFileError, parse_state_dict  # noqa: E402
from lora_diffusion.core.network import LoRANetwork, layer_from_file  # noqa: E402
from lora_diffusion.core.targets import text_encoder_targets, unet_targets  # noqa: E402

logging.getLogger("lycoris").setLevel(logging.ERROR)
NAME = "lora_unet_x"

BASES = {
    "linear": (lambda: nn.Linear(64, 96), (3, 5, 64)),
    "conv3x3": (lambda: nn.Conv2d(32, 48, 3, padding=1), (2, 32, 6, 6)),
    "conv1x1": (lambda: nn.Conv2d(32, 48, 1), (2, 32, 6, 6)),
}
# name: (LyCORIS class, its arguments, which bases)
CASES = {
    "loha": (LohaModule, dict(lora_dim=4, alpha=2), ("linear", "conv3x3", "conv1x1")),
    "loha-tucker": (LohaModule, dict(lora_dim=4, alpha=2, use_tucker=True), ("conv3x3",)),
    "lokr-full": (LokrModule, dict(lora_dim=64, alpha=2, factor=8), ("linear", "conv3x3", "conv1x1")),
    "lokr-decomposed": (LokrModule, dict(lora_dim=2, alpha=1, decompose_both=True), ("linear", "conv3x3", "conv1x1")),
    "lokr-tucker": (LokrModule, dict(lora_dim=2, alpha=1, use_tucker=True), ("conv3x3",)),  # w2 = tucker(t2, ...)
    "dora-lora": (LoConModule, dict(lora_dim=4, alpha=2, weight_decompose=True), ("linear", "conv1x1")),
    "dora-locon": (LoConModule, dict(lora_dim=4, alpha=2, weight_decompose=True), ("conv3x3",)),
    "dora-loha": (LohaModule, dict(lora_dim=4, alpha=2, weight_decompose=True), ("linear", "conv3x3")),
}
PARAMS = [(c, b, d) for c, (_, _, bases) in CASES.items() for b in bases for d in ("fp32", "fp16")]


def output_with(adapter, base, x, multiplier, undo):
    """base(x) with the adapter applied at `multiplier`, then taken off again by its `undo` method."""
    adapter.multiplier = multiplier
    adapter.apply_to()
    with torch.no_grad():
        y = base(x)
    getattr(adapter, undo)()
    return y


def lycoris_output(module, base, x, multiplier):
    return output_with(module, base, x, multiplier, "restore")


def our_output(layer, base, x, multiplier):
    return output_with(layer, base, x, multiplier, "remove")


def assert_same_outputs(theirs, ours, plain):
    """Equal up to fp32 rounding, relative to the size of the update."""
    effect = (theirs - plain).abs().max()
    assert effect > 1e-2, "the module does nothing: the comparison would prove nothing"
    assert (theirs - ours).abs().max() <= 1e-5 * effect + 1e-6


@pytest.mark.parametrize("case,base_kind,dtype", PARAMS, ids=[f"{c}-{b}-{d}" for c, b, d in PARAMS])
def test_lycoris_files_load_in_ours_and_ours_in_lycoris(case, base_kind, dtype):
    cls, kwargs, _ = CASES[case]
    make_base, x_shape = BASES[base_kind]
    torch.manual_seed(0)
    base, x = make_base(), torch.randn(*x_shape)
    storage = torch.float16 if dtype == "fp16" else torch.float32
    theirs = cls(NAME, base, 1.0, **kwargs)
    random = {k: (v if k == "alpha" else torch.randn_like(v) * 0.3 + (1.0 if k == "dora_scale" else 0.0))
              for k, v in theirs.state_dict().items()}
    random = {k: v.to(storage).float() for k, v in random.items()}  # values the file can hold exactly
    theirs.load_state_dict(random)
    with torch.no_grad():
        plain = base(x)

    # (a) LyCORIS' module, saved with LyCORIS' key names, read by our file reader and loaded as our layer
    file = {f"{NAME}.{k}": v.to(storage) for k, v in random.items()}
    weights = parse_state_dict(file)[NAME]
    ours = layer_from_file(base, weights, NAME, "test")
    for multiplier in (1.0, 0.6):
        assert_same_outputs(lycoris_output(theirs, base, x, multiplier), our_output(ours, base, x, multiplier),
                            plain)
    # delta_weight (multiplier 1) is what LyCORIS' forward adds: dW for LoRA/LoHa/LoKr, W_dora - W for DoRA.
    # (lycoris-lora 4.1.3's LoHa/LoKr get_diff_weight applies alpha/r twice, its forward and ComfyUI once.)
    diff = theirs.get_diff_weight()[0] if cls is LoConModule else theirs.get_weight(theirs.shape)
    expected = diff if weights.dora_scale is None else \
        theirs.apply_weight_decompose(base.weight + diff.reshape(base.weight.shape), 1.0) - base.weight
    delta = ours.dora_weight(1.0) - base.weight if ours.is_dora else ours.delta_weight()
    torch.testing.assert_close(delta, expected.reshape(delta.shape).detach(), rtol=1e-5, atol=1e-6)

    # (b) our layer with other random weights, written by our writer, loaded by LyCORIS' own loader
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_((torch.randn_like(p) * 0.3 + (1.0 if p is ours.dora_scale else 0.0)).to(storage).float())
    network = LoRANetwork({NAME: ours}, rank=ours.rank, alpha=ours.alpha.item(), network_module="lycoris.kohya")
    tensors = network.file_tensors(dtype=storage)
    assert all(t.dtype == storage for t in tensors.values())
    assert set(tensors) == {f"{NAME}.{k}" for k in theirs.state_dict()}  # LyCORIS' exact key set
    kind, params = get_module(tensors, NAME)
    if case != "lokr-full":  # make_module reads a LoKr whose factors are both full as lora_dim 1: equal outputs
        assert kind is cls
    if case == "lokr-tucker":
        # lycoris-lora 4.1.3's make_module misreads a Tucker LoKr's w2 shape (it builds a full w2, then fails);
        # its networks' load_weights (the state dict into modules made with the run's options) reads it
        loaded = cls(NAME, base, 1.0, **kwargs)
        loaded.load_state_dict({k.removeprefix(NAME + "."): v.float() for k, v in tensors.items()}, strict=True)
    else:
        loaded = make_module(kind, params, NAME, base)
    loaded.float()
    assert_same_outputs(lycoris_output(loaded, base, x, 1.0), our_output(ours, base, x, 1.0), plain)


@contextlib.contextmanager
def sd_preset():
    """LyCORIS' default preset ("full"), usable on a diffusers SD U-Net. lycoris-lora 4.1.3 lists both
    `time_embedding.linear_1/2` by name and `TimestepEmbedding` by class, which creates those modules twice and fails
    its own duplicate check; without the class entry the targets are the same modules, once."""
    preset = dict(PRESET["full"])
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    LycorisNetworkKohya.apply_preset(preset)
    try:
        yield
    finally:
        LycorisNetworkKohya.apply_preset(PRESET["full"])


def lycoris_network(unet, text_encoder, algo, **kwargs):
    with sd_preset():
        return LycorisNetworkKohya(text_encoder, unet, lora_dim=4, conv_lora_dim=4, alpha=4, conv_alpha=2,
                                   network_module=algo, **kwargs)


def lycoris_from_weights(tensors, unet, text_encoder=None):
    with sd_preset():
        network, _ = create_network_from_weights(1.0, None, None, text_encoder, unet, weights_sd=for_lycoris(tensors))
    network.apply_to(text_encoder, unet, apply_text_encoder=text_encoder is not None, apply_unet=True)
    return network


def test_targets_are_lycoris_defaults():
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    theirs = lycoris_network(unet, text_encoder, "loha")
    ours = {t.name for t in unet_targets(unet, conv=True, lycoris=True)}
    assert ours == {m.lora_name for m in theirs.unet_loras}
    # LyCORIS names the text encoder by the installed transformers' paths (5: no `text_model.`); we always write
    # the transformers-4 spelling, which every loader (and LyCORIS under transformers 4) uses
    te = {t.name.replace("lora_te_text_model_", "lora_te_") for t in text_encoder_targets(text_encoder)}
    assert te == {m.lora_name.replace("lora_te_text_model_", "lora_te_") for m in theirs.text_encoder_loras}
    network = create_network(unet, text_encoder, rank=4, alpha=4, conv_alpha=2, algo="loha")
    assert len(network.layers()) == len(ours) + len(te)
    assert all(type(layer).__name__ == "LoHaLayer" for layer in network.layers().values())


def for_lycoris(tensors):
    """Our file's text-encoder names in the spelling LyCORIS finds on a transformers-5 CLIPTextModel."""
    return {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in tensors.items()}


def test_mixed_file_loads_like_lycoris(tmp_path):
    """LoRA on the attention modules + LoHa on the ResNet convs + DoRA LoKr on the time embedding, in one file."""
    unet = build_tiny_unet()
    parts = [create_network(unet, None, rank=4, alpha=2, algo="lora", include=[r"attentions"]),
             create_network(unet, None, rank=4, alpha=2, algo="loha", include=[r"resnets"]),
             create_network(unet, None, rank=2, alpha=1, algo="lokr", dora_wd=True, include=[r"^time_embedding"])]
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for network in parts:
        for name, p in network.named_parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.05 + (p.data if "dora_scale" in name else 0)
        tensors.update(network.file_tensors())
        network.remove()
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    ours = load_network(str(path), unet, None)
    kinds = {type(layer).__name__ for layer in ours.layers().values()}
    assert kinds == {"LoRALayer", "LoHaLayer", "LoKrLayer"} and ours.network_module == "lycoris.kohya"
    x, t, context = unet_inputs()
    with torch.no_grad():
        y_ours = unet(x, t, context).sample
        ours.remove()
        plain = unet(x, t, context).sample
    theirs = lycoris_from_weights(tensors, unet)
    assert len(theirs.unet_loras) == len(ours.layers())
    with torch.no_grad():
        y_theirs = unet(x, t, context).sample
    assert_same_outputs(y_theirs, y_ours, plain)


def test_unsupported_lycoris_formats_are_refused(tmp_path):
    for keys, kind in (({"oft_blocks": torch.zeros(4, 8, 8)}, "OFT"), ({"diff": torch.zeros(32, 32)}, "full"),
                       ({"lora_mid.weight": torch.zeros(4, 4, 3, 3), "lora_down.weight": torch.zeros(4, 32, 1, 1),
                         "lora_up.weight": torch.zeros(32, 4, 1, 1)}, "Tucker")):
        with pytest.raises(LoRAFileError, match=kind):
            parse_state_dict({f"{NAME}.{k}": v for k, v in keys.items()})
    with pytest.raises(LoRAFileError, match="LoHa.*hada_w2_a"):  # an incomplete LoHa names what it lacks
        parse_state_dict({f"{NAME}.hada_w1_a": torch.zeros(8, 2), f"{NAME}.hada_w1_b": torch.zeros(2, 8)})
    with pytest.raises(LoRAFileError, match="do not fit"):
        parse_state_dict({f"{NAME}.lokr_w1": torch.zeros(2, 2), f"{NAME}.lokr_w2_a": torch.zeros(4, 2),
                          f"{NAME}.lokr_w2_b": torch.zeros(3, 4)})


def test_trainer_lycoris_loha_file_loads_in_ours_and_lycoris(tmp_path):
    import train_lora
    from test_train import base_flags, make_dataset, read

    data = make_dataset(tmp_path, n=2)
    argv = base_flags(tmp_path, data, max_train_steps=2, learning_rate=1e-2, network_module="lycoris.kohya",
                      network_args=["algo=loha", "conv_dim=4", "conv_alpha=2"], save_precision="fp16")
    assert train_lora.main(argv) == 0
    path = tmp_path / "out" / "t.safetensors"
    tensors, metadata = read(path)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert '"algo": "loha"' in metadata["ss_network_args"]
    assert any(k.endswith("hada_w1_a") for k in tensors) and not any("lora_down" in k for k in tensors)
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    ours = load_network(str(path), unet, text_encoder)
    assert {type(layer).__name__ for layer in ours.layers().values()} == {"LoHaLayer"}
    trained = [n for n, v in tensors.items() if n.endswith("hada_w2_a") and v.abs().max() > 0]
    assert trained  # w2_a starts at 0: two steps moved it
    x, t, context = unet_inputs()
    with torch.no_grad():
        y_ours = unet(x, t, context).sample
    ours.remove()
    with torch.no_grad():
        plain = unet(x, t, context).sample
    theirs = lycoris_from_weights({k: v.float() for k, v in tensors.items()}, unet, text_encoder)
    assert len(theirs.unet_loras) + len(theirs.text_encoder_loras) == len(ours.layers())
    with torch.no_grad():
        y_theirs = unet(x, t, context).sample
    assert (y_theirs - y_ours).abs().max() <= 1e-5 * (y_theirs - plain).abs().max() + 1e-6


def test_merge_loha_and_dora_files_into_a_model(tmp_path):
    from lora_diffusion.models import load_models, save_tiny_diffusers_folder
    from lora_diffusion.tools.merge import merge_into_model

    tiny = save_tiny_diffusers_folder(tmp_path / "tiny")
    base = load_models(tiny)
    g = torch.Generator().manual_seed(7)
    files = {}
    for algo, kwargs in (("loha", {}), ("lora", {"dora_wd": True})):
        network = create_network(base.unet, None, rank=4, alpha=2, algo=algo, **kwargs)
        for name, p in network.named_parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1 + (p.data if "dora_scale" in name else 0)
        files[algo] = tmp_path / f"{algo}.safetensors"
        network.save_weights(files[algo], dtype=torch.float32)
        network.remove()
    for algo, path in files.items():
        out = tmp_path / f"merged_{algo}.safetensors"
        merge_into_model(tiny, [f"{path}:0.7"], out)
        merged = load_models(out, config_dir=tiny).unet.state_dict()
        before = base.unet.state_dict()
        from safetensors.torch import load_file
        theirs = lycoris_from_weights(load_file(str(path)), base.unet)
        checked = 0
        for module in theirs.unet_loras:
            key = module.lora_name.removeprefix("lora_unet_")
            key = next(k for k in before if k.replace(".", "_") == key + "_weight")
            weight = before[key]
            # LyCORIS' forward: W + m * dW (LoHa: get_weight, alpha/r once) or its DoRA weight at multiplier m
            if module.wd:
                expected = module.get_merged_weight(0.7)[0]
            else:
                expected = weight + 0.7 * module.get_weight(module.shape).reshape(weight.shape)
            torch.testing.assert_close(merged[key], expected.detach(), rtol=0, atol=3e-6, msg=key)
            checked += 1
        theirs.restore()
        assert checked > 50


@pytest.mark.parametrize("algo", ["lora", "dora", "loha", "lokr"])
def test_what_diffusers_load_lora_weights_does_with_lycoris_files(tmp_path, algo):
    """Measured: LyCORIS-target LoRA loads exactly; DoRA loads but gives other outputs; LoHa and LoKr are refused."""
    from test_diffusers_interop import diffusers_pipeline

    unet = build_tiny_unet()
    kwargs = {"dora": dict(algo="lora", dora_wd=True)}.get(algo, dict(algo=algo))
    network = create_network(unet, None, rank=4, alpha=2, **kwargs)
    g = torch.Generator().manual_seed(3)
    for name, p in network.named_parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05 + (p.data if "dora_scale" in name else 0)
    x, t, context = unet_inputs()
    with torch.no_grad():
        ours = unet(x, t, context).sample
    network.save_weights(tmp_path / "l.safetensors")
    pipe = diffusers_pipeline()
    if algo in ("loha", "lokr"):
        with pytest.raises(ValueError, match="not been correctly renamed"):
            pipe.load_lora_weights(str(tmp_path), weight_name="l.safetensors")
        return
    pipe.load_lora_weights(str(tmp_path), weight_name="l.safetensors")
    pipe.fuse_lora()
    with torch.no_grad():
        theirs = pipe.unet(x, t, context).sample
    error = float((theirs - ours).abs().max())
    if algo == "lora":
        assert error < 1e-4
    else:
        assert error > 1e-3  # diffusers/peft's DoRA is not LyCORIS' (see docs/format.md)


@pytest.mark.parametrize("factor", [0, -2, 2.5, "8", True])
def test_lokr_factor_must_be_minus_one_or_at_least_one(factor):
    """LyCORIS turns factor=0 into a 1 x dim split silently (a LoKr whose w1 is 1x1); here it is an error."""
    unet = build_tiny_unet()
    with pytest.raises(ValueError, match=r"factor=.*expected -1 .* >= 1"):
        create_network(unet, None, rank=4, algo="lokr", factor=factor)
    assert all(p.requires_grad for p in unet.parameters())  # refused before anything was changed
    create_network(unet, None, rank=4, algo="lokr", factor=8.0)  # a whole number written as a float is fine
    from lora_diffusion.core.adapters import LoKrLayer
    layer = LoKrLayer(nn.Linear(64, 128), rank=4, factor=8)
    assert tuple(layer.lokr_w1.shape) == (8, 8)  # out 128 = 8 x 16, in 64 = 8 x 8: w1 [8, 8]


def test_tucker_lokr_network_builds_and_runs():
    """A Tucker LoKr's w2 is an einsum (not contiguous); torch.kron views its inputs and failed on it."""
    unet = build_tiny_unet()
    network = create_network(unet, None, rank=2, alpha=1, algo="lokr", use_tucker=True)
    tucker = [layer for layer in network.layers().values() if layer.lokr_t2 is not None]
    assert tucker and all(layer.base.kernel_size == (3, 3) for layer in tucker)
    x, t, context = unet_inputs()
    unet(x, t, context).sample.square().mean().backward()
    assert all(layer.lokr_t2.grad is not None for layer in tucker)


@pytest.mark.parametrize("alpha", [8, 4])
def test_loha_merge_on_a_geglu_shaped_module(alpha):
    """A GEGLU proj's shape (out 8x in, as SD1.5's ff.net.0.proj 1280 -> 10240, scaled down): our merge equals
    LyCORIS' forward and the LoHa formula (alpha / r once); lycoris-lora 4.1.3's merge_to equals it at alpha = r and
    applies alpha / r twice otherwise (get_weight scales, get_diff_weight scales again): see docs/format.md."""
    torch.manual_seed(0)
    base, x = nn.Linear(40, 320), torch.randn(3, 40)
    theirs = LohaModule(NAME, base, 1.0, lora_dim=8, alpha=alpha)
    state = {k: v if k == "alpha" else torch.randn_like(v) * 0.3 for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(state)
    formula = (state["hada_w1_a"] @ state["hada_w1_b"]) * (state["hada_w2_a"] @ state["hada_w2_b"]) * (alpha / 8)
    with torch.no_grad():
        plain = base(x)
    ours = layer_from_file(base, parse_state_dict({f"{NAME}.{k}": v for k, v in state.items()})[NAME], NAME, "test")
    assert_same_outputs(lycoris_output(theirs, base, x, 1.0), our_output(ours, base, x, 1.0), plain)
    original = base.weight.detach().clone()
    ours.merge()
    ours_merged = base.weight.detach().clone()
    ours.unmerge()
    torch.testing.assert_close(ours_merged - original, formula, rtol=1e-5, atol=1e-6)
    theirs.merge_to(1.0)
    lycoris_merged = base.weight.detach().clone()
    torch.testing.assert_close(lycoris_merged - original, formula * (alpha / 8), rtol=1e-5, atol=1e-6)


def test_wd_on_output_false_from_the_command_line_writes_per_input_dora_scales(tmp_path):
    """--network_args wd_on_output=False reaches create_network: ComfyUI's DoRA convention, a magnitude per input
    column ([1, in] for a Linear), where the default is LyCORIS' per output row ([out, 1])."""
    from safetensors.torch import load_file

    import train_lora
    from test_train import base_flags, make_dataset

    data = make_dataset(tmp_path)
    shapes = {}
    for name, extra in (("out", []), ("in", ["wd_on_output=False"])):
        argv = base_flags(tmp_path / name, data, max_train_steps=1, network_module="lycoris.kohya",
                          network_args=["algo=lora", "dora_wd=True", *extra])
        assert train_lora.main(argv) == 0
        tensors = load_file(str(tmp_path / name / "out" / "t.safetensors"))
        key = next(k for k in tensors if k.endswith("attn1_to_q.dora_scale"))
        down = tensors[key.replace("dora_scale", "lora_down.weight")]
        up = tensors[key.replace("dora_scale", "lora_up.weight")]
        shapes[name] = (tuple(tensors[key].shape), up.shape[0], down.shape[1])
    assert shapes["out"][0] == (shapes["out"][1], 1)
    assert shapes["in"][0] == (1, shapes["in"][2])


def test_standard_text_encoder_names_place_under_the_transformers_4_module_paths_that_kohya_pins():
    """Our files name the text encoder `lora_te_text_model_encoder_*` whatever transformers is installed. Loaders
    that derive names from the model's module paths (LyCORIS here, kohya's networks.lora the same way) place them
    under transformers 4's `text_model.encoder...` (kohya sd-scripts pins transformers 4.44) and none under 5's flat
    `encoder...`: the file is right, those loaders need transformers 4 for its text-encoder part."""
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    network = create_network(None, text_encoder, rank=4, alpha=4, algo="lora")
    tensors = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.remove()
    modules = {k.split(".")[0] for k in tensors}
    assert modules and all(m.startswith("lora_te_text_model_encoder_layers_") for m in modules)
    if hasattr(text_encoder, "text_model"):
        layout4 = text_encoder  # transformers 4 installed
    else:
        layout4 = nn.Module()
        layout4.text_model = text_encoder  # transformers 4's module paths around 5's modules
        with sd_preset():
            flat, _ = create_network_from_weights(1.0, None, None, text_encoder, unet, weights_sd=tensors)
        assert len(flat.text_encoder_loras) == 0
    with sd_preset():
        placed, _ = create_network_from_weights(1.0, None, None, layout4, unet, weights_sd=tensors)
    assert {lora.lora_name for lora in placed.text_encoder_loras} == modules
