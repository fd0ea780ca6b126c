"""Pivotal tuning (--token_string): a new token's embedding trains with the LoRA, only its rows change, the files load
in diffusers (load_textual_inversion + load_lora_weights) and in our loader, and a resumed run ends bit-equal."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import train_lora
from lora_diffusion.core import kohya
from lora_diffusion.core.network import load_network
from lora_diffusion.models import load_models
from lora_diffusion.training import encode_prompts
from test_train import base_flags, make_dataset, read

BUNDLE = "bundle_emb.sks.string_to_param.*"


@pytest.fixture
def data(tmp_path):
    root = make_dataset(tmp_path)
    for caption in root.rglob("*.txt"):
        caption.write_text("sks " + caption.read_text())
    return root


def pivotal_flags(tmp_path, data, **overrides):
    flags = dict(token_string="sks", init_word="star", num_vectors_per_token=2, embedding_lr=1e-2)
    flags.update(overrides)
    return base_flags(tmp_path, data, **flags)


def star_rows():
    models = load_models("builtin:tiny")
    [star] = models.tokenizer.encode("star", add_special_tokens=False)
    return models.text_encoder.get_input_embeddings().weight.detach()[[star, star]]


@pytest.fixture
def loaded(monkeypatch):
    """The models that each load_models call returns, in order (the trainer's, to look into after a run)."""
    import lora_diffusion.models

    models, real = [], lora_diffusion.models.load_models

    def keep(*args, **kwargs):
        models.append(real(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(lora_diffusion.models, "load_models", keep)
    return models


def test_only_the_new_rows_train_and_both_files_hold_them(tmp_path, data, loaded):
    assert train_lora.main(pivotal_flags(tmp_path, data, max_train_steps=3)) == 0
    tensors, _ = read(tmp_path / "out" / "t.safetensors")
    vectors = tensors[BUNDLE]
    assert vectors.shape == (2, 32)
    assert (vectors - star_rows()).abs().min(1).values.gt(0).all()  # both vectors moved away from "star"

    [models] = loaded
    fresh = load_models("builtin:tiny").text_encoder.get_input_embeddings().weight
    table = models.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == fresh.shape[0] + 2 and models.tokenizer.convert_tokens_to_ids(["sks", "sks_1"]) == \
        [fresh.shape[0], fresh.shape[0] + 1]
    assert torch.equal(table[:fresh.shape[0]], fresh)  # the rest of the vocabulary, bit for bit

    with safe_open(str(tmp_path / "out" / "t_emb.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.metadata()["token"] == "sks"
        assert torch.equal(f.get_tensor("emb_params"), vectors)
    with pytest.warns(kohya.LoRAFileWarning, match="'sks'"):
        modules, _ = kohya.read_lora_file(tmp_path / "out" / "t.safetensors")
    assert torch.equal(modules.embeddings["sks"]["string_to_param.*"], vectors)
    assert len(modules) == 192 + 72


def test_diffusers_reproduces_the_text_encoder_and_the_image(tmp_path, data):
    from diffusers import StableDiffusionPipeline

    assert train_lora.main(pivotal_flags(tmp_path, data, max_train_steps=3, learning_rate=5e-3)) == 0
    lora, emb = tmp_path / "out" / "t.safetensors", tmp_path / "out" / "t_emb.safetensors"
    prompt = "a sks toy, square"

    theirs = load_models("builtin:tiny")
    pipe = StableDiffusionPipeline(vae=theirs.vae, text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer,
                                   unet=theirs.unet, scheduler=theirs.noise_scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(emb), token="sks")
    with pytest.raises(ValueError, match="lora"):  # diffusers refuses A1111's bundle_emb keys in a LoRA file ...
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    tensors, _ = read(lora)  # ... and loads the file's LoRA keys (docs/training.md says so)
    pipe.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == "a sks sks_1 toy, square"
    with torch.no_grad():
        their_states, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        their_image = pipe(prompt, height=64, width=64, num_inference_steps=3, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    ours = load_models("builtin:tiny")
    network = load_network(lora, ours.unet, ours.text_encoder, tokenizer=ours.tokenizer)
    assert network.expand_prompt(prompt) == "a sks sks_1 toy, square"
    with torch.no_grad():
        our_states = encode_prompts(ours.tokenizer, ours.text_encoder, [network.expand_prompt(prompt)])
        plain = encode_prompts(load_models("builtin:tiny").tokenizer, load_models("builtin:tiny").text_encoder,
                               [prompt])
    torch.testing.assert_close(our_states, their_states, rtol=1e-4, atol=1e-5)
    assert (our_states - plain).abs().max() > 1e-3  # the embeddings and the LoRA do change the states

    ours_pipe = StableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                        unet=ours.unet, scheduler=ours.noise_scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    ours_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        our_image = ours_pipe(prompt_embeds=our_states, height=64, width=64, num_inference_steps=3,
                              guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                              output_type="np").images[0]
    np.testing.assert_allclose(our_image, their_image, atol=2e-3)


def test_resume_restores_the_embeddings_and_the_fraction_freezes_them(tmp_path, data):
    flags = dict(max_train_steps=6, save_every_n_steps=3, save_state=True, train_text_encoder_ti_frac=0.5,
                 network_dropout=0.1)
    assert train_lora.main(pivotal_flags(tmp_path / "a", data, **flags)) == 0
    out = tmp_path / "a" / "out"
    step3, _ = read(out / "t-step00000003.safetensors")
    final, _ = read(out / "t.safetensors")
    assert torch.equal(step3[BUNDLE], final[BUNDLE])  # trained during the first half only
    assert not torch.equal(step3[BUNDLE], star_rows())
    assert any(not torch.equal(step3[k], final[k]) for k in final if k.startswith("lora_unet"))

    resumed = dict(flags, resume=out / "t-step00000003-state")
    assert train_lora.main(pivotal_flags(tmp_path / "b", data, **resumed)) == 0
    continued, _ = read(tmp_path / "b" / "out" / "t.safetensors")
    assert continued.keys() == final.keys()
    for key in final:
        assert torch.equal(final[key], continued[key]), key


def test_a_state_without_the_token_is_refused(tmp_path, data, capsys):
    argv = base_flags(tmp_path / "a", data, max_train_steps=2, save_state=True)
    assert train_lora.main(argv) == 0
    capsys.readouterr()
    state = tmp_path / "a" / "out" / "t-state"
    assert train_lora.main(pivotal_flags(tmp_path / "b", data, max_train_steps=2, resume=state)) == 2
    assert "token_string" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (dict(init_word="star"), "--init_word needs --token_string"),
    (dict(train_text_encoder_ti_frac=0.5), "--train_text_encoder_ti_frac needs --token_string"),
    (dict(token_string="a b"), "--token_string 'a b'"),
    (dict(token_string="a b"), "without whitespace"),
    (dict(token_string="sks", train_text_encoder_ti_frac=0), "(0, 1]"),
    (dict(token_string="sks", num_vectors_per_token=0), "1 to 75"),
    (dict(token_string="sks", init_word=""), "--init_word ''"),
    (dict(token_string="sks", cache_text_encoder_outputs=True), "drop --cache_text_encoder_outputs"),
])
def test_bad_pivotal_flags_get_one_line(tmp_path, data, capsys, flags, message):
    assert train_lora.main(base_flags(tmp_path, data, **flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_token_the_tokenizer_has_is_refused(tmp_path, data, capsys):
    assert train_lora.main(pivotal_flags(tmp_path, data, token_string="star", init_word=None)) == 2
    assert "'star'" in capsys.readouterr().err


def test_generate_applies_the_bundled_embeddings(tmp_path):
    from lora_diffusion import create_network
    from lora_diffusion.cli import main

    models = load_models("builtin:tiny")
    network = create_network(models.unet, models.text_encoder, rank=4, alpha=4)
    tensors = network.file_tensors()  # a LoRA that changes nothing, and a strong embedding
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 3
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    save_file({**tensors, BUNDLE: vectors}, str(tmp_path / "bundled.safetensors"))
    images = {}
    for name in ("plain", "bundled"):
        argv = ["generate", "--model", "builtin:tiny", "--prompt", "a sks toy --d 3 --s 2", "--width", "64",
                "--height", "64", "--lora", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / name)]
        assert main(argv) == 0
        [path] = (tmp_path / name).glob("*.png")
        images[name] = np.asarray(Image.open(path), dtype=np.int16)
    assert np.abs(images["plain"] - images["bundled"]).max() > 0

    fresh = load_models("builtin:tiny")
    loaded = load_network(tmp_path / "bundled.safetensors", fresh.unet, fresh.text_encoder, tokenizer=fresh.tokenizer)
    assert list(loaded.embeddings) == ["sks"] and torch.equal(loaded.bundled_embeddings["sks"], vectors)
    table = fresh.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[-2:], vectors)


def test_two_processes_end_with_the_same_embedding(tmp_path, data):
    import os
    import subprocess
    import sys

    from test_train import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_lora.py"),
               *pivotal_flags(tmp_path, data, max_train_steps=4, train_text_encoder_ti_frac=0.5)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA weights identical on 2 processes" in result.stdout + result.stderr  # the embedding included
    tensors, _ = read(tmp_path / "out" / "t.safetensors")
    assert not torch.equal(tensors[BUNDLE], star_rows())


def test_network_weights_start_the_token_from_the_files_vectors(tmp_path):
    from lora_diffusion import create_network
    from lora_diffusion.core.network import TokenEmbeddings

    def network_with_token(init_word):
        models = load_models("builtin:tiny")
        network = create_network(models.unet, models.text_encoder, rank=2)
        network.add_embedding(TokenEmbeddings.create(models.tokenizer, models.text_encoder, "sks", init_word, 2))
        return network

    saved = network_with_token("star")
    saved.save_weights(tmp_path / "l.safetensors")
    other = network_with_token("dog")
    assert not torch.equal(other.embeddings["sks"].weight, saved.embeddings["sks"].weight)
    other.load_weights(tmp_path / "l.safetensors")
    assert torch.equal(other.embeddings["sks"].weight, saved.embeddings["sks"].weight)
