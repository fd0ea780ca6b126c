"""The kohya file: what we write (names, shapes, alpha, metadata, hashes) and what we read (files built here from
the naming rules alone, and bad files)."""

import hashlib
import json
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import build_tiny_text_encoder, build_tiny_unet, text_ids, unet_inputs
from lora_diffusion import LoRAFileError, create_network, load_network
from lora_diffusion.core import kohya


def randomize(network, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=g) * std


def read_raw(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_written_file_follows_the_format(tmp_path, tiny_unet, tiny_text_encoder):
    network = create_network(tiny_unet, tiny_text_encoder, rank=4, alpha=2, conv_rank=8, conv_alpha=4)
    path = tmp_path / "out.safetensors"
    network.save_weights(path, dtype=torch.float16, metadata={"ss_output_name": "out", "ss_seed": "42"})
    tensors, meta = read_raw(str(path))
    assert len(tensors) == 3 * (278 + 72)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {2.0}  # one alpha for the file
    assert all(tensors[k].dim() == 0 for k in tensors if k.endswith(".alpha"))
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{proj_in}.lora_down.weight"].shape == (4, 32, 1, 1)  # 1x1 conv: 4-D
    assert tensors[f"{proj_in}.lora_up.weight"].shape == (32, 4, 1, 1)
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (8, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (64, 8, 1, 1)
    assert tensors["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 32)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 2.0
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_seed"] == "42"
    assert "lora_adapter_metadata" not in meta
    # sshs_model_hash is the sha256 of the bytes after the header, computed here from the file itself
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8


def test_alpha_zero_means_alpha_equals_rank(tmp_path, tiny_unet):
    network = create_network(tiny_unet, None, rank=4, alpha=0, conv_rank=2, conv_alpha=0)
    assert {layer.scaling for layer in network.layers().values()} == {1.0}
    network.save_weights(tmp_path / "a0.safetensors")
    tensors, meta = read_raw(str(tmp_path / "a0.safetensors"))
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {4.0}
    assert float(meta["ss_network_alpha"]) == 4.0


def test_conv_alpha_is_folded_into_lora_up(tmp_path, tiny_unet):
    network = create_network(tiny_unet, None, rank=4, alpha=2, conv_rank=8, conv_alpha=4)
    randomize(network)
    path = tmp_path / "locon.safetensors"
    network.save_weights(path)
    tensors, _ = read_raw(str(path))
    conv = network.layers()["lora_unet_down_blocks_1_resnets_0_conv1"]
    # the module's own scale is conv_alpha / conv_rank = 0.5; the file says alpha 2 / rank 8 = 0.25
    torch.testing.assert_close(tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"],
                               conv.lora_up.weight * 2)


def kohya_file_from_naming_rules(unet, text_encoder, path, rank=3, alpha=1.5, te_prefix="text_model.",
                                 te_name="lora_te"):
    """A kohya file made here from the naming rules only, not with the library: every attention to_q and to_v of
    the U-Net and every fc1 of the text encoder, plus a 3x3 conv with its own alpha, with random weights."""
    g = torch.Generator().manual_seed(7)
    tensors, expected_deltas = {}, {}
    modules = [("lora_unet", n, m) for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]
    modules.append(("lora_unet", "up_blocks.1.resnets.0.conv1", unet.up_blocks[1].resnets[0].conv1))
    te_layers = text_encoder.encoder.layers if hasattr(text_encoder, "encoder") else \
        text_encoder.text_model.encoder.layers
    for i, layer in enumerate(te_layers):
        modules.append((te_name, f"{te_prefix}encoder.layers.{i}.mlp.fc1", layer.mlp.fc1))
    for prefix, path_name, module in modules:
        name = prefix + "_" + path_name.replace(".", "_")
        w = module.weight
        if w.dim() == 2:
            down = torch.randn(rank, w.shape[1], generator=g) * 0.1
            up = torch.randn(w.shape[0], rank, generator=g) * 0.1
            delta = up @ down
        else:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.1
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.1
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        module_alpha = alpha / 2 if w.dim() == 4 else alpha  # LoCon files carry their own conv alpha
        tensors[f"{name}.alpha"] = torch.tensor(module_alpha)
        expected_deltas[module] = delta * (module_alpha / rank)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return expected_deltas


@pytest.mark.parametrize("te_name", ["lora_te", "lora_te1"])  # lora_te1: SD1 files that ComfyUI and A1111 load
@pytest.mark.parametrize("te_prefix", ["text_model.", ""])
def test_foreign_kohya_file_loads_with_the_outputs_of_a_formula_merge(tmp_path, te_prefix, te_name):
    unet, te = build_tiny_unet(), build_tiny_text_encoder()
    path = tmp_path / "foreign.safetensors"
    deltas = kohya_file_from_naming_rules(unet, te, path, te_prefix=te_prefix, te_name=te_name)
    x, t, c = unet_inputs()
    ids = text_ids()

    reference_unet, reference_te = build_tiny_unet(), build_tiny_text_encoder()
    by_name = dict(unet.named_modules()) | {("te", n): m for n, m in te.named_modules()}
    ref_modules = dict(reference_unet.named_modules()) | {("te", n): m for n, m in reference_te.named_modules()}
    with torch.no_grad():
        for key, module in by_name.items():
            if module in deltas:
                ref_modules[key].weight += 0.8 * deltas[module]
        expected_unet = reference_unet(x, t, c).sample
        expected_te = reference_te(ids).last_hidden_state

    network = load_network(path, unet, te, multiplier=0.8)
    assert len(network.layers()) == len(deltas)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, c).sample, expected_unet, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(te(ids).last_hidden_state, expected_te, rtol=1e-4, atol=1e-4)


def test_missing_alpha_means_alpha_equals_rank_and_2d_weights_fit_1x1_convs(tmp_path, tiny_unet):
    proj_in = tiny_unet.down_blocks[0].attentions[0].proj_in
    down, up = torch.randn(2, 32) * 0.1, torch.randn(32, 2) * 0.1
    path = tmp_path / "noalpha.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": up}, str(path))
    x = torch.randn(1, 32, 4, 4)
    expected = F.conv2d(x, proj_in.weight + (up @ down)[:, :, None, None], proj_in.bias)
    network = load_network(path, tiny_unet, None)
    assert network.layers()["lora_unet_down_blocks_0_attentions_0_proj_in"].alpha.item() == 2.0
    torch.testing.assert_close(proj_in(x), expected, rtol=1e-5, atol=1e-5)


TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_alpha_zero_in_a_file_means_alpha_equals_rank(tmp_path, tiny_unet):
    to_q = tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(3, 32, generator=g) * 0.1, torch.randn(32, 3, generator=g) * 0.1
    path = tmp_path / "alpha0.safetensors"
    save_file({f"{TO_Q}.lora_down.weight": down, f"{TO_Q}.lora_up.weight": up, f"{TO_Q}.alpha": torch.tensor(0.0)},
              str(path))
    x = torch.randn(2, 5, 32)
    expected = F.linear(x, to_q.weight + 0.7 * (3 / 3) * (up @ down), to_q.bias)  # alpha = rank = 3
    load_network(path, tiny_unet, None, multiplier=0.7)
    with torch.no_grad():
        torch.testing.assert_close(to_q(x), expected, rtol=1e-5, atol=1e-5)


def test_bundled_embeddings_are_kept_aside_and_the_lora_is_loaded(tmp_path, tiny_unet):
    to_q = tiny_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    down, up = torch.randn(2, 32) * 0.1, torch.randn(32, 2) * 0.1
    embedding = torch.randn(2, 32)
    path = tmp_path / "bundled.safetensors"
    save_file({f"{TO_Q}.lora_down.weight": down, f"{TO_Q}.lora_up.weight": up, f"{TO_Q}.alpha": torch.tensor(1.0),
               "bundle_emb.sks_style.string_to_param.*": embedding,
               "bundle_emb.other.string_to_param.*": torch.zeros(1, 32)}, str(path))
    x = torch.randn(2, 5, 32)
    expected = F.linear(x, to_q.weight + (1.0 / 2) * (up @ down), to_q.bias)
    with pytest.warns(kohya.LoRAFileWarning, match="'other', 'sks_style' were not loaded"):
        load_network(path, tiny_unet, None)
    with torch.no_grad():
        torch.testing.assert_close(to_q(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.warns(kohya.LoRAFileWarning):
        modules, _ = kohya.read_lora_file(path)
    assert list(modules) == [TO_Q] and sorted(modules.embeddings) == ["other", "sks_style"]
    assert torch.equal(modules.embeddings["sks_style"]["string_to_param.*"], embedding)


@pytest.mark.parametrize("first,second", [
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_encoder_layers_0_mlp_fc1"),
    ("lora_te1_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_0_mlp_fc1"),
])
def test_two_spellings_of_one_module_are_named(tmp_path, tiny_unet, tiny_text_encoder, first, second):
    path = tmp_path / "twice.safetensors"
    tensors = {}
    for name in (first, second):
        tensors |= {f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)}
    save_file(tensors, str(path))
    with pytest.raises(LoRAFileError) as error:
        load_network(path, tiny_unet, tiny_text_encoder)
    message = str(error.value)
    assert message.count(first) == 1 and message.count(second) == 1 and "same module" in message


def test_other_formats_are_named(tmp_path, tiny_unet, tiny_text_encoder):
    n = TO_Q
    files = {
        "an OFT": {f"{n}.oft_blocks": torch.zeros(4, 8, 8), f"{n}.alpha": torch.tensor(1.0)},
        "a BOFT": {f"{n}.oft_blocks": torch.zeros(2, 4, 8, 8), f"{n}.rescale": torch.ones(32, 1)},
    }  # GLoRA, iA3 and norm-layer files are read now (tests/test_adapters_*.py)
    for kind, tensors in files.items():
        path = tmp_path / f"{kind.split()[1]}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(LoRAFileError, match=f"{path} is {kind} (\\(LyCORIS.*\\) )?file"):
            load_network(path, tiny_unet, tiny_text_encoder)


def test_save_load_round_trip(tmp_path, tiny_unet, tiny_text_encoder):
    network = create_network(tiny_unet, tiny_text_encoder, rank=4, alpha=2, conv_rank=4, conv_alpha=1)
    randomize(network)
    x, t, c = unet_inputs()
    with torch.no_grad():
        expected = tiny_unet(x, t, c).sample
    network.save_weights(tmp_path / "a.safetensors")
    network.remove()
    loaded = load_network(tmp_path / "a.safetensors", tiny_unet, tiny_text_encoder)
    assert len(loaded.layers()) == 278 + 72 and loaded.rank == 4 and loaded.alpha == 2.0
    with torch.no_grad():
        torch.testing.assert_close(tiny_unet(x, t, c).sample, expected, rtol=1e-5, atol=1e-5)
    # and into an existing network (what --network_weights does)
    loaded.remove()
    fresh = create_network(tiny_unet, tiny_text_encoder, rank=4, alpha=2, conv_rank=4, conv_alpha=1)
    fresh.load_weights(tmp_path / "a.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(tiny_unet(x, t, c).sample, expected, rtol=1e-5, atol=1e-5)


def test_bad_files_get_clear_errors(tmp_path, tiny_unet, tiny_text_encoder):
    not_st = tmp_path / "model.ckpt"
    not_st.write_bytes(b"definitely not safetensors")
    with pytest.raises(LoRAFileError, match="not a readable .safetensors"):
        load_network(not_st, tiny_unet, tiny_text_encoder)
    with pytest.raises(LoRAFileError, match="not found"):
        load_network(tmp_path / "missing.safetensors", tiny_unet, tiny_text_encoder)

    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(320, 4)},
              str(wrong_shape))
    with pytest.raises(LoRAFileError, match=f"{name}.*another base model"):
        load_network(wrong_shape, tiny_unet, tiny_text_encoder)

    unknown = tmp_path / "unknown.safetensors"
    save_file({"emb_params": torch.zeros(2, 32), f"{name}.lora_down.weight": torch.zeros(4, 32)}, str(unknown))
    with pytest.raises(LoRAFileError, match="emb_params"):
        load_network(unknown, tiny_unet, tiny_text_encoder)

    unplaceable = tmp_path / "unplaceable.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(unplaceable))
    with pytest.raises(LoRAFileError, match="lora_unet_input_blocks_4_1_proj_in"):
        load_network(unplaceable, tiny_unet, tiny_text_encoder)

    loha = tmp_path / "loha.safetensors"
    save_file({f"{name}.hada_w1_a": torch.zeros(32, 4), f"{name}.hada_w1_b": torch.zeros(4, 32)}, str(loha))
    with pytest.raises(LoRAFileError, match="LoHa"):
        load_network(loha, tiny_unet, tiny_text_encoder)

    half = tmp_path / "half.safetensors"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 32)}, str(half))
    with pytest.raises(LoRAFileError, match="lacks.*lora_up"):
        load_network(half, tiny_unet, tiny_text_encoder)


def test_crash_mid_save_keeps_the_last_good_file(tmp_path, tiny_unet, monkeypatch):
    network = create_network(tiny_unet, None, rank=2)
    path = tmp_path / "keep.safetensors"
    network.save_weights(path)
    good = path.read_bytes()
    randomize(network)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(kohya.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        network.save_weights(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]


def test_file_errors_live_at_the_bottom_and_import_from_their_old_homes():
    import ast

    import lora_diffusion
    from lora_diffusion.core import kohya
    from lora_diffusion.formats import errors

    assert kohya.LoRAFileError is errors.LoRAFileError is lora_diffusion.LoRAFileError
    assert kohya.LoRAFileWarning is errors.LoRAFileWarning
    tree = ast.parse(open(errors.__file__, encoding="utf-8").read())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
