"""Caption excision (the bias-mitigation seed): remove words or phrases from every caption of a dataset.

The input is never modified: the whole dataset (images, captions, everything else) is copied to a new
folder with the phrases cut out of its captions, and a report says what changed.

    lora-diffusion excise data/train data/train_excised --words woman man "young girl"
"""

import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_diffusion.data.captions import read_caption
from lora_diffusion.data.files import dotted_extension

from . import ToolError, build_folder_atomically, check_output_folder, require_folder


def phrase_pattern(phrases, *, case_sensitive=False, whole_words=True) -> re.Pattern:
    """One regex matching any phrase, longest first; inner whitespace matches any run of whitespace."""
    cleaned = sorted({" ".join(p.split()) for p in phrases if p and p.strip()}, key=len, reverse=True)
    if not cleaned:
        raise ToolError("no words or phrases to excise: pass --words or --words-file")
    alternatives = []
    for phrase in cleaned:
        body = r"\s+".join(re.escape(word) for word in phrase.split(" "))
        alternatives.append(rf"(?<!\w){body}(?!\w)" if whole_words else body)
    return re.compile("|".join(alternatives), 0 if case_sensitive else re.IGNORECASE)


def tidy_caption(text: str) -> str:
    """Repair what a cut leaves behind: doubled spaces, empty tags, spaces before punctuation."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:!?])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    text = re.sub(r"\(\s*\)", "", text)
    return text.strip().strip(",;").strip()


def excise_text(text: str, pattern: re.Pattern):
    """(new text, Counter of removed phrases as written) for one caption."""
    removed = Counter(match.group(0).lower() if pattern.flags & re.IGNORECASE else match.group(0)
                      for match in pattern.finditer(text))
    if not removed:
        return text, removed
    lines = [tidy_caption(pattern.sub("", line)) for line in text.split("\n")]
    return "\n".join(lines), removed


@dataclass
class ExcisionReport:
    output_dir: Path
    captions_scanned: int = 0
    captions_changed: int = 0
    files_copied: int = 0
    removed: Counter = field(default_factory=Counter)
    changes: list = field(default_factory=list)  # (relative path, before, after)

    def format(self, show=10) -> str:
        lines = [f"excised captions written to '{self.output_dir}': {self.captions_changed} of "
                 f"{self.captions_scanned} captions changed, {self.files_copied} other files copied"]
        for phrase, count in self.removed.most_common():
            lines.append(f"  removed {phrase!r} x{count}")
        for path, before, after in self.changes[:show]:
            lines.append(f"  {path}: {before!r} -> {after!r}")
        if len(self.changes) > show:
            lines.append(f"  ... and {len(self.changes) - show} more")
        return "\n".join(lines)


def excise_captions(input_dir, output_dir, phrases, *, caption_extension=".txt", case_sensitive=False,
                    whole_words=True, overwrite=False) -> ExcisionReport:
    """Copy `input_dir` (recursively) to `output_dir`, removing `phrases` from every caption file."""
    input_dir = require_folder(input_dir, "input folder")
    output_dir = check_output_folder(output_dir, overwrite, inputs=[input_dir])
    extension = dotted_extension(caption_extension)
    pattern = phrase_pattern(phrases, case_sensitive=case_sensitive, whole_words=whole_words)
    report = ExcisionReport(output_dir)

    def fill(temp):
        for root, dirs, files in os.walk(input_dir):
            dirs.sort()
            relative = Path(root).relative_to(input_dir)
            (temp / relative).mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                source, target = Path(root) / name, temp / relative / name
                if not name.lower().endswith(extension.lower()):
                    shutil.copy2(source, target)
                    report.files_copied += 1
                    continue
                before = read_caption(source, verbatim=True, error=ToolError)  # rewritten as it was, less the phrases
                after, removed = excise_text(before, pattern)
                target.write_text(after, encoding="utf-8")
                shutil.copystat(source, target)
                report.captions_scanned += 1
                if removed:
                    report.captions_changed += 1
                    report.removed.update(removed)
                    report.changes.append((str(relative / name), before.strip(), after.strip()))
        if report.captions_scanned == 0:
            raise ToolError(f"no '{extension}' caption files under '{input_dir}' (set caption_extension)")

    build_folder_atomically(output_dir, fill)
    return report


def read_words_file(path) -> list:
    """One word or phrase a line; blank lines and lines starting with # are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"words file '{path}' does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def add_arguments(parser):
    parser.add_argument("input_dir", help="dataset folder to read (left untouched)")
    parser.add_argument("output_dir", help="new folder for the excised copy")
    parser.add_argument("--words", nargs="+", default=[], metavar="PHRASE", help="words or phrases to remove")
    parser.add_argument("--words_file", "--words-file", help="file with one word or phrase a line")
    parser.add_argument("--caption_extension", "--caption-extension", default=".txt")
    parser.add_argument("--case_sensitive", "--case-sensitive", action="store_true",
                        help="match case exactly (default: ignore case)")
    parser.add_argument("--substrings", action="store_true",
                        help="also remove matches inside longer words (default: whole words only)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--show", type=int, default=10, help="how many changed captions to print")


def run(args) -> int:
    phrases = list(args.words) + (read_words_file(args.words_file) if args.words_file else [])
    report = excise_captions(args.input_dir, args.output_dir, phrases, caption_extension=args.caption_extension,
                             case_sensitive=args.case_sensitive, whole_words=not args.substrings,
                             overwrite=args.overwrite)
    print(report.format(show=args.show))
    return 0
