"""kohya's caption options: keep_tokens_separator, secondary_separator, enable_wildcard,
caption_dropout_every_n_epochs and the token warm-up. Expected captions are written out here by hand or from
kohya's formulas, never produced by dataset.py."""

import copy
import math
import pickle

import pytest
from PIL import Image

from dataset import DatasetError, DatasetWarning, LoRADataset
from test_dataset import worker_loader


def caption_dataset(tmp_path, caption, name="1_x", **options):
    folder = tmp_path / "t" / name
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    (folder / "a.txt").write_text(caption, encoding="utf-8")
    return LoRADataset(tmp_path / "t", resolution=64, **options)


def captions_over_epochs(ds, epochs=60):
    seen = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        seen.append(ds[0]["caption"])
    return seen


def test_keep_tokens_separator_fixes_the_front_and_the_end(tmp_path):
    ds = caption_dataset(tmp_path, "a, b ||| c, d, e ||| f, g", shuffle_caption=True, keep_tokens_separator="|||",
                         keep_tokens=5)  # the separator wins over keep_tokens
    orders = set()
    for caption in captions_over_epochs(ds):
        tags = caption.split(", ")
        assert tags[:2] == ["a", "b"] and tags[-2:] == ["f", "g"] and sorted(tags[2:5]) == ["c", "d", "e"]
        orders.add(tuple(tags[2:5]))
    assert len(orders) == 6  # all 3! middle orders over 60 epochs
    dropped = caption_dataset(tmp_path / "d", "a ||| c, d, e ||| f", caption_tag_dropout_rate=1.0,
                              keep_tokens_separator="|||")
    assert dropped[0]["caption"] == "a, f"


def test_keep_tokens_separator_never_reaches_the_text_encoder(tmp_path):
    ds = caption_dataset(tmp_path, "a, b ||| c, d", keep_tokens_separator="|||")
    assert ds[0]["caption"] == "a, b, c, d"  # kohya passes 'a, b ||| c, d' on when nothing shuffles
    assert ds.captions_are_fixed()


def test_secondary_separator_keeps_a_tag_group_together(tmp_path):
    ds = caption_dataset(tmp_path, "x, red;;;car, y, z", shuffle_caption=True, secondary_separator=";;;")
    orders = set()
    for caption in captions_over_epochs(ds):
        tags = caption.split(", ")
        assert sorted(tags) == ["red,car", "x", "y", "z"]  # kohya joins the group with caption_separator itself
        orders.add(caption)
    assert len(orders) > 6
    plain = caption_dataset(tmp_path / "p", "x, red;;;car", secondary_separator=";;;")
    assert plain[0]["caption"] == "x, red,car"


def test_wildcards_pick_each_choice_and_keep_escaped_braces(tmp_path):
    ds = caption_dataset(tmp_path, "a {red|green|blue} car, {{literal}}, {big|small}", enable_wildcard=True)
    seen = set(captions_over_epochs(ds, 80))
    expected = {f"a {colour} car, {{literal}}, {size}" for colour in ("red", "green", "blue")
                for size in ("big", "small")}
    assert seen == expected
    assert not ds.captions_are_fixed()
    off = caption_dataset(tmp_path / "off", "a {red|blue} car")
    assert off[0]["caption"] == "a {red|blue} car"
    assert caption_dataset(tmp_path / "plain", "a car", enable_wildcard=True).captions_are_fixed()


def test_wildcard_caption_files_give_one_line_at_random(tmp_path):
    ds = caption_dataset(tmp_path, "first line\n\nsecond {one|two}\nthird\n", enable_wildcard=True,
                         caption_prefix="sks,")
    assert set(captions_over_epochs(ds, 80)) == {"sks, first line", "sks, second one", "sks, second two",
                                                 "sks, third"}
    assert ds.tag_frequency["1_x"] == {"first line": 1, "second {one|two}": 1, "third": 1}  # each line's tags
    with pytest.warns(DatasetWarning, match="3 lines; only the first"):
        off = caption_dataset(tmp_path / "off", "first line\nsecond\nthird")
    assert off[0]["caption"] == "first line"


def test_caption_dropout_every_n_epochs_counts_epochs_from_one(tmp_path):
    ds = caption_dataset(tmp_path, "a, b", caption_dropout_every_n_epochs=3)
    captions = captions_over_epochs(ds, 9)  # the loop's epochs 0..8 are kohya's 1..9: 3, 6 and 9 drop
    assert captions == ["a, b", "a, b", "", "a, b", "a, b", "", "a, b", "a, b", ""]
    assert not ds.captions_are_fixed()


TAGS = ", ".join(f"t{i}" for i in range(8))


def warmup_tags(step, flexible, minimum, steps):
    """kohya's count of tags at a step: floor(step * (len - min) / steps) + min, until `steps`."""
    return flexible if step >= steps else flexible[:math.floor(step * (len(flexible) - minimum) / steps) + minimum]


def test_token_warmup_grows_the_caption_step_by_step(tmp_path):
    ds = caption_dataset(tmp_path, TAGS, keep_tokens=1, token_warmup_min=2, token_warmup_step=10)
    assert not ds.captions_are_fixed()
    flexible = [f"t{i}" for i in range(1, 8)]
    counts = []
    for step in range(13):
        ds.set_current_step(step)
        expected = ["t0"] + warmup_tags(step, flexible, 2, 10)
        assert ds[0]["caption"] == ", ".join(expected)
        counts.append(len(expected))
    assert counts == [3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 8]


def test_a_fractional_warmup_is_a_share_of_the_run(tmp_path):
    ds = caption_dataset(tmp_path, TAGS, token_warmup_min=1, token_warmup_step=0.25)
    with pytest.raises(DatasetError, match="set_max_train_steps"):
        ds[0]
    ds.set_max_train_steps(40)  # 0.25 * 40 = 10 steps
    ds.set_current_step(5)
    assert ds[0]["caption"] == ", ".join(warmup_tags(5, TAGS.split(", "), 1, 10))
    ds.set_current_step(10)
    assert ds[0]["caption"] == TAGS


def test_workers_and_copies_see_the_step(tmp_path):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64)).save(folder / f"a{i}.png")
        (folder / f"a{i}.txt").write_text(TAGS, encoding="utf-8")
    ds = LoRADataset(tmp_path / "t", resolution=64, token_warmup_min=1, token_warmup_step=7)
    _, loader = worker_loader(ds, batch_size=2, workers=1)
    for step in (0, 3):
        ds.set_current_step(step)
        for batch in loader:
            assert batch["captions"] == [", ".join(warmup_tags(step, TAGS.split(", "), 1, 7))] * 2
    ds.set_current_step(4)
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert clone.step == 4 and clone[0]["caption"] == ds[0]["caption"]
        clone.set_current_step(6)
        assert ds.step == 4


@pytest.mark.parametrize("options,message", [
    ({"caption_dropout_every_n_epochs": -1}, "caption_dropout_every_n_epochs must be an integer >= 0"),
    ({"token_warmup_step": -2}, "token_warmup_step must be a number >= 0"),
    ({"token_warmup_min": 1.5}, "token_warmup_min must be an integer >= 0"),
    ({"secondary_separator": ""}, "secondary_separator must be a non-empty string"),
])
def test_bad_caption_options_fail_before_scanning(options, message):
    with pytest.raises(DatasetError, match=message):
        LoRADataset("/nonexistent-folder", **options)


def test_caption_options_in_a_dataset_config(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    (folder / "a.txt").write_text("p ||| q, r", encoding="utf-8")
    config = tmp_path / "c.toml"
    config.write_text("[general]\nkeep_tokens_separator = '|||'\nenable_wildcard = true\n"
                      "caption_dropout_every_n_epochs = 2\ntoken_warmup_min = 1\ntoken_warmup_step = 5\n"
                      "secondary_separator = ';;;'\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                      "image_dir = 'a'\n", encoding="utf-8")
    ds = LoRADataset.from_config(config)
    subset = ds.subsets[0]
    assert (subset.keep_tokens_separator, subset.enable_wildcard, subset.caption_dropout_every_n_epochs,
            subset.token_warmup_min, subset.token_warmup_step, subset.secondary_separator) == \
        ("|||", True, 2, 1, 5, ";;;")
    assert ds[0]["caption"] == "p, q"  # step 0: the fixed tag and token_warmup_min flexible one
