"""The seeds' dataset tools (excise, balance, caption-sets) and the lora-diffusion command, on copies."""

import hashlib
import random
from pathlib import Path

import pytest
from PIL import Image

import dataset
from lora_diffusion import cli
from lora_diffusion.tools import IMAGE_EXTENSIONS, ToolError, list_images
from lora_diffusion.tools.balance import apply_balance, plan_balance
from lora_diffusion.tools.caption_sets import build_caption_sets
from lora_diffusion.tools.excise import excise_captions


def snapshot(folder):
    """{relative path: sha256} of every file: proves a folder was left untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def image(path, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)


def test_the_tools_and_the_dataset_see_the_same_images(tmp_path):
    """One folder of real image files in the common formats (any case) and the files beside them that are no
    images: the tools' listing and the dataset's scan find exactly the images, the set written here."""
    folder = tmp_path / "data" / "1_x"
    folder.mkdir(parents=True)
    images = {"a.png": "PNG", "b.jpg": "JPEG", "c.jpeg": "JPEG", "d.webp": "WEBP", "e.bmp": "BMP", "F.PNG": "PNG",
              "g.JPG": "JPEG", "h.tif": "TIFF", "i.gif": "GIF"}
    for name, fmt in images.items():
        Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / name, format=fmt)
    for name in ("a.txt", "b.caption", "c.json", "d.npz", "notes.md"):
        (folder / name).write_text("x")
    assert {p.name for p in list_images(folder)} == set(images)
    assert {Path(e.path).name for e in dataset.LoRADataset(tmp_path / "data", resolution=64).entries} == set(images)
    assert {f".{n.rsplit('.', 1)[1].lower()}" for n in images} <= IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------- excise

@pytest.fixture
def captioned(tmp_path):
    root = tmp_path / "data"
    image(root / "10_people" / "a.png")
    (root / "10_people" / "a.txt").write_text("A woman, womanly smile, Woman in red, man, outdoors", encoding="utf-8")
    image(root / "10_people" / "b.jpg")
    (root / "10_people" / "b.txt").write_text("\ufeffphoto of a young  girl, standing", encoding="utf-8")
    (root / "10_people" / "c.txt").write_text("landscape, sky", encoding="utf-8")
    (root / "notes.json").write_text("{}")
    return root


def test_excise_whole_words_ignoring_case(captioned, tmp_path):
    before = snapshot(captioned)
    report = excise_captions(captioned, tmp_path / "out", ["woman", "young girl"])
    assert snapshot(captioned) == before
    out = tmp_path / "out" / "10_people"
    assert (out / "a.txt").read_text(encoding="utf-8") == "A, womanly smile, in red, man, outdoors"
    assert (out / "b.txt").read_text(encoding="utf-8") == "photo of a, standing"
    assert (out / "c.txt").read_text(encoding="utf-8") == "landscape, sky"
    assert (out / "a.png").read_bytes() == (captioned / "10_people" / "a.png").read_bytes()
    assert (tmp_path / "out" / "notes.json").is_file()
    assert report.captions_scanned == 3 and report.captions_changed == 2
    assert report.removed == {"woman": 2, "young  girl": 1} or report.removed == {"woman": 2, "young girl": 1}
    assert "2 of 3 captions changed" in report.format()


def test_excise_case_sensitive_and_substrings(captioned, tmp_path):
    excise_captions(captioned, tmp_path / "cs", ["Woman"], case_sensitive=True)
    assert (tmp_path / "cs" / "10_people" / "a.txt").read_text() == "A woman, womanly smile, in red, man, outdoors"
    excise_captions(captioned, tmp_path / "sub", ["man"], whole_words=False)
    assert (tmp_path / "sub" / "10_people" / "a.txt").read_text() == "A wo, woly smile, Wo in red, outdoors"


def test_tools_read_captions_verbatim_with_the_datasets_reader(captioned, tmp_path):
    from lora_diffusion.data.captions import read_caption

    two_lines = captioned / "10_people" / "c.txt"
    two_lines.write_text("\ufeff  landscape, woman\nsky \n", encoding="utf-8")
    assert read_caption(two_lines, verbatim=True) == "  landscape, woman\nsky \n"  # excise rewrites the whole file
    with pytest.warns(UserWarning, match="2 lines"):
        assert read_caption(two_lines) == "landscape, woman"  # the trainer's caption: the first line
    excise_captions(captioned, tmp_path / "out", ["woman"], caption_extension="txt")  # the dot is added
    out = tmp_path / "out" / "10_people" / "c.txt"
    assert out.read_text(encoding="utf-8") == "landscape\nsky\n"  # both lines kept
    (captioned / "10_people" / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ToolError, match="a.txt' is not UTF-8"):
        excise_captions(captioned, tmp_path / "bad", ["woman"])


def test_excise_refuses_bad_outputs(captioned, tmp_path):
    with pytest.raises(ToolError, match="inside the input"):
        excise_captions(captioned, captioned / "out", ["x"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ToolError, match="not empty"):
        excise_captions(captioned, tmp_path / "full", ["x"])
    with pytest.raises(ToolError, match="no words"):
        excise_captions(captioned, tmp_path / "o", [" "])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()


def test_excise_command(captioned, tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("# gendered words\nwoman\n\nman\n")
    assert cli.main(["excise", str(captioned), str(tmp_path / "out"), "--words_file", str(words)]) == 0
    assert "removed 'woman' x2" in capsys.readouterr().out
    assert (tmp_path / "out" / "10_people" / "a.txt").read_text() == "A, womanly smile, in red, outdoors"
    assert cli.main(["excise", str(captioned), str(tmp_path / "out"), "--words", "x"]) == 2
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- balance

@pytest.fixture
def concepts(tmp_path):
    root = tmp_path / "train"
    for name, count in [("1_conceptA", 28), ("1_conceptB", 14), ("conceptC", 14), ("5_conceptD", 14)]:
        for i in range(count):
            image(root / name / f"{i}.png")
    (root / "empty_folder").mkdir()
    return root


def test_balance_plan_matches_the_seed(concepts):
    rows = {row.folder.name: row for row in plan_balance(concepts, 5200)}
    assert {name: row.new_name for name, row in rows.items()} == {
        "1_conceptA": "186_conceptA", "1_conceptB": "371_conceptB", "conceptC": "371_conceptC",
        "5_conceptD": "371_conceptD"}
    assert rows["1_conceptA"].steps == 28 * 186 and rows["conceptC"].old_repeats is None


def test_balance_is_a_dry_run_by_default(concepts, capsys):
    before = snapshot(concepts)
    assert cli.main(["balance", str(concepts), "--steps", "5200"]) == 0
    output = capsys.readouterr().out
    assert "dry run" in output and "186_conceptA" in output
    assert snapshot(concepts) == before


def test_balance_apply_and_copy(concepts, tmp_path):
    copies = apply_balance(plan_balance(concepts, 5200), copy_to=tmp_path / "balanced")
    assert sorted(p.name for p in (tmp_path / "balanced").iterdir()) == [
        "186_conceptA", "371_conceptB", "371_conceptC", "371_conceptD"]
    assert all(p.is_dir() for p in copies)
    assert cli.main(["balance", str(concepts), "--steps", "5200", "--apply"]) == 0
    assert sorted(p.name for p in concepts.iterdir()) == [
        "186_conceptA", "371_conceptB", "371_conceptC", "371_conceptD", "empty_folder"]
    with pytest.warns(dataset.DatasetWarning):
        ds = dataset.LoRADataset(concepts, resolution=64)
    assert len(ds) == 28 * 186 + 3 * 14 * 371


def test_balance_name_clash(tmp_path):
    image(tmp_path / "t" / "1_a" / "x.png")
    image(tmp_path / "t" / "2_a" / "x.png")
    with pytest.raises(ToolError, match="1_a"):
        plan_balance(tmp_path / "t", 10)
    with pytest.raises(ToolError, match="no concept folders"):
        plan_balance(tmp_path / "t" / "1_a", 10)


def test_balance_refuses_more_repeats_than_the_dataset_allows(tmp_path):
    image(tmp_path / "t" / "1_a" / "x.png")
    with pytest.raises(ToolError, match="'1_a' would need 20000 repeats.*at most 10000"):
        plan_balance(tmp_path / "t", 20000)


# ---------------------------------------------------------------------------------------------- caption sets

@pytest.fixture
def sources(tmp_path):
    images, tags, sentences = tmp_path / "images", tmp_path / "tags", tmp_path / "sentences"
    tags.mkdir()
    sentences.mkdir()
    for i in range(6):
        image(images / f"image{i}.png", color=(i * 40, 0, 0))
        (tags / f"image{i}.txt").write_text(f"solo, tag{i}")
        (sentences / f"image{i}.caption").write_text(f"A photo number {i}.\n")
        (images / f"image{i}.blip").write_text(f"blip {i}")
    return images, tags, sentences


def test_caption_sets_layout(sources, tmp_path):
    images, tags, sentences = sources
    before = snapshot(images)
    report = build_caption_sets(images, tmp_path / "train", {"empty": "empty", "wd": str(tags),
                                                             "kosmos": str(sentences), "blip": ".blip"})
    assert snapshot(images) == before
    out = tmp_path / "train"
    assert sorted(p.name for p in out.iterdir()) == ["10_blip", "10_empty", "10_kosmos", "10_wd"]
    assert (out / "10_empty" / "image3.txt").read_bytes() == b""
    assert (out / "10_wd" / "image3.txt").read_text() == "solo, tag3"
    assert (out / "10_kosmos" / "image3.txt").read_text() == "A photo number 3."
    assert (out / "10_blip" / "image3.txt").read_text() == "blip 3"
    assert (out / "10_wd" / "image3.png").read_bytes() == (images / "image3.png").read_bytes()
    assert report.sets == {"10_empty": 6, "10_wd": 6, "10_kosmos": 6, "10_blip": 6}
    ds = dataset.LoRADataset(out, resolution=64)
    assert len(ds) == 4 * 6 * 10
    assert sorted({ds[i]["caption"] for i in range(len(ds)) if "10_empty" in ds[i]["path"]}) == [""]


def test_caption_sets_sample_and_repeats(sources, tmp_path, capsys):
    images, tags, _ = sources
    assert cli.main(["caption-sets", str(images), str(tmp_path / "t"), "--set", "empty=empty", "--set",
                     f"wd={tags}", "--sample", "3", "--seed", "7", "--repeats", "5"]) == 0
    expected = sorted(p.name for p in random.Random(7).sample(sorted(images.glob("*.png")), 3))
    for folder in ("5_empty", "5_wd"):
        assert sorted(p.name for p in (tmp_path / "t" / folder).glob("*.png")) == expected
    assert "5_wd/  3 images" in capsys.readouterr().out


def test_caption_sets_missing_captions(sources, tmp_path):
    images, tags, _ = sources
    (tags / "image2.txt").unlink()
    with pytest.raises(ToolError, match="image2.png"):
        build_caption_sets(images, tmp_path / "a", {"wd": str(tags)})
    assert not (tmp_path / "a").exists()
    report = build_caption_sets(images, tmp_path / "b", {"wd": str(tags)}, missing="skip")
    assert report.sets == {"10_wd": 5} and not (tmp_path / "b" / "10_wd" / "image2.png").exists()
    build_caption_sets(images, tmp_path / "c", {"wd": str(tags)}, missing="empty")
    assert (tmp_path / "c" / "10_wd" / "image2.txt").read_text() == ""
    with pytest.raises(ToolError, match="not 'empty', an extension"):
        build_caption_sets(images, tmp_path / "d", {"wd": str(tmp_path / "nowhere")})
    with pytest.raises(ToolError, match="between 1 and the 6"):
        build_caption_sets(images, tmp_path / "e", {"e": "empty"}, sample=30)


# ---------------------------------------------------------------------------------------------- no lost input

def tool_command(tool, source, output):
    return {"excise": ["excise", str(source), str(output), "--words", "woman", "--overwrite"],
            "balance": ["balance", str(source), "--steps", "20", "--copy_to", str(output), "--overwrite"],
            "caption-sets": ["caption-sets", str(source), str(output), "--set", "e=empty", "--overwrite"]}[tool]


@pytest.mark.parametrize("tool", ["excise", "balance", "caption-sets"])
@pytest.mark.parametrize("relation", ["same", "inside", "parent", "ancestor"])
def test_tools_refuse_an_output_that_overlaps_the_input(tool, relation, tmp_path, capsys):
    data = tmp_path / "work" / "data"  # a dataset with a concept folder, as excise and balance read it
    image(data / "10_people" / "a.png")
    (data / "10_people" / "a.txt").write_text("a woman", encoding="utf-8")
    source = data / "10_people" if tool == "caption-sets" else data  # caption-sets reads an image folder
    output = {"same": source, "inside": source / "out", "parent": source.parent, "ancestor": tmp_path}[relation]
    before = snapshot(tmp_path)
    assert cli.main(tool_command(tool, source, output)) == 2
    error = capsys.readouterr().err
    assert f"'{output}'" in error and f"'{source}'" in error and "nothing was changed" in error
    assert snapshot(tmp_path) == before and not (source / "out").exists()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no staging folder was made either


def test_caption_sets_refuse_an_output_that_holds_a_caption_folder(sources, tmp_path):
    images, tags, _ = sources
    before = snapshot(tmp_path)
    with pytest.raises(ToolError, match=f"'{tags}' is the same folder as the input '{tags}'"):
        build_caption_sets(images, tags, {"wd": str(tags)}, overwrite=True)
    with pytest.raises(ToolError, match=f"'{tmp_path}' contains the input '{images}'"):
        build_caption_sets(images, tmp_path, {"wd": str(tags)}, overwrite=True)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------- cli

def test_more_subcommands_can_be_registered(capsys):
    def add_arguments(parser):
        parser.add_argument("--name", default="x")

    def run(args):
        print(f"hello {args.name}")
        return 0
    cli.register("hello", add_arguments, run, help="say hello")
    try:
        assert cli.main(["hello", "--name", "lora"]) == 0
        assert capsys.readouterr().out == "hello lora\n"
    finally:
        cli.SUBCOMMANDS.pop()
