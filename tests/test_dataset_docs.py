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
    assert set(FLAG_DEFAULTS) == {f.name for f in fields(Subset) if f.metadata["level"] != "folder"} - {"num_repeats"}
