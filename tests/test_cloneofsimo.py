"""cloneofsimo/lora's API and files. The files are built here by its format rules (independent of the package):

- `.pt`: torch.save([up_0, down_0, up_1, down_1, ...]) in fp16, one pair per module in the order: every module whose
  class is a target, in model.modules() order, then its nn.Linear (and nn.Conv2d) descendants in modules() order;
  up (out, r) / (out, r, 1, 1), down (r, in) / (r, in, k, k); the update is W += up @ down.
- safeloras: tensors `<model>:<i>:up|down`, metadata `<model>` = JSON target list, `<model>:<i>:rank`, and
  `<token>` = "<embed>" for a textual-inversion embedding stored as the tensor `<token>`.

Loaded models are compared with the same models whose weights were changed by that formula, here."""

import argparse
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from conftest import text_ids, unet_inputs
from lora_diffusion import LoRAFileError, inject_trainable_lora, load_network
from lora_diffusion.lora import (
    LoraInjectedConv2d,
    LoraInjectedLinear,
    apply_learned_embed_in_clip,
    collapse_lora,
    extract_lora_ups_down,
    inject_trainable_lora_extended,
    lora_network,
    monkeypatch_add_lora,
    monkeypatch_lora,
    monkeypatch_or_replace_lora,
    monkeypatch_remove_lora,
    patch_pipe,
    save_lora_weight,
    save_safeloras,
    tune_lora_scale,
)
from lora_diffusion.models import load_models

UNET_TARGETS = ["Attention", "GEGLU"]  # the classes of cloneofsimo's default set that today's diffusers has
UNET_EXTENDED = ["Attention", "GEGLU", "ResnetBlock2D"]
TEXT_TARGETS = ["CLIPAttention"]


def module_order(model, classes, kinds=(nn.Linear,)):
    names, seen = [], set()
    owner = {id(m): n for n, m in model.named_modules()}
    for ancestor in model.modules():
        if type(ancestor).__name__ in classes:
            for m in ancestor.modules():
                if isinstance(m, kinds) and id(m) not in seen:
                    seen.add(id(m))
                    names.append(owner[id(m)])
    return names


def random_pairs(model, names, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    tensors = []
    for name in names:
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            up_shape, down_shape = (m.out_channels, rank, 1, 1), (rank, m.in_channels, *m.kernel_size)
        else:
            up_shape, down_shape = (m.out_features, rank), (rank, m.in_features)
        tensors += [(torch.randn(shape, generator=g) * 0.1).half() for shape in (up_shape, down_shape)]
    return tensors


def merged(model, names, tensors, scale=1.0):
    """A copy of the model with W += scale * up @ down on each module (einsum for k x k convs)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for i, name in enumerate(names):
            up, down = tensors[2 * i].float(), tensors[2 * i + 1].float()
            delta = torch.einsum("or,ri...->oi...", up.flatten(1), down)
            modules[name].weight += scale * delta
    return ref


def unet_out(unet):
    with torch.no_grad():
        return unet(*unet_inputs()).sample


def te_out(te):
    with torch.no_grad():
        return te(text_ids()).last_hidden_state


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pt_files_load_with_the_formula_outputs(tmp_path, tiny_unet, tiny_text_encoder):
    names = module_order(tiny_unet, UNET_TARGETS)
    tensors = random_pairs(tiny_unet, names)
    torch.save([t.clone().requires_grad_() * 1 for t in tensors], tmp_path / "x.pt")  # as saved from Parameters
    expected = unet_out(merged(tiny_unet, names, tensors))
    assert (expected - unet_out(tiny_unet)).abs().max() > 1e-3  # the LoRA matters

    fresh = copy.deepcopy(tiny_unet)
    monkeypatch_or_replace_lora(tiny_unet, torch.load(tmp_path / "x.pt", weights_only=True))
    close(unet_out(tiny_unet), expected)
    injected = [m for m in tiny_unet.modules() if isinstance(m, LoraInjectedLinear)]
    assert len(injected) == len(names) == 144
    assert all(m.__class__.__name__ == "LoraInjectedLinear" and m.scale == 1.0 for m in injected)

    # inject_trainable_lora(loras=.pt) works (the original assigned tensors to Parameters and failed)
    params, _ = inject_trainable_lora(fresh, r=8, loras=str(tmp_path / "x.pt"))
    close(unet_out(fresh), expected)
    assert all(p.requires_grad for group in params for p in group) and params[0][0].shape[1] == 2

    te_names = module_order(tiny_text_encoder, TEXT_TARGETS)
    te_tensors = random_pairs(tiny_text_encoder, te_names, rank=3, seed=1)
    te_expected = te_out(merged(tiny_text_encoder, te_names, te_tensors))
    monkeypatch_lora(tiny_text_encoder, te_tensors, target_replace_module=["CLIPAttention"])
    close(te_out(tiny_text_encoder), te_expected)


def test_pt_files_that_do_not_fit_are_clear_errors(tmp_path, tiny_unet):
    names = module_order(tiny_unet, UNET_TARGETS)
    tensors = random_pairs(tiny_unet, names)
    torch.save(tensors[:-2], tmp_path / "short.pt")
    with pytest.raises(LoRAFileError, match=r"short.pt holds 286 tensors, expected 288"):
        inject_trainable_lora(tiny_unet, loras=str(tmp_path / "short.pt"))
    torch.save(tensors[2:] + tensors[:2], tmp_path / "shifted.pt")
    with pytest.raises(LoRAFileError, match=r"shifted.pt: the pair for down_blocks.0.* expected"):
        monkeypatch_or_replace_lora(tiny_unet, str(tmp_path / "shifted.pt"))
    torch.save([argparse.Namespace(up=1)], tmp_path / "code.pt")
    with pytest.raises(LoRAFileError, match="refused for safety"):
        inject_trainable_lora(tiny_unet, loras=str(tmp_path / "code.pt"))
    assert not any(isinstance(m, LoraInjectedLinear) for m in tiny_unet.modules())  # nothing half-done


def test_save_lora_weight_writes_the_format(tmp_path, tiny_unet):
    names = module_order(tiny_unet, UNET_TARGETS)
    base = copy.deepcopy(tiny_unet)
    params, _ = inject_trainable_lora(tiny_unet, r=4, scale=0.5)
    for group in params:
        group[0].data.normal_(0, 0.05)
    save_lora_weight(tiny_unet, str(tmp_path / "s.pt"))
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    modules = dict(tiny_unet.named_modules())
    assert isinstance(saved, list) and len(saved) == 2 * len(names)
    assert all(t.dtype == torch.float16 for t in saved)
    for i, name in enumerate(names):  # up then down, module order, the scale not folded in (as cloneofsimo)
        assert torch.equal(saved[2 * i], modules[f"{name}.lora.lora_up"].weight.half())
        assert torch.equal(saved[2 * i + 1], modules[f"{name}.lora.lora_down"].weight.half())
    ups_downs = extract_lora_ups_down(tiny_unet)
    assert len(ups_downs) == len(names) and ups_downs[0][0] is modules[f"{names[0]}.lora.lora_up"]

    # read back by the format's rule, the file gives the model at scale 1
    lora_network(tiny_unet).set_multiplier(1.0)
    torch.testing.assert_close(unet_out(merged(base, names, saved)), unet_out(tiny_unet), rtol=1e-3, atol=1e-4)


def test_tune_scale_collapse_and_remove(tiny_unet):
    names = module_order(tiny_unet, UNET_TARGETS)
    tensors = random_pairs(tiny_unet, names)
    original = unet_out(tiny_unet)
    state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    types = [(n, type(m)) for n, m in tiny_unet.named_modules()]
    half = unet_out(merged(tiny_unet, names, tensors, scale=0.5))
    full = unet_out(merged(tiny_unet, names, tensors))

    monkeypatch_or_replace_lora(tiny_unet, tensors)
    tune_lora_scale(tiny_unet, 0.5)
    assert {m.scale for m in tiny_unet.modules() if isinstance(m, LoraInjectedLinear)} == {0.5}
    close(unet_out(tiny_unet), half)
    for m in tiny_unet.modules():
        if isinstance(m, LoraInjectedLinear):
            m.scale = 1.0  # research code sets the attribute directly too
    close(unet_out(tiny_unet), full)

    monkeypatch_remove_lora(tiny_unet)  # the model is exactly as before
    assert [(n, type(m)) for n, m in tiny_unet.named_modules()] == types
    after = tiny_unet.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(unet_out(tiny_unet), original)

    monkeypatch_or_replace_lora(tiny_unet, tensors)
    collapse_lora(tiny_unet, 0.5)
    close(unet_out(tiny_unet), half)  # collapsed once, not added again by the still-present LoRA
    monkeypatch_remove_lora(tiny_unet)
    assert set(tiny_unet.state_dict()) == set(state)
    close(unet_out(tiny_unet), half)


def test_replace_and_add(tiny_unet):
    names = module_order(tiny_unet, UNET_TARGETS)
    base = copy.deepcopy(tiny_unet)
    first, second = random_pairs(tiny_unet, names, seed=1), random_pairs(tiny_unet, names, rank=3, seed=2)
    monkeypatch_or_replace_lora(tiny_unet, first)
    monkeypatch_or_replace_lora(tiny_unet, second)  # replaces: only the second LoRA acts
    close(unet_out(tiny_unet), unet_out(merged(base, names, second)))
    monkeypatch_add_lora(tiny_unet, second, alpha=0.3, beta=2.0)  # up = alpha * file + beta * up, same for down
    close(unet_out(tiny_unet), unet_out(merged(base, names, [2.3 * t.float() for t in second])))


def _safeloras(path, parts, embeds):
    tensors, metadata = {}, {}
    for model_name, (targets, pairs) in parts.items():
        metadata[model_name] = json.dumps(targets)
        for i in range(len(pairs) // 2):
            metadata[f"{model_name}:{i}:rank"] = str(pairs[2 * i + 1].shape[0])
            tensors[f"{model_name}:{i}:up"], tensors[f"{model_name}:{i}:down"] = pairs[2 * i], pairs[2 * i + 1]
    for token, vector in embeds.items():
        metadata[token] = "<embed>"
        tensors[token] = vector
    save_file(tensors, str(path), metadata)


@pytest.fixture
def pipe():
    from diffusers import StableDiffusionPipeline

    m = load_models("builtin:tiny")
    return StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
                                   scheduler=m.noise_scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def test_patch_pipe_with_a_safeloras_file_and_save_back(tmp_path, pipe):
    unet_names = module_order(pipe.unet, UNET_EXTENDED, (nn.Linear, nn.Conv2d))
    te_names = module_order(pipe.text_encoder, TEXT_TARGETS)
    unet_pairs, te_pairs = random_pairs(pipe.unet, unet_names), random_pairs(pipe.text_encoder, te_names, seed=3)
    assert any(t.dim() == 4 and t.shape[2:] == (3, 3) for t in unet_pairs)  # k x k convs are in the file
    vector = torch.randn(pipe.text_encoder.config.hidden_size)
    _safeloras(tmp_path / "l.safetensors", {"unet": (UNET_EXTENDED, unet_pairs), "text_encoder": (TEXT_TARGETS,
                                                                                                   te_pairs)},
               {"<s1>": vector})
    unet_expected = unet_out(merged(pipe.unet, unet_names, unet_pairs))
    te_expected = te_out(merged(pipe.text_encoder, te_names, te_pairs))
    vocab = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    fresh_unet = copy.deepcopy(pipe.unet)

    embeds = patch_pipe(pipe, str(tmp_path / "l.safetensors"))
    assert list(embeds) == ["<s1>"]
    close(unet_out(pipe.unet), unet_expected)
    assert any(isinstance(m, LoraInjectedConv2d) for m in pipe.unet.modules())
    token_id = pipe.tokenizer.convert_tokens_to_ids("<s1>")
    table = pipe.text_encoder.get_input_embeddings().weight
    assert token_id == len(vocab) and torch.equal(table[token_id], vector) and torch.equal(table[:len(vocab)], vocab)
    close(te_out(pipe.text_encoder), te_expected)  # text_ids() has no new token: only the LoRA changed it
    inject_trainable_lora_extended(fresh_unet, UNET_EXTENDED, loras=str(tmp_path / "l.safetensors"))  # its "unet"
    close(unet_out(fresh_unet), unet_expected)

    tune_lora_scale(pipe.unet, 0.5)
    save_safeloras({"unet": (pipe.unet, UNET_EXTENDED), "text_encoder": (pipe.text_encoder, TEXT_TARGETS)},
                   str(tmp_path / "back.safetensors"))
    with safe_open(str(tmp_path / "back.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        assert json.loads(meta["unet"]) == UNET_EXTENDED and json.loads(meta["text_encoder"]) == TEXT_TARGETS
        assert keys == {f"{n}:{i}:{d}" for n, k in (("unet", unet_pairs), ("text_encoder", te_pairs))
                        for i in range(len(k) // 2) for d in ("up", "down")}
        for i in range(len(unet_pairs) // 2):
            assert meta[f"unet:{i}:rank"] == "2"
            assert torch.equal(f.get_tensor(f"unet:{i}:up"), (unet_pairs[2 * i].float() * 0.5).half())
            assert torch.equal(f.get_tensor(f"unet:{i}:down"), unet_pairs[2 * i + 1])
        assert torch.equal(f.get_tensor("text_encoder:5:up"), te_pairs[10])


def test_patch_pipe_with_pt_files_and_the_new_token(tmp_path, pipe):
    unet_names, te_names = module_order(pipe.unet, UNET_TARGETS), module_order(pipe.text_encoder, TEXT_TARGETS)
    unet_pairs, te_pairs = random_pairs(pipe.unet, unet_names), random_pairs(pipe.text_encoder, te_names, seed=4)
    torch.save(unet_pairs, tmp_path / "l.pt")
    torch.save(te_pairs, tmp_path / "l.text_encoder.pt")
    vector = torch.randn(pipe.text_encoder.config.hidden_size)
    torch.save({"<krk>": vector}, tmp_path / "l.ti.pt")
    unet_expected = unet_out(merged(pipe.unet, unet_names, unet_pairs))
    te_expected = te_out(merged(pipe.text_encoder, te_names, te_pairs))
    vocab = pipe.text_encoder.get_input_embeddings().weight.detach().clone()

    patch_pipe(pipe, str(tmp_path / "l.ti.pt"))  # any of the three files names the set
    close(unet_out(pipe.unet), unet_expected)
    close(te_out(pipe.text_encoder), te_expected)
    ids = pipe.tokenizer("a <krk> photo").input_ids
    assert len(vocab) in ids and ids == pipe.tokenizer("a <krk> photo").input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[len(vocab)], vector) and torch.equal(table[:len(vocab)], vocab)

    # lora_network(model) converts what was patched into a kohya file that load_network puts on a fresh model
    lora_network(pipe.unet).save_weights(tmp_path / "k.safetensors")
    fresh = load_models("builtin:tiny").unet
    load_network(tmp_path / "k.safetensors", fresh, None)
    close(unet_out(fresh), unet_expected)
    with pytest.raises(LoRAFileError, match="not a cloneofsimo safeloras file"):
        patch_pipe(pipe, str(tmp_path / "k.safetensors"))

    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a <krk> photo", num_inference_steps=1, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(latents).all()


def test_apply_learned_embed_renames_or_replaces(tiny_text_encoder):
    from lora_diffusion.models.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(v2=False)
    size = tiny_text_encoder.config.hidden_size
    a, b, c = (torch.randn(size) for _ in range(3))
    vocab = tiny_text_encoder.get_input_embeddings().weight.detach().clone()
    assert apply_learned_embed_in_clip({"<s>": a}, tiny_text_encoder, tokenizer) == "<s>"
    assert apply_learned_embed_in_clip({"<s>": b}, tiny_text_encoder, tokenizer) == "<s-1>"  # not idempotent
    assert apply_learned_embed_in_clip({"<s>": c}, tiny_text_encoder, tokenizer, idempotent=True) == "<s>"
    table = tiny_text_encoder.get_input_embeddings().weight
    assert table.shape[0] == len(vocab) + 2 and torch.equal(table[:len(vocab)], vocab)
    assert torch.equal(table[tokenizer.convert_tokens_to_ids("<s>")], c)
    assert torch.equal(table[tokenizer.convert_tokens_to_ids("<s-1>")], b)


def test_import_paths():
    import lora_diffusion.lora as research

    assert research.inject_trainable_lora is inject_trainable_lora
    assert research._ti_lora_path("x.pt") == "x.ti.pt" and research.safetensors_available


def test_merge_and_unload_is_final(tiny_unet):
    from lora_diffusion import create_network
    from lora_diffusion.lora import merge_and_unload

    keys = set(tiny_unet.state_dict())
    network = create_network(tiny_unet, None, rank=4, alpha=2, multiplier=0.7)
    for p in network.parameters():
        p.data.normal_(0, 0.05)
    with_lora = unet_out(tiny_unet)
    merge_and_unload(tiny_unet)
    assert set(tiny_unet.state_dict()) == keys
    close(unet_out(tiny_unet), with_lora)
    network.remove()  # the network object still exists: removing it again does not undo the merge
    close(unet_out(tiny_unet), with_lora)
