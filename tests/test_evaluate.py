"""`lora-diffusion evaluate`: metrics against independent computations, and the command end to end on builtin:mini."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from lora_diffusion import world
from lora_diffusion.cli import main
from lora_diffusion.tools import evaluate
from lora_diffusion.world.features import load_world_features


def renders(n, seed, blur=0.0):
    rng = random.Random(seed)
    images = [world.render(world.sample_scene(rng, shapes=world.SHAPES)) for _ in range(n)]
    return [i.filter(ImageFilter.GaussianBlur(blur)) for i in images] if blur else images


def features_of(net, images):
    with torch.no_grad():
        return net(evaluate.to_uint8(images)).double().numpy()


def test_world_features_read_the_world():
    net = load_world_features()
    rng = random.Random(3)
    scenes = [world.sample_scene(rng, shapes=world.SHAPES) for _ in range(128)]
    with torch.no_grad():
        logits = net.heads(net(evaluate.to_uint8([world.render(s) for s in scenes])))
    shape = logits[:, :len(world.SHAPES)].argmax(1)
    truth = torch.tensor([world.SHAPES.index(s.shape) for s in scenes])
    assert (shape == truth).float().mean() >= 0.95


def test_fid_and_kid_equal_an_independent_computation():
    net = load_world_features()
    real, fake = renders(40, 1), renders(40, 2, blur=1.5)
    scores = evaluate.fid_kid(net, real, fake)
    a, b = features_of(net, real), features_of(net, fake)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # trace of sqrtm(A B) for covariances A, B: the sum of the square roots of A B's (real, >= 0) eigenvalues
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    fid = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * root_trace
    assert scores["fid"] == pytest.approx(fid, rel=1e-3, abs=1e-3)
    # KID: the unbiased MMD^2 with the kernel (x.y / d + 1)^3; with subsets as large as the sets every subset is
    # the whole set, so the mean is exact.
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    n = len(a)
    mmd = ((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
           - 2 * kab.mean())
    assert scores["kid"] == pytest.approx(mmd, rel=1e-3, abs=1e-6)


def test_world_fid_ranks_a_blur_below_the_real_thing():
    net = load_world_features()
    real = renders(64, 1)
    same = evaluate.fid_kid(net, real, renders(64, 2), ["fid"])["fid"]
    soft = evaluate.fid_kid(net, real, renders(64, 2, blur=1.0), ["fid"])["fid"]
    blurred = evaluate.fid_kid(net, real, renders(64, 2, blur=3.0), ["fid"])["fid"]
    assert same < soft < blurred


def test_clip_score_equals_cosine_similarity(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lora_diffusion.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=load_clip_tokenizer(v2=False))
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    images, prompts = renders(4, 5), ["a red star", "a blue circle", "a square", "green"]
    scorer = evaluate.clip_scorer(str(tmp_path / "clip"))
    score = float(scorer(evaluate.to_uint8(images), prompts))
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        vision = model.vision_model(pixel_values=inputs["pixel_values"])
        text = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image_features = model.visual_projection(vision.pooler_output)
        text_features = model.text_projection(text.pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image_features, text_features)
    assert score == pytest.approx(float((100 * cosine).clamp(min=0).mean()), rel=1e-4, abs=1e-4)


def test_lora_files_come_in_epoch_order(tmp_path):
    for name in ("star.safetensors", "star-000010.safetensors", "star-000002.safetensors"):
        (tmp_path / name).write_bytes(b"")
    files = evaluate.expand_loras([str(tmp_path / "star*.safetensors")])
    assert [f.split("/")[-1] for f in files] == ["star-000002.safetensors", "star-000010.safetensors",
                                                 "star.safetensors"]


def test_evaluate_command_end_to_end(tmp_path, capsys):
    from lora_diffusion.core.network import create_network
    from lora_diffusion.models import load_models

    models = load_models("builtin:mini")
    torch.manual_seed(0)
    network = create_network(models.unet, models.text_encoder, rank=4, alpha=4)
    for layer in network.layers().values():
        torch.nn.init.normal_(layer.lora_up.weight, std=0.02)
    network.save_weights(str(tmp_path / "run-000001.safetensors"))
    network.save_weights(str(tmp_path / "run.safetensors"))
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", "builtin:mini", "--lora", str(tmp_path / "run*.safetensors"),
                 "--multipliers", "0,1", "--prompts", "world:star", "--seeds", "1", "--steps", "4",
                 "--metrics", "judge,fid", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in rows] == ["base", "run-000001 x0", "run-000001 x1", "run x0", "run x1"]
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    # a multiplier of 0 draws what the base model draws: same judge scores, FID equal to the base's
    assert rows[1]["fid"] == pytest.approx(rows[0]["fid"], rel=1e-4)
    assert rows[1]["judge_shape"] == rows[0]["judge_shape"]
    assert rows[2]["fid"] != pytest.approx(rows[0]["fid"], rel=1e-4)
    grid = Image.open(out / "grid.png")
    assert grid.height == 12 + 8 * 64 and grid.width > 5 * 64  # 8 star prompts x 1 seed, 5 columns + labels
    assert "best by judge_shape" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--lora", "nothing-*.safetensors"], "no file matches"),
    (["--metrics", "clip"], "--clip_model"),
    (["--metrics", "fid", "--features", "inception"], "torch-fidelity"),
    (["--multipliers", "1,nan"], "finite"),
    (["--prompts", "missing.txt"], "no such file"),
])
def test_evaluate_errors_name_the_flag(argv, message, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as on a machine without it
    assert main(["evaluate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_images_default_to_the_models_own_size():
    from lora_diffusion.models import MINI_FOLDER, load_models

    assert evaluate.native_size(load_models(str(MINI_FOLDER))) == 64  # a folder path, not the builtin name


def row(label, **scores):
    return {"label": label, "file": f"{label}.safetensors", "multiplier": 1.0, **scores}


def test_best_row_says_how_a_tie_was_broken():
    base = {"label": "base", "file": "", "multiplier": 1.0, "judge_shape": 1.0}  # never the best: no LoRA
    rows = [base, row("ep1", judge_shape=0.5, judge_all=0.5), row("ep2", judge_shape=1.0, judge_all=0.5, fid=3.0),
            row("ep3", judge_shape=1.0, judge_all=0.75, fid=9.0), row("ep4", judge_shape=1.0, judge_all=0.75, fid=2.0)]
    best = evaluate.best_row(rows)
    assert best.row["label"] == "ep4" and best.key == "judge_shape"
    assert [r["label"] for r in best.tied] == ["ep2", "ep3"] and best.broken_by == "judge_all, then fid"
    assert best.describe().endswith("tied on judge_shape with ep2, ep3: broken by judge_all, then fid")
    same = evaluate.best_row([row("ep1", judge_shape=1.0), row("ep2", judge_shape=1.0)])
    assert same.row["label"] == "ep1" and "no other score tells them apart: the first in file order" in \
        same.describe()
    alone = evaluate.best_row([row("ep1", fid=4.0), row("ep2", fid=2.0)])
    assert alone.row["label"] == "ep2" and alone.describe() == "best by fid: ep2 (ep2.safetensors)"
    assert evaluate.best_row([base]) is None


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds 0: expected an integer >= 1"),
    (["--steps", "0"], "--steps 0: expected an integer >= 1"),
    (["--size", "60"], "--size 60: expected a positive multiple of 8"),
    (["--out", "{file}"], "--out {file}: is a file; expected a folder"),
    (["--out", "{file}/eval"], "--out {file}/eval: {file} is a file"),
])
def test_bad_flags_are_refused_before_any_image_is_drawn(argv, message, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "results.txt"
    existing.write_text("not a folder")
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("drew images before checking flags"))
    argv = [a.format(file=existing) for a in argv]
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert message.format(file=existing) in err and "Traceback" not in err
    assert existing.read_text() == "not a folder"


def test_evaluate_shows_progress_and_says_the_grid_is_cut(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--prompts", "world:star", "--seeds", "3", "--steps", "1", "--metrics", "judge",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "evaluate" in captured.err and "24/24" in captured.err  # tqdm's bar on stderr: 8 prompts x 3 seeds
    assert "grid.png shows the first 16 of the 24 prompt x seed rows (8 prompts x 3 seeds)" in captured.out
    assert Image.open(out / "grid.png").height == 12 + 16 * 64
    assert len(json.loads((out / "results.json").read_text())) == 1  # the base model alone
