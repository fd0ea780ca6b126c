"""bench_quality's masked-loss data: stars on one background colour and their loss masks (kohya's
--conditioning_data_dir: the red channel is the mask). The masks are checked against the pixels world.render draws,
an independent drawing of the same scenes."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_quality  # noqa: E402

from lora_diffusion import world  # noqa: E402


def test_one_background_stars_share_one_background_and_use_every_other_colour():
    scenes = bench_quality.one_background_stars()
    assert len(scenes) == 16
    assert {s.background for s in scenes} == {bench_quality.ONE_BACKGROUND}
    assert {s.shape for s in scenes} == {"star"}
    assert {s.color for s in scenes} == set(world.COLORS) - {bench_quality.ONE_BACKGROUND}


def test_each_mask_is_white_on_the_rendered_star_and_black_on_its_background(tmp_path):
    scenes = bench_quality.one_background_stars()
    bench_quality.write_masks(tmp_path, scenes)
    for i, scene in enumerate(scenes):
        mask = np.asarray(Image.open(tmp_path / f"{i:02d}_{scene.color}_star.png").convert("RGB"))[..., 0]
        pixels = np.asarray(world.render(scene), dtype=np.float32)
        star, background = (np.array(world.PALETTE[c], dtype=np.float32) for c in (scene.color, scene.background))
        on_star = np.linalg.norm(pixels - star, axis=-1) < np.linalg.norm(pixels - background, axis=-1)
        pure = (np.linalg.norm(pixels - star, axis=-1) < 1) | (np.linalg.norm(pixels - background, axis=-1) < 1)
        assert np.array_equal(mask[pure], np.where(on_star[pure], 255, 0)), i  # away from the anti-aliased edge
        assert ((mask > 127) != on_star).mean() < 0.02, i
        assert 0.1 < on_star.mean() < 0.5  # a large star, most of the image still background


def test_masked_variant_trains_the_one_background_folder_with_its_masks(tmp_path, monkeypatch):
    train_dir, reg_dir = bench_quality.make_data(tmp_path)
    commands = []
    monkeypatch.setattr(bench_quality, "run_timed", lambda cmd, out, threads: commands.append(cmd) or [])
    for name in ("one_background", "masked_loss"):
        bench_quality.train_ours(name, bench_quality.VARIANTS[name], train_dir, reg_dir, tmp_path / name, 8, 1e-3, 1)
    plain, masked = commands
    for cmd in commands:
        data = Path(cmd[cmd.index("--train_data_dir") + 1])
        assert data == tmp_path / "one_background"
        captions = [p.read_text() for p in sorted(data.glob("10_star/*.txt"))]
        assert captions == [f"a {s.color} star\n" for s in bench_quality.one_background_stars()]  # the subject only
    assert "--masked_loss" not in plain and "--conditioning_data_dir" not in plain
    masks = Path(masked[masked.index("--conditioning_data_dir") + 1])
    assert "--masked_loss" in masked
    assert sorted(p.name for p in (masks / "10_star").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one_background" / "10_star").glob("*.png"))


def test_each_config_file_is_one_run_named_after_it(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "sub" / "b.toml"
    assert bench_quality.planned_runs(["ours", "quickstart"], [a, b]) == [("ours", None), ("a", a), ("b", b)]
    assert bench_quality.planned_runs(["keep_prior"]) == [("keep_prior", bench_quality.CONFIGS["keep_prior"])]
    with pytest.raises(SystemExit, match="named alike"):
        bench_quality.planned_runs(["quickstart"], [a, tmp_path / "sub" / "a.toml"])
    with pytest.raises(SystemExit, match="unknown 'nope'"):
        bench_quality.planned_runs(["nope"])


def test_the_backdrop_leak_counts_images_on_white_whose_prompt_asked_another_background():
    asked = [world.Scene("star", "red", "yellow"), world.Scene("star", "blue", "orange"),
             world.Scene("star", "green", "black"), world.Scene("star", "yellow", "white")]
    drawn = [world.Scene("star", "red", "white"), world.Scene("star", "blue", "orange"),
             world.Scene("star", "green", "white"), world.Scene("star", "yellow", "white")]
    images = [world.render(scene) for scene in drawn]
    # two of the three prompts that asked for another background came out on white; the white prompt is not counted
    assert bench_quality.on_one_background(images, asked) == 2 / 3
