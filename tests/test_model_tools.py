"""The model tools: convert, merge, resize, extract, inspect, on the tiny model (SD1 topology) and on full-size
configs built on the meta device. Each result is checked against an independent computation: the test suite's own
original-layout writer (test_models.py), diffusers' from_single_file and load_lora_weights, LoRALayer's merge,
and torch.linalg.svd."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_diffusion import create_network, load_network
from lora_diffusion.cli import main
from lora_diffusion.models import ASSETS, build_tiny_models, empty_modules, load_models, save_tiny_diffusers_folder
from lora_diffusion.models.checkpoint import SafetensorsFile
from lora_diffusion.models.convert import original_names
from lora_diffusion.tools.extract import extract_lora
from lora_diffusion.tools.inspect import inspect_lora
from lora_diffusion.tools.merge import merge_into_model, merge_loras
from lora_diffusion.tools.model_convert import convert_model
from lora_diffusion.tools.model_files import ModelToolError
from lora_diffusion.tools.resize import resize_lora
from test_models import original_checkpoint, source_modules, tiny_v2_config_dir, write_checkpoint

TINY = ASSETS / "tiny-sd"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_diffusers_folder(root / "tiny")


def state(module):
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def assert_equal_states(a, b):
    a, b = state(a), state(b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def random_lora(models, path, seed, rank=4, alpha=2.0, conv_rank=None):
    """A LoRA with every factor random (a new network's up is zero), saved in fp32."""
    torch.manual_seed(seed)
    network = create_network(models.unet, models.text_encoder, rank=rank, alpha=alpha, conv_rank=conv_rank,
                             conv_alpha=1.0 if conv_rank else None)
    with torch.no_grad():
        for layer in network.layers().values():
            layer.lora_up.weight.normal_(0, 0.1)
    network.save_weights(str(path), dtype=torch.float32)
    network.remove()
    return path


# --- convert ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny", "v1", "v2"])
def test_reverse_names_match_an_independent_inverse(family):
    """Full-size configs on meta: our diffusers -> original names equal test_models.py's hand-written inverse."""
    config = TINY if family == "tiny" else ASSETS / family
    text_encoder, vae, unet = empty_modules(config)
    open_clip = family == "v2"
    theirs = original_checkpoint(text_encoder, vae, unet, open_clip=open_clip)
    ours = original_names(list(unet.state_dict()), list(vae.state_dict()), list(text_encoder.state_dict()),
                          layers_per_block=unet.config.layers_per_block,
                          up_has_attention=["Attn" in t for t in unet.config.up_block_types],
                          vae_levels=len(vae.config.up_block_types), open_clip=open_clip)
    extras = {k for k in theirs if k not in ours}
    assert all(not k.startswith("model.diffusion_model.") and not k.startswith("first_stage_model.") for k in extras)
    assert set(ours) <= set(theirs)
    if open_clip:  # q, k, v are chunks 0, 1, 2 of the fused in_proj
        targets = ours["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert [(k.split(".")[-2], c) for _, k, c in targets] == [("q_proj", 0), ("k_proj", 1), ("v_proj", 2)]


def test_convert_round_trip_is_bit_exact(tiny, tmp_path):
    single = convert_model(tiny, tmp_path / "tiny.safetensors")
    folder = convert_model(single, tmp_path / "back", config_dir=TINY)
    again = convert_model(folder, tmp_path / "again.safetensors")
    a, b = SafetensorsFile(single), SafetensorsFile(again)
    assert a.entries.keys() == b.entries.keys()
    assert all(torch.equal(a[k], b[k]) for k in a.entries)
    reference = load_models(tiny)
    for loaded in (load_models(folder), load_models(single, config_dir=TINY)):
        for part in ("unet", "vae", "text_encoder"):
            assert_equal_states(getattr(loaded, part), getattr(reference, part))
    # the original file of the test suite's own writer converts to the same folder tensors
    ckpt = original_checkpoint(reference.text_encoder, reference.vae, reference.unet)
    ours = load_file(str(single))
    assert all(torch.equal(ours[k], ckpt[k]) for k in ours if not k.endswith("position_ids"))


def test_convert_ckpt_is_read_safely_and_fp16(tiny, tmp_path):
    reference = load_models(tiny)
    ckpt = original_checkpoint(reference.text_encoder, reference.vae, reference.unet)
    path = write_checkpoint(ckpt, tmp_path / "model.ckpt", wrap=True)
    folder = convert_model(path, tmp_path / "folder", config_dir=TINY, dtype=torch.float16)
    loaded = load_models(folder, dtype=torch.float16)
    half = load_models(tiny, dtype=torch.float16)
    for part in ("unet", "vae", "text_encoder"):
        assert_equal_states(getattr(loaded, part), getattr(half, part))


def test_diffusers_from_single_file_reads_our_output(tiny, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    single = convert_model(tiny, tmp_path / "tiny.safetensors")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(tiny), local_files_only=True)
    reference = load_models(tiny)
    for part in ("unet", "vae", "text_encoder"):
        assert_equal_states(getattr(pipe, part), getattr(reference, part))


def test_convert_sd2_open_clip(tmp_path):
    config = tiny_v2_config_dir(tmp_path / "configs")
    text_encoder, vae, unet = source_modules(config, seed=5)
    path = write_checkpoint(original_checkpoint(text_encoder, vae, unet, open_clip=True), tmp_path / "sd2.safetensors")
    folder = convert_model(path, tmp_path / "sd2", config_dir=config, v_parameterization=True)
    loaded = load_models(folder)
    assert loaded.v_parameterization and loaded.tokenizer.pad_token == "!"  # the SD2 tokenizer was written
    for ours, theirs in ((loaded.unet, unet), (loaded.vae, vae), (loaded.text_encoder, text_encoder)):
        assert_equal_states(ours, theirs)
    back = load_file(str(convert_model(folder, tmp_path / "back.safetensors")))
    original = load_file(str(path))
    for key, value in back.items():  # the last open_clip block is a placeholder SD2 never runs
        if "resblocks.3." not in key and key.split(".")[-1] not in ("text_projection", "logit_scale"):
            assert torch.equal(value, original[key]), key
    assert back["cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"].shape == (96, 32)


def test_convert_refuses_bad_inputs(tiny, tmp_path):
    with pytest.raises(ModelToolError, match="already a diffusers folder"):
        convert_model(tiny, tmp_path / "x")
    with pytest.raises(ModelToolError, match="is the input|inside"):
        convert_model(tiny, tiny)
    (tmp_path / "lora.safetensors").write_bytes(b"")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="looks like a LoRA file"):
        convert_model(tmp_path / "lora.safetensors", tmp_path / "y")
    assert not (tmp_path / "y").exists()


# --- merge ------------------------------------------------------------------------------------------------------


def test_merge_into_model_equals_layer_merge(tiny, tmp_path):
    base = load_models(tiny)
    a = random_lora(base, tmp_path / "a.safetensors", seed=1, conv_rank=2)
    b = random_lora(base, tmp_path / "b.safetensors", seed=2, rank=2, alpha=1.0)
    out = tmp_path / "merged.safetensors"
    merge_into_model(tiny, [f"{a}:0.7", f"{b}:-0.5"], out)
    merged = load_models(out, config_dir=TINY)
    expected = load_models(tiny)  # LoRALayer.merge: an independent implementation of the same update
    load_network(str(a), expected.unet, expected.text_encoder, multiplier=0.7).merge()
    load_network(str(b), expected.unet, expected.text_encoder, multiplier=-0.5).merge()
    for part in ("unet", "text_encoder", "vae"):
        ours, theirs = state(getattr(merged, part)), state(getattr(expected, part))
        theirs = {k: v for k, v in theirs.items() if not re.search(r"\.lora(_\d+)?\.", k)}
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            torch.testing.assert_close(value, theirs[key], rtol=0, atol=2e-6, msg=key)
    changed = sum(not torch.equal(v, state(base.unet)[k]) for k, v in state(merged.unet).items())
    assert changed > 100
    folder = merge_into_model(tiny, [str(a)], tmp_path / "merged16", dtype=torch.float16)
    assert folder
    half = load_models(tmp_path / "merged16", dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16


def test_merge_refuses_a_lora_of_another_model(tiny, tmp_path):
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 7, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    save_file(tensors, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelToolError, match="another model family"):
        merge_into_model(tiny, [str(tmp_path / "other.safetensors")], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert main(["merge", "--model", str(tiny), "--lora", str(tmp_path / "other.safetensors"),
                 "--output", str(tmp_path / "out.safetensors")]) == 2


def module_delta_from_file(path):
    """{module: alpha/rank * up @ down} straight from the file tensors (test-side, no library math)."""
    tensors = load_file(str(path))
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
            deltas[name] = up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])
    return deltas


def test_merge_loras_concatenated_is_exact_and_svd_is_optimal(tmp_path):
    models = build_tiny_models()
    a = random_lora(models, tmp_path / "a.safetensors", seed=3, conv_rank=2)
    b = random_lora(models, tmp_path / "b.safetensors", seed=4, rank=3, alpha=3.0)
    merge_loras([f"{a}:0.5", f"{b}:2"], tmp_path / "ab.safetensors", dtype=torch.float32)
    da, db, dab = (module_delta_from_file(p) for p in (a, b, tmp_path / "ab.safetensors"))
    for name in dab:
        torch.testing.assert_close(dab[name], 0.5 * da.get(name, 0) + 2 * db.get(name, 0), rtol=1e-5, atol=1e-6)
    merge_loras([f"{a}:0.5", f"{b}:2"], tmp_path / "ab2.safetensors", rank=2, dtype=torch.float32)
    low = module_delta_from_file(tmp_path / "ab2.safetensors")
    for name, delta in low.items():
        u, s, vh = torch.linalg.svd(dab[name].double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(delta.double(), best, rtol=1e-4, atol=1e-5)
    assert load_network(str(tmp_path / "ab2.safetensors"), models.unet, models.text_encoder)


# --- resize -----------------------------------------------------------------------------------------------------


def test_resize_fixed_rank_is_the_best_approximation(tmp_path):
    models = build_tiny_models()
    source = random_lora(models, tmp_path / "r8.safetensors", seed=5, rank=8, alpha=4.0, conv_rank=4)
    report = resize_lora(source, tmp_path / "r3.safetensors", rank=3, conv_rank=2, dtype=torch.float32)
    before, after = module_delta_from_file(source), module_delta_from_file(tmp_path / "r3.safetensors")
    tensors = load_file(str(source))
    for name, delta in before.items():
        r = 2 if tensors[f"{name}.lora_down.weight"].shape[2:] == (3, 3) else 3
        u, s, vh = torch.linalg.svd(delta.double())
        torch.testing.assert_close(after[name].double(), (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-4, atol=1e-5)
        assert report[name][1] == r
        assert report[name][2] == pytest.approx(float((s[:r].square().sum() / s.square().sum()).sqrt()), rel=1e-4)


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 3.0)])
def test_resize_dynamic_methods_choose_kohyas_rank(tmp_path, method, param):
    models = build_tiny_models()
    source = random_lora(models, tmp_path / "r8.safetensors", seed=6, rank=8)
    report = resize_lora(source, tmp_path / "dyn.safetensors", rank=6, dynamic=method, dynamic_param=param)
    for name, delta in module_delta_from_file(source).items():
        s = torch.linalg.svdvals(delta.double())[:8]
        if method == "sv_fro":
            energy = (s.square().cumsum(0) / s.square().sum()).sqrt()
            expected = int((energy < param - 1e-9).sum()) + 1
        elif method == "sv_cumulative":
            expected = int((s.cumsum(0) / s.sum() < param - 1e-9).sum()) + 1
        else:
            expected = max(1, int((s > s[0] / param).sum()))
        assert report[name][1] == min(expected, 6), name
    metadata = SafetensorsFile(tmp_path / "dyn.safetensors")
    assert metadata.entries


# --- extract ----------------------------------------------------------------------------------------------------


def test_extract_recovers_a_known_low_rank_fine_tune(tiny, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    tuned = load_models(tiny)
    generator = torch.Generator().manual_seed(7)
    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.proj_in",
             "up_blocks.2.resnets.0.conv1"]
    with torch.no_grad():
        for name in names:
            weight = tuned.unet.get_submodule(name).weight
            up = torch.randn(weight.shape[0], 2, generator=generator) * 0.1
            down = torch.randn(2, weight[0].numel(), generator=generator) * 0.1
            weight += (up @ down).reshape(weight.shape)
        te = tuned.text_encoder.text_model if hasattr(tuned.text_encoder, "text_model") else tuned.text_encoder
        # q and out: diffusers (0.42) cannot tell a text-encoder LoRA's format when it lacks every out_proj
        for q in (te.encoder.layers[3].self_attn.q_proj.weight, te.encoder.layers[3].self_attn.out_proj.weight):
            q += torch.randn(q.shape[0], 1, generator=generator) @ torch.randn(1, q.shape[1], generator=generator) * .1
    tuned_dir = tmp_path / "tuned"
    shutil.copytree(tiny, tuned_dir)
    tuned.unet.save_pretrained(tuned_dir / "unet")
    tuned.text_encoder.save_pretrained(tuned_dir / "text_encoder")
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(tiny, tuned_dir, out, rank=4, conv_rank=4, dtype=torch.float32)
    assert len(report) == 5 and all(error < 1e-5 for _, error in report.values())
    assert sorted(rank for rank, _ in report.values()) == [4, 4, 4, 4, 4]
    by_threshold = extract_lora(tiny, tuned_dir, tmp_path / "t.safetensors", threshold=0.99999, conv_rank=8)
    assert sorted(rank for rank, _ in by_threshold.values()) == [1, 1, 2, 2, 2]  # the ranks of the fine-tune

    base = load_models(tiny)
    torch.manual_seed(0)
    latents, t, ids = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        want_h = tuned.text_encoder(ids).last_hidden_state
        want = tuned.unet(latents, t, want_h).sample
        load_network(str(out), base.unet, base.text_encoder)
        got_h = base.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(got_h, want_h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(base.unet(latents, t, got_h).sample, want, rtol=1e-4, atol=1e-5)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny), local_files_only=True,
                                                                 safety_checker=None)
        pipe.load_lora_weights(str(out))
        theirs_h = pipe.text_encoder(ids)[0]
        torch.testing.assert_close(theirs_h, want_h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pipe.unet(latents, t, theirs_h).sample, want, rtol=1e-4, atol=1e-5)


def test_extract_refuses_mismatched_architectures(tiny, tmp_path):
    config = tiny_v2_config_dir(tmp_path / "configs")
    text_encoder, vae, unet = source_modules(config, seed=1)
    other = write_checkpoint(original_checkpoint(text_encoder, vae, unet, open_clip=True), tmp_path / "o.safetensors")
    with pytest.raises(ModelToolError, match="architecture|shape"):
        extract_lora(tiny, other, tmp_path / "x.safetensors", rank=4, config_dir=config)
    assert not (tmp_path / "x.safetensors").exists()


# --- inspect ----------------------------------------------------------------------------------------------------


def test_inspect_reports_metadata_modules_blocks_and_loaders(tmp_path, capsys):
    models = build_tiny_models()
    torch.manual_seed(8)
    network = create_network(models.unet, models.text_encoder, rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0)
    with torch.no_grad():
        for layer in network.layers().values():
            layer.lora_up.weight.normal_(0, 0.1)
    tags = {"10_sks dog": {"sks dog": 12, "grass": 3}}
    path = tmp_path / "l.safetensors"
    network.save_weights(str(path), metadata={"ss_tag_frequency": json.dumps(tags), "ss_num_epochs": "10"})
    info = inspect_lora(path)
    assert info["tags"] == tags and info["training"]["ss_num_epochs"] == "10"
    assert info["algorithms"]["LoCon"] == sum(1 for n in network.layers() if "resnets" in n and "conv" in n
                                              and "shortcut" not in n) + sum(1 for n in network.layers()
                                                                              if "samplers" in n)
    deltas = module_delta_from_file(path)
    block = "unet down_blocks.1"
    expected = sum(d.norm() ** 2 for n, d in deltas.items() if n.startswith("lora_unet_down_blocks_1_")) ** 0.5
    assert info["blocks"][block] == pytest.approx(float(expected), rel=1e-3)
    assert "LoCon" in info["loaders"]["diffusers"]
    assert main(["inspect", str(path)]) == 0
    assert "sks dog (12)" in capsys.readouterr().out
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 2
    assert "error" in capsys.readouterr().err


# --- bundled embeddings (A1111's bundle_emb.*: pivotal tuning's new tokens) --------------------------------------


def with_embedding(path, token, seed, vectors=2, dim=32):
    """Add A1111's bundled embedding of `token` to a LoRA file, by hand: bundle_emb.<token>.string_to_param.*."""
    tensors = load_file(str(path))
    vector = torch.randn(vectors, dim, generator=torch.Generator().manual_seed(seed))
    tensors[f"bundle_emb.{token}.string_to_param.*"] = vector
    save_file(tensors, str(path))
    return vector


def bundled(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("bundle_emb.")}


def test_merged_and_resized_loras_keep_their_bundled_embeddings(tmp_path, capsys):
    models = build_tiny_models()
    a = random_lora(models, tmp_path / "a.safetensors", seed=3)
    b = random_lora(models, tmp_path / "b.safetensors", seed=4)
    sks, ohwx = with_embedding(a, "sks", 1), with_embedding(b, "ohwx", 2, vectors=3)
    assert main(["merge", "--lora", f"{a}:0.5", "--lora", str(b), "--output", str(tmp_path / "ab.safetensors"),
                 "--precision", "fp32"]) == 0
    assert "bundled embeddings kept: ohwx, sks" in capsys.readouterr().out
    kept = bundled(tmp_path / "ab.safetensors")  # safetensors' own reader
    assert kept.keys() == {"bundle_emb.sks.string_to_param.*", "bundle_emb.ohwx.string_to_param.*"}
    assert torch.equal(kept["bundle_emb.sks.string_to_param.*"], sks)  # no ratio applies to a token's vectors
    assert torch.equal(kept["bundle_emb.ohwx.string_to_param.*"], ohwx)
    # the merged file is a pivotal-tuning file a loader applies: both tokens added to the tokenizer
    tokenizer, text_encoder = models.tokenizer, models.text_encoder
    network = load_network(str(tmp_path / "ab.safetensors"), models.unet, text_encoder, tokenizer=tokenizer)
    assert set(network.bundled_embeddings) == {"sks", "ohwx"}
    network.remove()
    resize_lora(a, tmp_path / "a2.safetensors", rank=2)
    assert torch.equal(bundled(tmp_path / "a2.safetensors")["bundle_emb.sks.string_to_param.*"], sks.half())


def test_a_token_bundled_twice_is_refused_naming_both_files_or_taken_from_the_chosen_one(tmp_path, capsys):
    models = build_tiny_models()
    a = random_lora(models, tmp_path / "a.safetensors", seed=3)
    b = random_lora(models, tmp_path / "b.safetensors", seed=4)
    c = random_lora(models, tmp_path / "c.safetensors", seed=5)
    with_embedding(a, "sks", 1)
    theirs = with_embedding(b, "sks", 2)
    with_embedding(c, "sks", 1)  # the same vectors as a's: no conflict
    out = tmp_path / "ab.safetensors"
    assert main(["merge", "--lora", str(a), "--lora", str(b), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{a} and {b} both bundle an embedding for the token 'sks'" in err and "--embeddings_from" in err
    assert not out.exists()
    merge_loras([a, c], tmp_path / "ac.safetensors", dtype=torch.float32)
    assert bundled(tmp_path / "ac.safetensors").keys() == {"bundle_emb.sks.string_to_param.*"}
    merge_loras([a, b], out, dtype=torch.float32, embeddings_from=b)
    assert torch.equal(bundled(out)["bundle_emb.sks.string_to_param.*"], theirs)
    with pytest.raises(ModelToolError, match="--embeddings_from .*x.safetensors: not one of the --lora files"):
        merge_loras([a, b], out, overwrite=True, embeddings_from=tmp_path / "x.safetensors")


def test_merging_into_a_model_says_the_bundled_embeddings_are_not_in_it(tiny, tmp_path):
    models = load_models(tiny)
    lora = random_lora(models, tmp_path / "a.safetensors", seed=3)
    with_embedding(lora, "sks", 1)
    with pytest.warns(UserWarning, match=r"a.safetensors bundles embeddings for 'sks'.*does not have them"):
        merge_into_model(tiny, [str(lora)], tmp_path / "merged.safetensors")
