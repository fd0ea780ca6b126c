"""The world captioner on rendered scenes (>= 98 % exactly the scene's own caption, both styles), and what every
captioner shares through `lora-diffusion caption`: files beside the images or in --output_dir, existing captions
kept unless --overwrite, --append / --prepend, unreadable images skipped with a warning naming them."""

import random

import pytest
from PIL import Image

from lora_diffusion import cli, world
from lora_diffusion.captioning import CaptionError, caption_images, captioner
from lora_diffusion.captioning.world import WorldCaptioner


@pytest.mark.parametrize("style", ["sentence", "tags"])
def test_world_captions_rendered_scenes(style):
    rng = random.Random(7)
    pairs = world.color_pairs() + world.color_pairs(held_out=True)
    scenes = [world.sample_scene(rng, shapes=world.SHAPES, pairs=pairs) for _ in range(160)]
    got = WorldCaptioner(style).caption_batch([world.render(scene) for scene in scenes])
    right = sum(text == world.caption(scene, style) for text, scene in zip(got, scenes))
    assert right / len(scenes) >= 0.98, [(t, world.caption(s, style)) for t, s in zip(got, scenes) if t !=
                                         world.caption(s, style)]
    assert {world.parse_caption(t)[0] for t in got if world.parse_caption(t)} == set(world.SHAPES)


def test_world_plain_background_and_bad_style():
    assert WorldCaptioner("tags").caption_batch([Image.new("RGB", (64, 64), world.PALETTE["blue"])]) == \
        ["blue background"]
    with pytest.raises(CaptionError, match="style"):
        WorldCaptioner("poem")


def star_folder(tmp_path, n=4):
    folder = tmp_path / "10_star"
    folder.mkdir()
    scenes = [world.Scene("star", c, b, size=0.65) for c, b in world.color_pairs()[:n]]
    world.write_images(folder, scenes)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    return folder, scenes


def test_cli_writes_keeps_overwrites_and_warns(tmp_path, capsys):
    folder, scenes = star_folder(tmp_path)
    (folder / "broken.png").write_bytes(b"not a png")
    first = sorted(folder.glob("*_star.png"))[0]
    first.with_suffix(".txt").write_text("my own caption\n", encoding="utf-8")
    rc = cli.main(["caption", str(folder), "--captioner", "world", "--no_progress"])
    out, err = capsys.readouterr()
    assert rc == 0 and "broken.png" in err and "warning" in err
    assert first.with_suffix(".txt").read_text(encoding="utf-8") == "my own caption\n"  # kept
    assert "3 caption(s) written" in out and "1 kept" in out and "1 unreadable" in out
    for image, scene in zip(sorted(folder.glob("*_star.png"))[1:], scenes[1:]):
        assert image.with_suffix(".txt").read_text(encoding="utf-8") == world.caption(scene) + "\n"
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temp files
    rc = cli.main(["caption", str(folder), "--captioner", "world", "--overwrite", "--no_progress"])
    assert rc == 0
    assert first.with_suffix(".txt").read_text(encoding="utf-8") == world.caption(scenes[0]) + "\n"


def test_cli_output_dir_extension_append_prepend(tmp_path, capsys):
    folder, scenes = star_folder(tmp_path, n=2)
    out = tmp_path / "tags"
    assert cli.main(["caption", str(folder), "--captioner", "world", "--style", "tags", "--output_dir", str(out),
                     "--out_ext", ".wd", "--no_progress", "--batch_size", "2"]) == 0
    files = sorted(out.glob("*.wd"))
    assert [f.read_text(encoding="utf-8").strip() for f in files] == [world.caption(s, "tags") for s in scenes]
    assert not list(folder.glob("*.wd"))
    files[0].write_text("masterpiece, red star\n", encoding="utf-8")
    assert cli.main(["caption", str(folder), "--captioner", "world", "--style", "tags", "--output_dir", str(out),
                     "--out_ext", ".wd", "--append", "--no_progress"]) == 0
    color, background = scenes[0].color, scenes[0].background
    assert files[0].read_text(encoding="utf-8") == f"masterpiece, red star, {color} star, {background} background\n" \
        if color != "red" else f"masterpiece, red star, {background} background\n"
    capsys.readouterr()
    sentence = captioner("world", type("O", (), {"style": "sentence"})())
    report = caption_images(sentence, [sorted(folder.glob("*.png"))[1]], out_ext=".s", mode="write", progress=False)
    target = report.written[0]
    caption_images(sentence, [sorted(folder.glob("*.png"))[1]], out_ext=".s", mode="prepend", progress=False)
    assert target.read_text(encoding="utf-8") == f"{world.caption(scenes[1])} {world.caption(scenes[1])}\n"
    assert cli.main(["caption", str(folder), "--captioner", "world", "--append", "--prepend"]) == 2
    assert cli.main(["caption", str(tmp_path / "nowhere"), "--captioner", "world"]) == 2
    assert "nowhere" in capsys.readouterr().err
