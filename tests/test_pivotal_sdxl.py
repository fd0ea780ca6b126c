"""Pivotal tuning on SDXL (builtin:tiny-xl): the new token goes into both tokenizers and text encoders, both
embeddings train and nothing else of either vocabulary; the files hold `clip_l` and `clip_g` (the embedding file as
kohya's sdxl_train_textual_inversion writes it, the LoRA file's `bundle_emb.<token>.clip_l/.clip_g` as A1111 and
OneTrainer read and write them); diffusers' load_textual_inversion, once per encoder, gives our prompt embeddings and
images; a resumed run ends bit-equal; samples and validation images read a multi-vector token written out once."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import test_pivotal
import train_lora
from lora_diffusion import create_network
from lora_diffusion.core import kohya
from lora_diffusion.core.network import load_network
from lora_diffusion.models.sdxl import build_tiny_xl_models, generate_sdxl_samples, sdxl_pipeline
from lora_diffusion.training import encode_prompts_sdxl
from lora_diffusion.training.sampling import make_sample_scheduler, parse_prompt_line
from test_train import read

XL = "builtin:tiny-xl"
KEYS = ("bundle_emb.sks.clip_l", "bundle_emb.sks.clip_g")
data = test_pivotal.data  # fixtures: test_train's images, each caption starting with sks
loaded = test_pivotal.loaded  # the models of a run


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def xl_flags(tmp_path, data, **overrides):
    return test_pivotal.pivotal_flags(tmp_path, data, pretrained_model_name_or_path=XL, **overrides)


def star_rows(models):
    """"star"'s token embedding, twice (--init_word star, 2 vectors), in each encoder: clip_l, clip_g."""
    rows = []
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        [star] = tokenizer.encode("star", add_special_tokens=False)
        rows.append(encoder.get_input_embeddings().weight.detach()[[star, star]])
    return rows


def test_both_embeddings_train_only_their_rows_and_both_files_hold_clip_l_and_clip_g(tmp_path, data, loaded):
    assert train_lora.main(xl_flags(tmp_path, data, max_train_steps=3)) == 0
    tensors, _ = read(tmp_path / "out" / "t.safetensors")
    assert not [k for k in tensors if k.startswith("bundle_emb.") and k not in KEYS]
    fresh = build_tiny_xl_models()
    for key, start in zip(KEYS, star_rows(fresh)):
        assert tensors[key].shape == (2, 32)
        assert (tensors[key] - start).abs().min(1).values.gt(0).all(), key  # both vectors of both encoders moved

    [models] = loaded
    for tokenizer, encoder, fresh_encoder in zip(models.tokenizers, models.text_encoders, fresh.text_encoders):
        old = fresh_encoder.get_input_embeddings().weight
        table = encoder.get_input_embeddings().weight
        assert table.shape[0] == old.shape[0] + 2
        assert tokenizer.convert_tokens_to_ids(["sks", "sks_1"]) == [old.shape[0], old.shape[0] + 1]
        assert torch.equal(table[:old.shape[0]], old)  # every other token's embedding, bit for bit

    with safe_open(str(tmp_path / "out" / "t_emb.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata()["token"] == "sks"
        for key in ("clip_l", "clip_g"):
            assert torch.equal(f.get_tensor(key), tensors[f"bundle_emb.sks.{key}"])
    with pytest.warns(kohya.LoRAFileWarning, match="'sks'"):
        modules, _ = kohya.read_lora_file(tmp_path / "out" / "t.safetensors")
    assert sorted(modules.embeddings["sks"]) == ["clip_g", "clip_l"]


def test_diffusers_load_textual_inversion_per_encoder_gives_our_embeddings_and_image(tmp_path, data):
    assert train_lora.main(xl_flags(tmp_path, data, max_train_steps=3, learning_rate=5e-3)) == 0
    lora, emb = tmp_path / "out" / "t.safetensors", tmp_path / "out" / "t_emb.safetensors"
    prompt = "a sks toy, square"

    theirs = build_tiny_xl_models()  # as diffusers documents for SDXL embeddings: one call per text encoder
    pipe = sdxl_pipeline(theirs, make_sample_scheduler("ddim", theirs.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    with safe_open(str(emb), framework="pt") as f:
        pipe.load_textual_inversion(f.get_tensor("clip_l"), token="sks", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(f.get_tensor("clip_g"), token="sks", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    tensors, _ = read(lora)
    pipe.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")})
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer_2) == "a sks sks_1 toy, square"
    with torch.no_grad():
        _, _, stock_pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        # SDXL's configs have the legacy eos_token_id 2: transformers then pools at the highest id, a new token's.
        # kohya, ComfyUI and our encoders pool at the EOS: transformers' fix for added tokens does it.
        pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
        their_states, _, their_pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        their_image = pipe(prompt, height=64, width=64, num_inference_steps=2, guidance_scale=5.0,
                           generator=torch.Generator().manual_seed(3)).images[0]

    ours = build_tiny_xl_models()
    network = load_network(lora, ours.unet, ours.text_encoders, tokenizer=ours.tokenizers)
    assert sorted(network.bundled_embeddings["sks"]) == ["clip_g", "clip_l"]
    with torch.no_grad():
        states, pooled = encode_prompts_sdxl(ours.tokenizers, ours.text_encoders, [network.expand_prompt(prompt)])
        plain = encode_prompts_sdxl(build_tiny_xl_models().tokenizers, build_tiny_xl_models().text_encoders, [prompt])
    torch.testing.assert_close(states, their_states, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, their_pooled, rtol=1e-4, atol=1e-5)
    assert (pooled - stock_pooled).abs().max() > 1e-3  # what the legacy pooling would have given instead
    half = states.shape[-1] // 2
    for part in (slice(None, half), slice(half, None)):  # the embeddings and the LoRA change both encoders' states
        assert (states[..., part] - plain[0][..., part]).abs().max() > 1e-3

    [path] = generate_sdxl_samples(ours, prompts=[parse_prompt_line(f"{prompt} --w 64 --h 64 --s 2 --l 5 --d 3")],
                                   out_dir=tmp_path / "ours")
    ours_image = np.asarray(Image.open(path), dtype=np.int16)
    assert np.abs(ours_image - np.asarray(their_image, dtype=np.int16)).max() <= 1  # the prompt expanded once


def test_resume_restores_both_embeddings_and_the_fraction_freezes_them(tmp_path, data):
    flags = dict(max_train_steps=4, save_every_n_steps=2, save_state=True, train_text_encoder_ti_frac=0.5)
    assert train_lora.main(xl_flags(tmp_path / "a", data, **flags)) == 0
    out = tmp_path / "a" / "out"
    step2, _ = read(out / "t-step00000002.safetensors")
    final, _ = read(out / "t.safetensors")
    for key in KEYS:
        assert torch.equal(step2[key], final[key])  # trained during the first half only

    assert train_lora.main(xl_flags(tmp_path / "b", data, resume=out / "t-step00000002-state", **flags)) == 0
    continued, _ = read(tmp_path / "b" / "out" / "t.safetensors")
    assert continued.keys() == final.keys()
    for key in final:
        assert torch.equal(final[key], continued[key]), key


@pytest.mark.parametrize("flags,message", [
    (dict(cache_text_encoder_outputs=True, network_train_unet_only=True),
     "--cache_text_encoder_outputs and --token_string exclude each other"),
    (dict(token_string="star", init_word=None), "'star' is already in the tokenizer"),
])
def test_sdxl_pivotal_errors_name_the_flag(tmp_path, data, capsys, flags, message):
    assert train_lora.main(xl_flags(tmp_path, data, max_train_steps=1, **flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_puts_a_bundled_sdxl_embedding_into_both_encoders(tmp_path):
    from lora_diffusion.cli import main

    models = build_tiny_xl_models()
    tensors = create_network(models.unet, models.text_encoders, rank=2).file_tensors()  # changes nothing
    rng = torch.Generator().manual_seed(0)
    vectors = {"clip_l": torch.randn(2, 32, generator=rng) * 3, "clip_g": torch.randn(2, 32, generator=rng) * 3}
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    save_file({**tensors, **{f"bundle_emb.sks.{k}": v for k, v in vectors.items()}},
              str(tmp_path / "bundled.safetensors"))
    images = {}
    for name in ("plain", "bundled"):
        argv = ["generate", "--model", XL, "--prompt", "a sks toy --d 3 --s 2", "--width", "64", "--height", "64",
                "--lora", str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / name)]
        assert main(argv) == 0
        [path] = (tmp_path / name).glob("*.png")
        images[name] = np.asarray(Image.open(path), dtype=np.int16)
    assert np.abs(images["plain"] - images["bundled"]).max() > 0

    fresh = build_tiny_xl_models()
    network = load_network(tmp_path / "bundled.safetensors", fresh.unet, fresh.text_encoders,
                           tokenizer=fresh.tokenizers)
    assert list(network.embeddings) == ["sks"]
    for key, encoder in zip(("clip_l", "clip_g"), fresh.text_encoders):
        assert torch.equal(network.embeddings["sks"].vectors[key], vectors[key])
        assert torch.equal(encoder.get_input_embeddings().weight[-2:], vectors[key])
    with pytest.raises(ValueError, match=r"tokenizer=\(tokenizer, tokenizer_2\)"):
        load_network(tmp_path / "bundled.safetensors", fresh.unet, build_tiny_xl_models().text_encoders,
                     tokenizer=fresh.tokenizer)
    sd1 = {**tensors, "bundle_emb.sks.string_to_param.*": vectors["clip_l"]}
    save_file(sd1, str(tmp_path / "sd1_embedding.safetensors"))
    other = build_tiny_xl_models()
    with pytest.raises(ValueError, match="take clip_l, clip_g"):
        load_network(tmp_path / "sd1_embedding.safetensors", other.unet, other.text_encoders,
                     tokenizer=other.tokenizers)


def test_samples_and_validation_prompts_write_a_multi_vector_token_out_once(tmp_path, data, monkeypatch):
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    seen, real = [], TextualInversionLoaderMixin._maybe_convert_prompt

    def recording(self, prompt, tokenizer):
        seen.append(real(self, prompt, tokenizer))
        return seen[-1]

    monkeypatch.setattr(TextualInversionLoaderMixin, "_maybe_convert_prompt", recording)
    (tmp_path / "samples.txt").write_text("a sks toy --w 64 --h 64 --s 2 --d 5\n")
    (tmp_path / "validation.txt").write_text("a sks toy\n")
    assert train_lora.main(xl_flags(tmp_path, data, max_train_steps=None, max_train_epochs=1,
                                    sample_prompts=tmp_path / "samples.txt",
                                    validation_prompts=tmp_path / "validation.txt", validation_seeds=1)) == 0
    assert seen.count("a sks sks_1 toy") >= 4  # both tokenizers, the samples and the validation images
    assert not [prompt for prompt in seen if "sks" in prompt and prompt != "a sks sks_1 toy"]
