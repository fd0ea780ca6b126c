"""The two-object shapes world (Mix-of-Show's multi-concept prompts): scenes of a shape on the left and one on the
right of one background, their captions, and the judge of each half, checked against the renderer's ground
truth."""

import random

import numpy as np
from PIL import Image, ImageFilter

from lora_diffusion import world


def scenes(n, seed):
    rng = random.Random(seed)
    return [world.sample_two_object_scene(rng) for _ in range(n)]


def test_judge_reads_both_objects_of_noisy_renders():
    truth = scenes(300, seed=1)
    noise = np.random.default_rng(1)
    accuracy = world.judge_two_object_accuracy([world.render_two_objects(s, noise=8.0, rng=noise) for s in truth],
                                               truth)
    assert accuracy["all"] >= 0.95, accuracy
    assert {s.left.shape for s in truth} | {s.right.shape for s in truth} == set(world.ALL_SHAPES)


def test_judge_reads_both_objects_of_soft_renders_and_other_sizes():
    truth = scenes(120, seed=2)
    soft = [world.render_two_objects(s).filter(ImageFilter.GaussianBlur(1.0)) for s in truth]
    assert world.judge_two_object_accuracy(soft, truth)["all"] >= 0.95
    assert world.judge_two_object_accuracy([world.render_two_objects(s, 128) for s in truth], truth)["all"] >= 0.95


def test_swapped_objects_are_judged_wrong_in_place():
    truth = [s for s in scenes(200, seed=3) if (s.left.shape, s.left.color) != (s.right.shape, s.right.color)]
    swapped = [world.TwoObjectScene(
        world.Scene(s.right.shape, s.right.color, s.background, s.right.size, 1 - s.right.cx, s.right.cy),
        world.Scene(s.left.shape, s.left.color, s.background, s.left.size, 1 - s.left.cx, s.left.cy))
        for s in truth]
    accuracy = world.judge_two_object_accuracy([world.render_two_objects(s) for s in swapped], truth)
    assert accuracy["left"] <= 0.05 and accuracy["right"] <= 0.05 and accuracy["background"] == 1.0
    # ... and read right against what was drawn
    assert world.judge_two_object_accuracy([world.render_two_objects(s) for s in swapped], swapped)["all"] >= 0.95


def test_a_missing_object_leaves_its_half_empty():
    for scene in scenes(100, seed=4):
        left_only = world.render(scene.left, 64)  # one-object render at the left's place
        verdict = world.judge_two_objects(left_only)
        assert verdict["right"] == (None, None) and verdict["background"] == scene.background
    blank = Image.new("RGB", (64, 64), world.PALETTE["white"])
    assert world.judge_two_objects(blank) == {"left": (None, None), "right": (None, None), "background": "white"}


def test_the_ring_is_held_out_and_judged_alone():
    assert "ring" in world.ALL_SHAPES and "ring" not in world.SHAPES and "ring" not in world.PRETRAIN_SHAPES
    rng, noise = random.Random(5), np.random.default_rng(5)
    pairs = world.color_pairs() + world.color_pairs(held_out=True)
    rings = [world.sample_scene(rng, shapes=("ring",), pairs=pairs) for _ in range(200)]
    images = [world.render(s, 64, noise=8.0, rng=noise) for s in rings]
    assert world.judge_accuracy(images, rings)["all"] >= 0.98
    # the hole shows the background: the centre pixel of a centred ring is the background colour
    pixels = np.asarray(world.render(world.Scene("ring", "red", "white", size=0.6), 64))
    assert tuple(pixels[32, 32]) == world.PALETTE["white"] and tuple(pixels[32, 15]) == world.PALETTE["red"]


def test_two_object_captions_round_trip():
    scene = world.two_object_scene("star", "red", "ring", "blue", "white")
    text = world.two_object_caption(scene)
    assert text == "a red star on the left and a blue ring on the right on a white background"
    assert world.parse_two_object_caption(text) == scene
    assert world.parse_two_object_caption("toy, " + text + " --d 3") == scene
    assert world.parse_two_object_caption("a red star on a white background") is None
    assert world.parse_caption("a blue ring on a white background") == ("ring", "blue", "white")
    for s in scenes(200, seed=6):
        assert s.left.color != s.background and s.right.color != s.background
        assert s.left.cx + s.left.size * 0.62 < 0.5 < s.right.cx - s.right.size * 0.62


def test_two_object_prompts_are_drawn_with_their_halves_regional_prompts():
    from lora_diffusion.models import load_models
    from lora_diffusion.world import quality

    scenes = quality.two_object_scenes(2)
    assert all(len({s.left.color, s.right.color, s.background}) == 3 for s in quality.two_object_scenes(50))
    left, right = quality.two_object_regions(scenes[0])
    assert left.prompt == world.caption(scenes[0].left) and left.box == (0.0, 0.0, 0.5, 1.0)
    assert right.prompt == world.caption(scenes[0].right) and right.box == (0.5, 0.0, 1.0, 1.0)
    models = load_models("builtin:tiny")
    accuracy, images = quality.judge_two_object_prompts(models, scenes, steps=2)
    _, plain = quality.judge_two_object_prompts(models, scenes, steps=2, regional=False)
    assert len(images) == 2 and images[0].size == (64, 64) and set(accuracy) >= {"left", "right", "all"}
    assert not np.array_equal(np.asarray(images[0]), np.asarray(plain[0]))  # the regions change the image


def test_pretraining_batches_with_a_two_object_share_show_what_their_captions_say():
    from lora_diffusion.world import pretrain_mini

    images, captions = pretrain_mini.world_batch(0, "denoiser", 3, 48, world.PRETRAIN_SHAPES, world.color_pairs(),
                                                 empty_share=0.0, two_object_share=0.5)
    pictures = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for im in images]
    asked = [world.parse_two_object_caption(c) for c in captions]
    two = [(p, a) for p, a in zip(pictures, asked) if a is not None]
    one = [(p, world.parse_caption(c)) for p, c, a in zip(pictures, captions, asked) if a is None]
    assert 12 <= len(two) <= 36 and one, (len(two), len(one))
    for picture, scene in two:  # the caption names each half's shape and colour and the background as drawn
        verdict = world.judge_two_objects(picture)
        assert (verdict["left"], verdict["right"], verdict["background"]) == \
            ((scene.left.shape, scene.left.color), (scene.right.shape, scene.right.color), scene.background)
        assert scene.left.shape in world.PRETRAIN_SHAPES and scene.right.shape in world.PRETRAIN_SHAPES
    for picture, asked_one in one:  # (shape, colour, background)
        assert world.judge(picture) == asked_one
