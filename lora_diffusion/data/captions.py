"""Captions: reading a caption file, and the per-sample processing (kohya's process_caption: prefix/suffix,
dropout, wildcards, fixed and shuffled tags, token warm-up, tag dropout, the secondary separator)."""

import math
import random
import re
from pathlib import Path

from .errors import DatasetError, warn
from .subset import Subset


def read_caption(path, *, verbatim=False, all_lines=False, error=DatasetError) -> str:
    """A UTF-8 caption file (a BOM is fine); the one caption reader of the dataset and the tools.

    verbatim=False: the caption the trainer uses, the first non-empty line stripped ('' for an empty file; a
    warning when there are more lines); all_lines=True (enable_wildcard): every non-empty line, stripped, joined
    by newlines (one is picked per sample). verbatim=True: the file's whole text as written (the BOM dropped), for
    a tool that rewrites or copies the file. A file that is not UTF-8 raises `error` (DatasetError; the tools pass
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
    if all_lines:
        return "\n".join(lines)
    if len(lines) > 1:
        warn(f"caption file {path} has {len(lines)} lines; only the first is used (enable_wildcard picks one "
             f"at random)")
    return lines[0] if lines else ""


def _join(left: str, right: str) -> str:
    left, right = left.rstrip(), right.lstrip()
    if not left or not right:
        return left or right
    return left + right if right[0] in ",.;:" else left + " " + right


_WILDCARD = re.compile(r"\{([^{}]*)\}")


def expand_wildcards(text: str, rng: random.Random) -> str:
    """'{a|b|c}' -> one of a, b, c; '{{' and '}}' are literal braces."""
    parts = re.split(r"(\{\{|\}\})", text)  # keep the escapes out of the pattern's reach
    out = []
    for part in parts:
        if part in ("{{", "}}"):
            out.append(part[0])
        else:
            out.append(_WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), part))
    return "".join(out)


def warmup_steps(subset: Subset, max_train_steps: int) -> int:
    """token_warmup_step in steps: below 1 it is a share of the run's steps (kohya's rule)."""
    step = subset.token_warmup_step
    if 0 < step < 1:
        if not max_train_steps:
            raise DatasetError(f"token_warmup_step {step} is a share of max_train_steps, which the dataset was not "
                               f"told: the trainer calls dataset.set_max_train_steps(n) before training")
        return math.floor(step * max_train_steps)
    return int(step)


def caption_varies(subset: Subset, caption: str) -> bool:
    """Whether this caption can come out differently between samples (a random option, the epoch or the step)."""
    return bool(subset.shuffle_caption or subset.caption_dropout_rate or subset.caption_tag_dropout_rate
                or subset.caption_dropout_every_n_epochs or subset.token_warmup_step
                or (subset.enable_wildcard and ("{" in caption or "\n" in caption)))


def process_caption(caption: str, subset: Subset, rng: random.Random, *, epoch: int = 0, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """kohya's order: prefix/suffix, whole-caption dropout, wildcards, then fixed / warm-up / shuffled / dropped
    tags, then the secondary separator. `epoch` counts from 0 (the loop's), `step` is the optimizer steps done."""
    lines = caption.split("\n")  # several only with enable_wildcard (read_caption's all_lines)
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    every = subset.caption_dropout_every_n_epochs
    if every and (epoch + 1) % every == 0:  # kohya counts epochs from 1: the N-th, 2N-th, ... epoch
        return ""
    line = rng.choice(lines) if subset.enable_wildcard else lines[0]
    # the prefix and suffix go on the chosen line (kohya adds them to the whole text, i.e. to the first and last
    # lines only)
    caption = _join(_join(subset.caption_prefix or "", line), subset.caption_suffix or "")
    if subset.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    separator, fixed_separator = subset.caption_separator, subset.keep_tokens_separator
    split_by_separator = bool(fixed_separator) and fixed_separator in caption
    warmup = warmup_steps(subset, max_train_steps)
    if subset.shuffle_caption or subset.caption_tag_dropout_rate > 0 or warmup or split_by_separator:
        def tags(text):
            return [t.strip() for t in text.split(separator) if t.strip()]
        suffix = []
        if split_by_separator:
            fixed, flexible = caption.split(fixed_separator, 1)
            if fixed_separator in flexible:
                flexible, rest = flexible.split(fixed_separator, 1)
                suffix = tags(rest)
            fixed, flexible = tags(fixed), tags(flexible)
        else:
            all_tags = tags(caption)
            fixed, flexible = all_tags[:subset.keep_tokens], all_tags[subset.keep_tokens:]
        if warmup and step < warmup:
            count = math.floor(step * (len(flexible) - subset.token_warmup_min) / warmup) + subset.token_warmup_min
            flexible = flexible[:max(0, count)]
        if subset.shuffle_caption:
            rng.shuffle(flexible)
        if subset.caption_tag_dropout_rate > 0:
            flexible = [t for t in flexible if rng.random() >= subset.caption_tag_dropout_rate]
        caption = (separator.strip() + " " if separator.strip() else separator).join(fixed + flexible + suffix)
    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, separator)
    return caption.strip()
