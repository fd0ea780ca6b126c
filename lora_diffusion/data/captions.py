"""Captions: reading a caption file, and the per-sample processing (prefix/suffix, dropout, shuffle)."""

import random
from pathlib import Path

from lora_diffusion.data.errors import DatasetError, warn
from lora_diffusion.data.subset import Subset


def read_caption(path, *, verbatim=False, error=DatasetError) -> str:
    """A UTF-8 caption file (a BOM is fine); the one caption reader of the dataset and the tools.

    verbatim=False: the caption the trainer uses, the first non-empty line stripped ('' for an empty file; a
    warning when there are more lines). verbatim=True: the file's whole text as written (the BOM dropped), for a
    tool that rewrites or copies the file. A file that is not UTF-8 raises `error` (DatasetError; the tools pass
    their ToolError) naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"caption file '{path}' is not UTF-8 text ({e.reason} at byte {e.start}); "
                    f"re-save it as UTF-8") from None
    if verbatim:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        warn(f"caption file {path} has {len(lines)} lines; only the first is used")
    return lines[0] if lines else ""


def _join(left: str, right: str) -> str:
    left, right = left.rstrip(), right.lstrip()
    if not left or not right:
        return left or right
    return left + right if right[0] in ",.;:" else left + " " + right


def process_caption(caption: str, subset: Subset, rng: random.Random) -> str:
    """kohya's order: prefix/suffix, whole-caption dropout, then keep_tokens / shuffle / tag dropout."""
    caption = _join(_join(subset.caption_prefix or "", caption), subset.caption_suffix or "")
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0:
        separator = subset.caption_separator
        tags = [t.strip() for t in caption.split(separator) if t.strip()]
        fixed, flexible = tags[:subset.keep_tokens], tags[subset.keep_tokens:]
        if subset.shuffle_caption:
            rng.shuffle(flexible)
        if subset.caption_tag_dropout_rate > 0:
            flexible = [t for t in flexible if rng.random() >= subset.caption_tag_dropout_rate]
        caption = (separator.strip() + " " if separator.strip() else separator).join(fixed + flexible)
    return caption.strip()
