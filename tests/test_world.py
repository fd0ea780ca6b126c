"""The shapes world of builtin:mini: scenes, captions, and the judge that reads them back."""

import random

import numpy as np
import pytest
from PIL import ImageFilter

from lora_diffusion import world


def test_judge_is_right_on_1000_noisy_antialiased_images():
    rng, noise_rng = random.Random(7), np.random.default_rng(7)
    pairs = world.color_pairs() + world.color_pairs(held_out=True)
    scenes = [world.sample_scene(rng, shapes=world.SHAPES, pairs=pairs) for _ in range(1000)]
    images = [world.render(s, 64, noise=8.0, rng=noise_rng) for s in scenes]
    accuracy = world.judge_accuracy(images, scenes)
    assert accuracy["all"] >= 0.98, accuracy
    assert {s.shape for s in scenes} == set(world.SHAPES)


def test_judge_holds_on_soft_images_like_a_vae_output():
    from PIL import ImageFilter

    rng = random.Random(11)
    scenes = [world.sample_scene(rng, shapes=world.SHAPES) for _ in range(400)]
    images = [world.render(s).filter(ImageFilter.GaussianBlur(1.5)) for s in scenes]
    assert world.judge_accuracy(images, scenes)["all"] >= 0.97


def bowed(scene, factor, size=64, supersample=4):
    """A triangle or square whose sides bend in (factor < 1) or out (> 1) at their midpoints, as generated shapes
    often do."""
    from PIL import Image, ImageDraw

    big = size * supersample
    corners = world.outline(scene, big)
    cx, cy = scene.cx * big, scene.cy * big
    points = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        points += [(x0, y0), (cx + ((x0 + x1) / 2 - cx) * factor, cy + ((y0 + y1) / 2 - cy) * factor)]
    image = Image.new("RGB", (big, big), world.PALETTE[scene.background])
    ImageDraw.Draw(image).polygon(points, fill=world.PALETTE[scene.color])
    return image.resize((size, size), Image.Resampling.BOX)


@pytest.mark.parametrize("factor", [0.7, 0.85, 1.1])
def test_judge_counts_corners_of_bowed_polygons(factor):
    # A convexity test calls a triangle with bowed-in sides a star; a person counts three corners.
    rng = random.Random(5)
    scenes = [world.sample_scene(rng, shapes=("triangle", "square")) for _ in range(100)]
    assert world.judge_accuracy([bowed(s, factor) for s in scenes], scenes)["shape"] >= 0.98


def short_point_star(scene, shortened, size=64, supersample=4):
    """A star whose top point reaches only `shortened` of the others' radius, as a LoRA's stars at 64 px often
    do (measured: a short top point let a judge that needed every point to cross the profile's midline call
    clear stars squares)."""
    from PIL import Image, ImageDraw

    big = size * supersample
    points = world.outline(scene, big)
    cx, cy = scene.cx * big, scene.cy * big
    x, y = points[0]  # the top point
    points[0] = (cx + (x - cx) * shortened, cy + (y - cy) * shortened)
    image = Image.new("RGB", (big, big), world.PALETTE[scene.background])
    ImageDraw.Draw(image).polygon(points, fill=world.PALETTE[scene.color])
    return image.resize((size, size), Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(1.0))


@pytest.mark.parametrize("shortened", [0.75, 0.85])
def test_judge_counts_a_star_with_one_short_point(shortened):
    rng = random.Random(8)
    scenes = [world.sample_scene(rng, shapes=("star",)) for _ in range(100)]
    images = [short_point_star(s, shortened) for s in scenes]
    assert world.judge_accuracy(images, scenes)["shape"] >= 0.98


def test_judge_still_sees_the_star_and_circle_under_a_strong_blur():
    from PIL import ImageFilter

    rng = random.Random(13)
    scenes = [world.sample_scene(rng, shapes=("star", "circle", "square")) for _ in range(150)]
    images = [world.render(s).filter(ImageFilter.GaussianBlur(2.5)) for s in scenes]
    assert world.judge_accuracy(images, scenes)["shape"] >= 0.97


@pytest.mark.parametrize("size", [48, 128])
def test_judge_works_at_other_resolutions(size):
    rng = random.Random(size)
    scenes = [world.sample_scene(rng, shapes=world.SHAPES) for _ in range(100)]
    assert world.judge_accuracy([world.render(s, size) for s in scenes], scenes)["all"] >= 0.98


def test_judge_on_a_plain_image_finds_no_shape():
    from PIL import Image

    assert world.judge(Image.new("RGB", (64, 64), world.PALETTE["blue"])) == (None, None, "blue")


def test_scenes_follow_the_world_rules():
    rng = random.Random(0)
    for _ in range(500):
        s = world.sample_scene(rng)
        assert s.shape in world.PRETRAIN_SHAPES and s.color != s.background
        assert (s.color, s.background) not in world.HELD_OUT_PAIRS
        assert 0.35 <= s.size <= 0.75 and abs(s.cx - 0.5) <= 0.15 and abs(s.cy - 0.5) <= 0.15
    assert "star" in world.SHAPES and "star" not in world.PRETRAIN_SHAPES
    assert len(world.HELD_OUT_PAIRS) == 8 and all(c != b for c, b in world.HELD_OUT_PAIRS)
    assert len(world.color_pairs()) + len(world.color_pairs(held_out=True)) == 8 * 7


def test_rendered_colours_are_the_palette():
    image = world.render(world.Scene("square", "purple", "orange", size=0.6), 64)
    pixels = np.asarray(image)
    assert tuple(pixels[32, 32]) == world.PALETTE["purple"]
    assert tuple(pixels[1, 1]) == world.PALETTE["orange"]
    # the square covers size^2 of the image, give or take the anti-aliased edge
    inside = (np.abs(pixels.astype(int) - world.PALETTE["purple"]).sum(-1) < 30).mean()
    assert inside == pytest.approx(0.36, abs=0.03)


def test_captions_and_rendering_are_reproducible():
    scene = world.Scene("star", "red", "white")
    assert world.caption(scene) == "a red star on a white background"
    assert world.caption(scene, "tags") == "red star, white background"
    assert world.caption(scene, "empty") == ""
    with pytest.raises(ValueError, match="caption style"):
        world.caption(scene, "poem")
    a = world.sample_scene(random.Random(3))
    assert a == world.sample_scene(random.Random(3))
    assert np.array_equal(np.asarray(world.render(a)), np.asarray(world.render(a)))


def test_parse_caption_reads_both_caption_styles():
    scene = world.Scene("triangle", "black", "yellow")
    for style in ("sentence", "tags"):
        assert world.parse_caption(world.caption(scene, style)) == ("triangle", "black", "yellow")
    assert world.parse_caption("toy, a red circle on a blue background --w 64") == ("circle", "red", "blue")
    assert world.parse_caption("a photo of a dog") is None
