"""The flag table of docs/guide.md, made from the declarations; `python -m lora_diffusion.options.docs_table`
rewrites it in place (between its two marker lines), and a test checks that the page holds the current table."""

import sys
from pathlib import Path

from .declare import Option
from .trainer import trainer_options

BEGIN, END = "<!-- flags: made by python -m lora_diffusion.options.docs_table -->", "<!-- flags: end -->"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(option: Option) -> str:
    default = "" if option.default in (None, "", [], False) or option.dest else f"`{option.default}`"
    origin = "kohya" if option.kohya else "ours"
    what = option.help
    if option.dest:
        what = f"{what} (sets `--{option.dest}`)" if "--" not in what else what
    if option.refused:
        what = f"**refused:** {option.refused}"
    return f"| `--{option.name}` | {_cell(default)} | {origin} | {_cell(what)} |"


def flag_table() -> str:
    lines, group = [], None
    for option in trainer_options():
        if option.group != group:
            group = option.group
            lines += ["", f"**{group}**", "", "| flag | default | from | what |", "|---|---|---|---|"]
        lines.append(_row(option))
    return "\n".join([BEGIN, *lines, "", END])


def replace_table(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"the page has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    return head + flag_table() + rest.split(END, 1)[1]


if __name__ == "__main__":
    page = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/guide.md")
    page.write_text(replace_table(page.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the flag table of {page}")
