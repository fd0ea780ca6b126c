"""docs/dataset.md's table of options is the one made from the declaration (Subset's fields), and every field
declares what the generated flags need."""

from dataclasses import fields
from pathlib import Path

from lora_diffusion.data.subset import FLAG_DEFAULTS, Subset, option_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "dataset.md"


def test_the_docs_table_is_the_declaration():
    text = DOC.read_text(encoding="utf-8")
    begin, end = "<!-- option table: begin -->\n", "\n<!-- option table: end -->"
    assert text[text.index(begin) + len(begin):text.index(end)] == option_table(), \
        "docs/dataset.md's option table is stale: paste lora_diffusion.data.subset.option_table() between its markers"


def test_every_option_declares_its_kind_level_and_help():
    for f in fields(Subset):
        assert f.metadata["level"] in ("folder", "subset", "dataset", "flag"), f.name
        assert f.metadata["kind"] in (str, bool, int, float, tuple, "resolution"), f.name
        help_text = f.metadata["help"]
        assert help_text and "\n" not in help_text and "%" not in help_text, f.name  # argparse formats help with %
        if "choices" in f.metadata:
            assert f.default is None or f.default in f.metadata["choices"], f.name
    assert set(FLAG_DEFAULTS) == {f.name for f in fields(Subset) if f.metadata["level"] != "folder"
                                  or "flag_help" in f.metadata} - {"num_repeats"}


def test_the_trainers_call_shape(tmp_path):
    """train.py builds LoRADataset(train, reg, **{name: value for name in FLAG_DEFAULTS}, seed=...) and
    LoRADataset.from_config(path, **same, seed=...); switches may come as None (unset flags)."""
    from PIL import Image

    from dataset import LoRADataset

    folder = tmp_path / "train" / "2_x"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    (folder / "a.txt").write_text("a, b", encoding="utf-8")
    options = {name: None if isinstance(value, bool) else value for name, value in FLAG_DEFAULTS.items()}
    options["resolution"] = 64
    ds = LoRADataset(tmp_path / "train", None, **options, seed=3)
    assert (len(ds), ds.seed, ds[0]["caption"], ds.has_masks) == (2, 3, "a, b", False)
    config = tmp_path / "c.toml"
    config.write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'train/2_x'\n", encoding="utf-8")
    ds = LoRADataset.from_config(config, **options, seed=4)
    assert (len(ds), ds.seed, ds[0]["caption"]) == (1, 4, "a, b")
