"""kohya's fine-tuning dataset: --in_json / metadata_file, the metadata JSON of kohya's finetune scripts (image key
-> caption and tags). The JSON files are written here; expected captions follow kohya's rule (caption, the
caption separator, the tags) written out by hand."""

import json

import pytest
from PIL import Image

from dataset import DatasetError, DatasetWarning, LoRADataset


def image_folder(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (64 + 32 * i, 64), (i * 40, 0, 0)).save(folder / name)
    return folder


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


METADATA = {"a": {"caption": "a photo", "tags": "t1, t2", "train_resolution": [64, 64]},
            "b": {"tags": "x, y"}, "c": {"caption": "only a caption\nsecond line"}}
CAPTIONS = {"a.png": "a photo,t1, t2", "b.jpg": "x, y", "c.webp": "only a caption"}


def captions_by_name(ds):
    return {item["path"].rsplit("/", 1)[-1]: item["caption"] for item in (ds[i] for i in range(len(ds)))}


def test_in_json_keys_are_stems_in_train_data_dir(tmp_path):
    folder = image_folder(tmp_path / "images", ["a.png", "b.jpg", "c.webp", "unlisted.png"])
    meta = write_json(tmp_path / "meta.json", METADATA)
    ds = LoRADataset(folder, in_json=str(meta), dataset_repeats=3, resolution=64)
    assert len(ds) == 3 * 3 and ds.num_train_images == 9  # only the images the JSON names
    assert captions_by_name(ds) == CAPTIONS
    assert ds.subsets[0].num_repeats == 3


def test_in_json_keys_may_be_paths_and_json_lines(tmp_path):
    folder = image_folder(tmp_path / "images", ["a.png", "b.jpg", "c.webp"])
    meta = write_json(tmp_path / "meta.json", {str(folder / "a.png"): METADATA["a"], "b.jpg": METADATA["b"]})
    ds = LoRADataset(folder, in_json=str(meta), resolution=64)
    assert captions_by_name(ds) == {"a.png": CAPTIONS["a.png"], "b.jpg": CAPTIONS["b.jpg"]}
    lines = tmp_path / "meta.jsonl"
    lines.write_text('{"image_path": "c.webp", "caption": "from lines", "tags": "q"}\n\n'
                     '{"image_path": "a", "caption": "another"}\n', encoding="utf-8")
    ds = LoRADataset(folder, in_json=str(lines), resolution=64)
    assert captions_by_name(ds) == {"c.webp": "from lines,q", "a.png": "another"}


def test_wildcard_tags_follow_every_line(tmp_path):
    folder = image_folder(tmp_path / "images", ["c.png"])
    meta = write_json(tmp_path / "meta.json", {"c": {"caption": "one\ntwo", "tags": "t"}})
    ds = LoRADataset(folder, in_json=str(meta), resolution=64, enable_wildcard=True)
    seen = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        seen.add(ds[0]["caption"])
    assert seen == {"one,t", "two,t"}


@pytest.mark.parametrize("case,message", [
    ("missing image", "image 'zzz' is not in"),
    ("not json", "cannot be parsed as JSON"),
    ("not a mapping", "expected an object of"),
    ("no file", "metadata file '.*nothing.json' does not exist"),
    ("reg", "reg_data_dir cannot be used with in_json"),
    ("repeats", "dataset_repeats must be an integer from 1"),
])
def test_metadata_errors_name_the_file(tmp_path, case, message):
    folder = image_folder(tmp_path / "images", ["a.png"])
    meta = tmp_path / "meta.json"
    meta.write_text({"not json": "{oops", "not a mapping": "[1, 2]"}.get(case, json.dumps(
        {"a": {"caption": "x"}, **({"zzz": {"caption": "y"}} if case == "missing image" else {})})))
    options = {"in_json": str(tmp_path / "nothing.json") if case == "no file" else str(meta), "resolution": 64}
    if case == "repeats":
        options["dataset_repeats"] = 0
    with pytest.raises(DatasetError, match=message):
        LoRADataset(folder, tmp_path if case == "reg" else None, **options)


def test_metadata_file_in_a_dataset_config(tmp_path):
    image_folder(tmp_path / "images", ["a.png", "b.jpg", "c.webp"])
    write_json(tmp_path / "meta.json", METADATA)
    elsewhere = image_folder(tmp_path / "other", ["z.png"])
    write_json(tmp_path / "absolute.json", {str(elsewhere / "z.png"): {"caption": "zed"}})
    image_folder(tmp_path / "plain", ["p.png"])
    config = tmp_path / "data.toml"
    config.write_text("[[datasets]]\nresolution = 64\n"
                      "[[datasets.subsets]]\nimage_dir = 'images'\nmetadata_file = 'meta.json'\nnum_repeats = 2\n"
                      "[[datasets.subsets]]\nmetadata_file = 'absolute.json'\n"
                      "[[datasets.subsets]]\nimage_dir = 'plain'\nclass_tokens = 'pp'\n", encoding="utf-8")
    with pytest.warns(DatasetWarning, match="in_json ignored"):
        ds = LoRADataset.from_config(config, dataset_repeats=5, in_json="ignored.json")
    assert [s.num_repeats for s in ds.subsets] == [2, 5, 5]  # dataset_repeats: the num_repeats of those without
    assert len(ds) == 3 * 2 + 5 + 5
    assert captions_by_name(ds) == {**CAPTIONS, "z.png": "zed", "p.png": "pp"}
    # kohya names a metadata subset by its file in ss_dataset_dirs and ss_tag_frequency
    assert ds.dataset_dirs == {"meta.json": {"n_repeats": 2, "img_count": 3},
                               "absolute.json": {"n_repeats": 5, "img_count": 1}, "plain": {"n_repeats": 5,
                                                                                            "img_count": 1}}
    assert ds.tag_frequency["meta.json"] == {"a photo": 1, "t1": 1, "t2": 1, "x": 1, "y": 1, "only a caption": 1}
    assert "captions from metadata" in ds.summary()


def test_metadata_config_errors(tmp_path):
    image_folder(tmp_path / "images", ["a.png"])
    config = tmp_path / "bad.toml"
    config.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'images'\nmetadata_file = 'nope.json'\n")
    with pytest.raises(DatasetError, match="bad.toml.*metadata_file 'nope.json' is not a file"):
        LoRADataset.from_config(config, resolution=64)
    write_json(tmp_path / "m.json", {"a": {"caption": "x"}})
    config.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'images'\nmetadata_file = 'm.json'\n"
                      "is_reg = true\n")
    with pytest.raises(DatasetError, match="metadata_file subset cannot be is_reg"):
        LoRADataset.from_config(config, resolution=64)
