"""Gradient fusion (concepts/fusion.py, `lora-diffusion fuse`): the closed form against numpy's least squares on
layer inputs recorded by the test's own hooks, LBFGS against it, one concept giving back its own weights, and the
written folder and LoRA file loaded by diffusers with the fused model's outputs."""

import argparse

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_diffusion import cli, create_network
from lora_diffusion.concepts.fusion import (
    RCOND,
    Concept,
    fuse_closed_form,
    fuse_concepts,
    fuse_lbfgs,
    input_rows,
    record_concept,
)
from lora_diffusion.models import load_models
from lora_diffusion.tools import fuse as fuse_tool

TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
UNET_Q = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def random_lora(models, path, seed, scale=0.1):
    network = create_network(models.unet, models.text_encoder, rank=2, alpha=1)
    generator = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=generator) * scale
    network.save_weights(path)
    network.remove()
    return path


def merged_weight(path, name, base):
    """W0 + (alpha / rank) * up @ down, from the file's tensors."""
    tensors = load_file(str(path))
    up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
    return base.double() + float(tensors[f"{name}.alpha"]) / down.shape[0] * (up @ down)


def module_of(models, name):
    from lora_diffusion.core.targets import all_named_modules

    return all_named_modules(models.unet, models.text_encoder)[name].module


@pytest.fixture(scope="module")
def concepts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concepts")
    models = load_models("builtin:tiny")
    return [Concept(str(random_lora(models, folder / "a.safetensors", 1)), ("toy, a red circle", "a blue square")),
            Concept(str(random_lora(models, folder / "b.safetensors", 2)), ("a green triangle",))]


def test_closed_form_is_numpys_least_squares_on_the_recorded_inputs(concepts):
    models = load_models("builtin:tiny")
    names = (TE_Q, UNET_K, UNET_Q)
    modules = {name: module_of(models, name) for name in names}
    seen = {name: [] for name in names}
    hooks = [modules[name].register_forward_pre_hook(lambda m, args, name=name: seen[name][-1].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).double())) for name in names]
    grams = []
    for concept in concepts:
        for name in names:
            seen[name].append([])
        grams.append(record_concept(models, concept, modules, steps=2))
    for hook in hooks:
        hook.remove()
    for name in names:
        base = modules[name].weight.detach().double()
        weights = [merged_weight(c.path, name, base) for c in concepts]
        xs = [torch.cat(rows).numpy() for rows in seen[name]]
        for x, gram in zip(xs, grams):  # the recorded Gram is X^T X / n of what the layer saw
            np.testing.assert_allclose(gram[name].numpy(), x.T @ x / len(x), rtol=1e-9, atol=1e-12)
        # argmin_W sum_i |X_i W^T - X_i W_i^T|^2 / n_i, the least-norm change from the mean weight; singular
        # values of X below sqrt(RCOND) of the largest are zero, as the Gram's below RCOND (padding tokens repeat)
        anchor = torch.stack(weights).mean(0).numpy()
        stacked = np.concatenate([x / np.sqrt(len(x)) for x in xs])
        targets = np.concatenate([x @ (w.numpy() - anchor).T / np.sqrt(len(x)) for x, w in zip(xs, weights)])
        expected = anchor + np.linalg.lstsq(stacked, targets, rcond=np.sqrt(RCOND))[0].T
        fused = fuse_closed_form(weights, [g[name] for g in grams])
        np.testing.assert_allclose(fused.numpy(), expected, rtol=1e-6, atol=1e-8)
        assert not np.allclose(fused.numpy(), weights[0].numpy(), atol=1e-4)  # a real compromise of the two
        if name == UNET_Q:  # LBFGS on the text-fed layers only: 2000 iterations at 96 x 96 cost half a minute
            continue
        # Mix-of-Show's LBFGS from W0 nears the minimum (slowly: the Grams are ill-conditioned)
        lbfgs = fuse_lbfgs(base, weights, [g[name] for g in grams], max_iter=2000)
        loss = lambda w: sum(((x @ (w - wi.numpy()).T) ** 2).sum() / len(x) for x, wi in zip(xs, weights))  # noqa
        assert loss(expected) * (1 - 1e-6) <= loss(lbfgs.numpy()) <= loss(expected) * 1.01 < loss(base.numpy()) * 0.9


def test_conv_rows_multiply_the_flattened_kernel_like_the_convolution():
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 3, 7, 6)
    rows = input_rows(conv, x)
    out = conv(x)
    expected = out.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(rows @ conv.weight.reshape(5, -1).T, expected, rtol=1e-5, atol=1e-5)


def test_one_concept_gives_back_its_own_weights(concepts):
    models = load_models("builtin:tiny")
    before = {name: module_of(models, name).weight.detach().clone() for name in (TE_Q, UNET_K, UNET_Q)}
    report = fuse_concepts(models, concepts[:1], steps=1, say=lambda line: None)
    assert len(report) > 100 and max(max(errors) for errors in report.values()) < 1e-6
    for name, base in before.items():
        torch.testing.assert_close(module_of(models, name).weight.double(), merged_weight(concepts[0].path, name, base),
                                   rtol=1e-5, atol=1e-6)


def run_fuse(argv):
    parser = argparse.ArgumentParser()
    fuse_tool.add_arguments(parser)
    return fuse_tool.run(parser.parse_args(argv))


def test_fuse_writes_a_folder_and_a_lora_file_that_diffusers_loads_with_the_fused_outputs(concepts, tmp_path):
    from diffusers import StableDiffusionPipeline

    from conftest import text_ids, unet_inputs

    prompts = []
    for i, concept in enumerate(concepts):
        prompts += ["--prompts", str(tmp_path / f"p{i}.txt")]
        (tmp_path / f"p{i}.txt").write_text("\n".join(concept.prompts) + "\n", encoding="utf-8")
    out = tmp_path / "fused"
    assert run_fuse([concepts[0].path, concepts[1].path, *prompts, "--model", "builtin:tiny", "--out", str(out),
                     "--rank", "512", "--precision", "fp32", "--steps", "2"]) == 0
    fused = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    base = load_models("builtin:tiny")
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=fused.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    x, t, context = unet_inputs()
    ids = text_ids()
    with torch.no_grad():
        plain_unet = pipe.unet(x, t, context).sample
        pipe.load_lora_weights(str(tmp_path), weight_name="fused.safetensors")
        pipe.fuse_lora()
        theirs_unet, theirs_te = pipe.unet(x, t, context).sample, pipe.text_encoder(ids).last_hidden_state
        ours_unet, ours_te = fused.unet(x, t, context).sample, fused.text_encoder(ids).last_hidden_state
    assert (ours_unet - plain_unet).abs().max() > 1e-3  # the fusion changed the model
    torch.testing.assert_close(theirs_unet, ours_unet, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs_te, ours_te, rtol=1e-4, atol=1e-4)
    assert oct((tmp_path / "fused.safetensors").stat().st_mode & 0o777) == "0o644"


def test_fuse_errors_name_what_to_fix(concepts, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n# nothing\n", encoding="utf-8")
    base = ["fuse", concepts[0].path, concepts[1].path, "--model", "builtin:tiny", "--out", str(tmp_path / "o")]
    assert cli.main([*base, "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "one --prompts file per concept file: 2 file(s), 1 --prompts" in capsys.readouterr().err
    assert cli.main([*base, "--prompts", str(tmp_path / "p.txt"), "--prompts", str(tmp_path / "empty.txt")]) == 2
    assert f"--prompts {tmp_path / 'empty.txt'}: no prompts in it" in capsys.readouterr().err
    assert cli.main(["fuse", str(tmp_path / "none.safetensors"), "--prompts", str(tmp_path / "p.txt"),
                     "--model", "builtin:tiny", "--out", str(tmp_path / "o")]) == 2
    assert "none.safetensors not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sdxl_concepts_with_their_tokens_fuse_into_a_folder_and_file_that_keep_the_tokens(tmp_path):
    from safetensors import safe_open

    from lora_diffusion.core.network import TokenEmbeddings

    models = load_models("builtin:tiny-xl")
    files, prompts = [], []
    for i, token in enumerate(["<star>", "<ring>"]):
        network = create_network(models.unet, models.text_encoders, rank=2, alpha=2)
        network.add_embedding(TokenEmbeddings.create(models.tokenizers, models.text_encoders, token, init_word="star"))
        generator = torch.Generator().manual_seed(i)
        for p in network.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.1
        network.save_weights(tmp_path / f"{i}.safetensors")
        network.remove()
        (tmp_path / f"{i}.txt").write_text(f"a red {token}\n", encoding="utf-8")
        files.append(str(tmp_path / f"{i}.safetensors"))
        prompts.append(str(tmp_path / f"{i}.txt"))
    report = fuse_tool.fuse("builtin:tiny-xl", files, prompts, tmp_path / "out", rank=4, steps=1, say=lambda _: None)
    assert {name.split("_")[1] for name in report} == {"te1", "te2", "unet"}
    fused = load_models(str(tmp_path / "out"))
    for tokenizer in fused.tokenizers:
        assert tokenizer.tokenize("a <star> and a <ring>") == ["a</w>", "<star>", "and</w>", "a</w>", "<ring>"]
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"bundle_emb.{t}.{k}" for t in ("<star>", "<ring>") for k in ("clip_l", "clip_g")} <= keys
    assert any(k.startswith("lora_te2_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_are_peft_add_weighted_adapters(method, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from lora_diffusion.concepts.baselines import merge_task_vectors

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(12, 10)),
                           LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False),
                           adapter_name="first")
    model.add_adapter("second", LoraConfig(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    deltas = [layer.get_delta_weight(name).detach() for name in ("first", "second")]  # B A * alpha / r of each
    weights, density = [0.7, 1.3], 0.4
    states, bernoulli = [], torch.bernoulli  # DARE's drops: peft draws from the global generator, adapter by adapter

    def spy(*args, **kwargs):
        states.append(torch.get_rng_state())
        return bernoulli(*args, **kwargs)

    monkeypatch.setattr(torch, "bernoulli", spy)
    model.add_weighted_adapter(["first", "second"], weights, "merged", combination_type=f"{method}_svd", svd_rank=10,
                               density=density)
    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    assert bool(states) == method.startswith("dare")
    theirs = layer.get_delta_weight("merged").detach()
    generator = torch.Generator()
    if states:  # ours draws from where peft's first draw began
        generator.set_state(states[0])
    ours = merge_task_vectors(deltas, weights, method, density, generator=generator)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, sum(w * d for w, d in zip(weights, deltas)), atol=1e-3)  # not a plain sum


def test_a_ties_file_holds_the_merged_updates_at_its_rank(concepts, tmp_path):
    from lora_diffusion.concepts.baselines import merge_concept_files, merge_task_vectors

    report = merge_concept_files([c.path for c in concepts], tmp_path / "ties.safetensors", rank=4, density=0.5,
                                 dtype=torch.float32)
    written = load_file(str(tmp_path / "ties.safetensors"))
    deltas = [merged_weight(c.path, UNET_K, torch.zeros(1)) for c in concepts]
    expected = merge_task_vectors(deltas, [1.0, 1.0], "ties", 0.5)
    u, s, vh = torch.linalg.svd(expected)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    up, down = written[f"{UNET_K}.lora_up.weight"].double(), written[f"{UNET_K}.lora_down.weight"].double()
    got = float(written[f"{UNET_K}.alpha"]) / down.shape[0] * (up @ down)
    torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-5)
    assert 0 < report[UNET_K] <= 1
