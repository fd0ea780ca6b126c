"""train_lora.py on SDXL (builtin:tiny-xl): a few steps train, the file loads in diffusers' StableDiffusionXLPipeline
with equal outputs, the time ids of every sample equal a computation from the image files, cached text-encoder
outputs (in memory, on disk) give the run of uncached ones, resume is bit-exact, --network_train_unet_only, LyCORIS,
sampling, the SDXL defaults, one --text_encoder_lr per encoder."""

import numpy as np
import pytest
import torch
from PIL import Image

import train_lora
from conftest import count_calls
from lora_diffusion import create_network, load_network
from lora_diffusion.models import build_tiny_models
from lora_diffusion.models.sdxl import build_tiny_xl_models, sdxl_pipeline
from test_sdxl import assert_outputs_close, outputs
from test_train import base_flags, make_dataset, read

TOLERANCE = dict(rtol=1e-3, atol=1e-4)  # Adam (lr 1e-3) magnifies float noise in tiny gradients

XL = "builtin:tiny-xl"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DIFFUSION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path)


def xl_flags(tmp_path, data, **overrides):
    return base_flags(tmp_path, data, **{"pretrained_model_name_or_path": XL, **overrides})


def test_a_few_steps_train_sample_and_load_in_diffusers_with_equal_outputs(tmp_path, data):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 5\n")
    assert train_lora.main(xl_flags(tmp_path, data, max_train_steps=3, sample_prompts=prompts,
                                    network_args=["conv_dim=2", "conv_alpha=1"])) == 0
    tensors, meta = read(tmp_path / "out" / "t.safetensors")
    prefixes = {k.split("_")[1] for k in tensors if k.endswith(".lora_up.weight")}
    assert prefixes == {"unet", "te1", "te2"}
    ups = [k for k in tensors if k.endswith("lora_up.weight")]
    assert sum(tensors[k].abs().sum() > 0 for k in ups) > 0.9 * len(ups)  # lora_up starts at 0: the LoRA moved
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_steps"] == "3"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert len(list((tmp_path / "out" / "sample").glob("t_000003_00_*.png"))) == 1  # the final sampling

    ours = build_tiny_xl_models()
    load_network(tmp_path / "out" / "t.safetensors", ours.unet, ours.text_encoders)
    theirs = build_tiny_xl_models()
    pipe = sdxl_pipeline(theirs)
    pipe.load_lora_weights(str(tmp_path / "out"), weight_name="t.safetensors")
    pipe.fuse_lora(lora_scale=1.0)
    assert_outputs_close(outputs(ours.unet, ours.text_encoder, ours.text_encoder_2),
                         outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2))


def test_context_and_pooled_equal_diffusers_encode_prompt():
    from lora_diffusion.training import encode_prompts_sdxl

    models = build_tiny_xl_models()
    captions = ["a red circle", "two blue squares on a green field"]
    context, pooled = encode_prompts_sdxl((models.tokenizer, models.tokenizer_2),
                                          (models.text_encoder, models.text_encoder_2), captions)
    embeds, _, pooled_theirs, _ = sdxl_pipeline(models).encode_prompt(captions, do_classifier_free_guidance=False)
    torch.testing.assert_close(context, embeds)
    torch.testing.assert_close(pooled, pooled_theirs)
    long, long_pooled = encode_prompts_sdxl((models.tokenizer, models.tokenizer_2),
                                            (models.text_encoder, models.text_encoder_2), captions,
                                            max_token_length=150)
    assert long.shape == (2, 152, context.shape[-1])
    torch.testing.assert_close(long_pooled, pooled)  # the first window's


# --- size and crop conditioning ------------------------------------------------------------------------------------

SIZES = [(100, 60), (60, 100), (80, 80), (130, 70)]


def make_sized_dataset(root):
    folder = root / "sized" / "1_toy"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        noise = rng.integers(0, 60, (h, w, 3))
        Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"toy {i}")
    return root / "sized"


def expected_pixels(path, bucket, left, top, flip):
    """The bucket's window at (left, top) of the image resized to cover the bucket, computed here with PIL."""
    image = Image.open(path).convert("RGB")
    scale = max(bucket[0] / image.width, bucket[1] / image.height)
    resized = image.resize((max(bucket[0], round(image.width * scale)), max(bucket[1], round(image.height * scale))),
                           Image.Resampling.LANCZOS)
    if flip:  # a flipped sample's left is the window's left in the mirrored image
        left = resized.width - bucket[0] - left
    window = resized.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        window = window.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(window).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


@pytest.mark.parametrize("crop", ["center-cached", "center", "random"])
def test_time_ids_of_every_sample_follow_from_its_file_and_crop(tmp_path, monkeypatch, crop):
    import lora_diffusion.models.sdxl as family  # the SDXL family's time ids, which the loop asks for

    data = make_sized_dataset(tmp_path)
    seen, real = [], family.sdxl_time_ids

    def recording(batch, **kwargs):
        ids = real(batch, **kwargs)
        seen.append((batch, ids))
        return ids

    monkeypatch.setattr(family, "sdxl_time_ids", recording)
    flags = dict(enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, flip_aug=True,
                 max_train_steps=4, train_batch_size=1, random_crop=crop == "random",
                 cache_latents=crop == "center-cached", no_cache_latents=crop == "center")
    assert train_lora.main(xl_flags(tmp_path, data, **flags)) == 0
    assert len(seen) == 4
    for batch, ids in seen:
        (path,), (bucket,) = batch["paths"], batch["buckets"]
        w, h = Image.open(path).size
        assert (w, h) in SIZES
        scale = max(bucket[0] / w, bucket[1] / h)
        resized = (max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale)))
        left, top = batch["crops"][0]
        center = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
        if crop != "random":
            assert top == center[1] and left in (center[0], resized[0] - bucket[0] - center[0])  # flipped or not
        else:
            assert 0 <= left <= resized[0] - bucket[0] and 0 <= top <= resized[1] - bucket[1]
        assert ids.tolist() == [[h, w, top, left, bucket[1], bucket[0]]]
        if "images" in batch:  # the pixels trained on are the window the crop names
            image = batch["images"][0]
            errors = [(image - expected_pixels(path, bucket, left, top, flip)).abs().max() for flip in (0, 1)]
            assert min(errors) < 0.05, errors
    if crop == "random":
        assert len({b["crops"][0] for b, _ in seen}) > 1


# --- text-encoder caches ----------------------------------------------------------------------------------------


def test_cached_text_outputs_train_as_uncached_and_the_disk_cache_is_reused(tmp_path, data, monkeypatch):
    import lora_diffusion.models.sdxl as family  # the SDXL family's text encoding, which the loop asks for
    import lora_diffusion.training.loop as loop
    from lora_diffusion.data.dataset import LoRADataset

    flags = dict(max_train_steps=3, network_train_unet_only=True)
    calls = count_calls(monkeypatch, family, "encode_prompts_sdxl")
    losses, real_loss = [], loop.compute_loss
    monkeypatch.setattr(loop, "compute_loss", lambda run, batch: losses.append(real_loss(run, batch)) or losses[-1])
    assert train_lora.main(xl_flags(tmp_path / "cached", data, **flags)) == 0
    assert calls["n"] == 1  # the 4 captions at once, before the loop
    with monkeypatch.context() as m:  # the same run without the cache: the encoders run on every step
        m.setattr(LoRADataset, "captions_are_fixed", lambda self: False)
        assert train_lora.main(xl_flags(tmp_path / "uncached", data, **flags)) == 0
    assert calls["n"] == 1 + 3
    torch.testing.assert_close(torch.stack(losses[:3]), torch.stack(losses[3:]), rtol=1e-5, atol=0)
    cached, meta = read(tmp_path / "cached" / "out" / "t.safetensors")
    uncached, _ = read(tmp_path / "uncached" / "out" / "t.safetensors")
    assert cached and all(k.startswith("lora_unet_") for k in cached)  # --network_train_unet_only: no lora_te*
    for key in cached:
        torch.testing.assert_close(cached[key], uncached[key], **TOLERANCE)

    disk = dict(flags, cache_text_encoder_outputs_to_disk=True)
    assert train_lora.main(xl_flags(tmp_path / "disk", data, **disk)) == 0
    files = sorted(data.rglob("*_te_*.safetensors"))
    assert len(files) == 4
    stored, _ = read(files[0])
    assert set(stored) == {"context", "pooled"} and stored["context"].shape[-1] == 64
    monkeypatch.setattr(family, "encode_prompts_sdxl", lambda *a, **k: pytest.fail("the disk cache was not used"))
    assert train_lora.main(xl_flags(tmp_path / "again", data, **disk)) == 0
    for name in ("disk", "again"):
        tensors, _ = read(tmp_path / name / "out" / "t.safetensors")
        for key in cached:
            torch.testing.assert_close(tensors[key], cached[key], **TOLERANCE)


def test_cache_text_encoder_outputs_needs_frozen_encoders_and_fixed_captions(tmp_path, data, capsys):
    assert train_lora.main(xl_flags(tmp_path, data, cache_text_encoder_outputs=True)) == 2
    assert "--network_train_unet_only" in capsys.readouterr().err
    assert train_lora.main(xl_flags(tmp_path, data, cache_text_encoder_outputs=True, network_train_unet_only=True,
                                    shuffle_caption=True)) == 2
    assert "--shuffle_caption" in capsys.readouterr().err


# --- resume, LyCORIS, defaults ------------------------------------------------------------------------------------


def test_resume_on_sdxl_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, data):
    flags = dict(max_train_steps=4, save_every_n_steps=2, save_state=True, network_dropout=0.1, shuffle_caption=True,
                 noise_offset=0.05, lr_scheduler="cosine", lr_warmup_steps=1)
    assert train_lora.main(xl_flags(tmp_path / "a", data, **flags)) == 0
    state = tmp_path / "a" / "out" / "t-step00000002-state"
    assert train_lora.main(xl_flags(tmp_path / "b", data, **flags, resume=state)) == 0
    uninterrupted, _ = read(tmp_path / "a" / "out" / "t.safetensors")
    continued, meta = read(tmp_path / "b" / "out" / "t.safetensors")
    assert meta["ss_steps"] == "4" and any(k.startswith("lora_te2_") for k in continued)
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], continued[key]), key


def test_lycoris_loha_trains_on_sdxl(tmp_path, data):
    assert train_lora.main(xl_flags(tmp_path, data, max_train_steps=2, network_module="lycoris.kohya",
                                    network_args=["algo=loha", "conv_dim=2"])) == 0
    tensors, meta = read(tmp_path / "out" / "t.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.endswith("hada_w1_a") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    models = build_tiny_xl_models()
    network = load_network(tmp_path / "out" / "t.safetensors", models.unet, models.text_encoders)
    assert len(network.layers()) == len({k.split(".")[0] for k in tensors})


def test_sdxl_defaults_and_what_does_not_apply(tmp_path, data, capsys):
    args = train_lora.parse_args(["--pretrained_model_name_or_path", XL, "--train_data_dir", str(data)])
    assert (args.resolution, args.min_bucket_reso, args.max_bucket_reso) == ("1024", 512, 2048)
    args = train_lora.parse_args(["--pretrained_model_name_or_path", "builtin:tiny", "--train_data_dir", str(data)])
    assert (args.resolution, args.min_bucket_reso, args.max_bucket_reso) == ("512", 256, 1024)
    args = train_lora.parse_args(["--pretrained_model_name_or_path", XL, "--train_data_dir", str(data),
                                  "--resolution", "64", "--clip_skip", "2"])
    assert (args.resolution, args.min_bucket_reso, args.max_bucket_reso) == ("64", 256, 1024)
    models = train_lora.load_base_models(args, torch.float16, "cpu")  # fp16 weights: the VAE stays fp32
    assert models.unet.dtype == torch.float16 and models.vae.dtype == torch.float32 and args.clip_skip is None
    assert "--clip_skip 2 is ignored for SDXL" in capsys.readouterr().err  # pivotal tuning: test_pivotal_sdxl.py


# --- one learning rate per text encoder ---------------------------------------------------------------------------


def test_param_groups_give_each_sdxl_text_encoder_its_learning_rate():
    models = build_tiny_xl_models()
    network = create_network(models.unet, models.text_encoders, rank=2)
    by_prefix = {prefix: {id(p) for n, p in network.named_parameters() if n.startswith(prefix + "_")}
                 for prefix in ("lora_unet", "lora_te1", "lora_te2")}
    groups = network.param_groups(unet_lr=1e-3, text_encoder_lr=(1e-4, 2e-5))
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3), ("text_encoder", 1e-4),
                                                        ("text_encoder_2", 2e-5)]
    assert [{id(p) for p in g["params"]} for g in groups] == [by_prefix[p] for p in by_prefix]
    one = network.param_groups(unet_lr=1e-3, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in one] == [("unet", 1e-3), ("text_encoder", 5e-5)]
    assert {id(p) for p in one[1]["params"]} == by_prefix["lora_te1"] | by_prefix["lora_te2"]
    assert [g["name"] for g in network.param_groups(unet_lr=1e-3, text_encoder_lr=(0, 2e-5))] == ["unet",
                                                                                                   "text_encoder_2"]
    sd1 = build_tiny_models()
    with pytest.raises(ValueError, match="SDXL network"):
        create_network(sd1.unet, sd1.text_encoder, rank=2).param_groups(text_encoder_lr=(1e-4, 2e-5))


@pytest.mark.parametrize("values,expected", [(["5e-5"], [("text_encoder", 5e-5)]),
                                             (["1e-4", "2e-5"], [("text_encoder", 1e-4), ("text_encoder_2", 2e-5)])])
def test_text_encoder_lr_one_value_for_both_encoders_or_one_each(tmp_path, data, monkeypatch, values, expected):
    """kohya's --text_encoder_lr takes several values: on SDXL one trains both encoders at it, two are TE1's and
    TE2's. The optimizer the trainer builds gets those groups."""
    from lora_diffusion.training import trainer

    created = []
    real = trainer.create_optimizer
    monkeypatch.setattr(trainer, "create_optimizer", lambda name, groups, **kw: created.append(groups) or
                        real(name, groups, **kw))
    assert train_lora.main(xl_flags(tmp_path, data, max_train_steps=1, unet_lr=1e-3, text_encoder_lr=values)) == 0
    groups = created[-1]
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3)] + expected
    assert sum(len(g["params"]) for g in groups[1:]) == 2 * 2 * 24  # down and up of 24 modules per encoder
    _, meta = read(tmp_path / "out" / "t.safetensors")
    assert meta["ss_text_encoder_lr"] == ("5e-05" if len(values) == 1 else "[0.0001, 2e-05]")


def test_text_encoder_lr_pairs_are_for_sdxl_only(tmp_path, data, capsys):
    sd1 = base_flags(tmp_path, data, text_encoder_lr=["1e-4", "2e-5"])
    assert train_lora.main(sd1) == 2
    assert "--text_encoder_lr 0.0001 2e-05: two values are for SDXL" in capsys.readouterr().err
    assert train_lora.main(xl_flags(tmp_path, data, text_encoder_lr=["1e-4", "2e-5", "3e-5"])) == 2
    assert "--text_encoder_lr takes one value, or two on SDXL (TE1, TE2); got 3" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    for toml, expected in (("5e-5", 5e-5), ("[1e-4, 2e-5]", [1e-4, 2e-5]), ("[3e-5, 3e-5]", 3e-5)):
        config.write_text(f"text_encoder_lr = {toml}\n")
        args = train_lora.parse_args(xl_flags(tmp_path, data, config_file=config))
        assert args.text_encoder_lr == expected
