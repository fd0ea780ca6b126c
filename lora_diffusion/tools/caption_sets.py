"""Caption sets (the 30-image seed): one image folder, several captions per image, one folder per set.

    lora-diffusion caption-sets images/ data/train --set empty=empty --set wd=tags/ --set kosmos=sentences/ \\
        --repeats 10 --sample 30 --seed 0

writes data/train/10_empty/, 10_wd/, 10_kosmos/, each with a copy of the images and '<stem>.txt' captions.
A source is 'empty' (empty caption files: trains the unconditional branch), a folder holding
'<stem>.txt' (or '.caption', or the chosen caption extension), or an extension such as '.wd14' naming
caption files next to the images.
"""

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lora_diffusion.data.captions import read_caption
from lora_diffusion.data.files import dotted_extension

from . import ToolError, build_folder_atomically, check_output_folder, list_images, require_folder


@dataclass(frozen=True)
class CaptionSource:
    kind: str  # "empty", "folder" or "extension"
    location: Path | None = None
    extension: str | None = None

    def find(self, image: Path, caption_extension: str):
        """The caption file for `image`, or None if there is none."""
        if self.kind == "extension":
            candidates = [image.with_name(image.stem + self.extension)]
        else:
            candidates = [self.location / (image.stem + ext) for ext in dict.fromkeys(
                [caption_extension, ".txt", ".caption"])]
        return next((c for c in candidates if c.is_file()), None)


def parse_source(spec: str, image_dir: Path) -> CaptionSource:
    """'empty' | '.ext' (captions next to the images) | a folder."""
    spec = spec.strip()
    if spec.lower() in ("empty", ""):
        return CaptionSource("empty")
    if spec.startswith(".") and "/" not in spec and "\\" not in spec and not Path(spec).is_dir():
        return CaptionSource("extension", image_dir, spec)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ToolError(f"caption source '{spec}' is not 'empty', an extension such as '.txt', or a folder")
    return CaptionSource("folder", folder)


@dataclass
class CaptionSetsReport:
    output_dir: Path
    images: list
    sets: dict = field(default_factory=dict)  # folder name -> number of images
    missing: dict = field(default_factory=dict)  # set name -> images without a caption

    def format(self) -> str:
        lines = [f"caption sets written to '{self.output_dir}' from {len(self.images)} images:"]
        for folder, count in self.sets.items():
            extra = f" ({len(self.missing[folder])} without a caption)" if self.missing.get(folder) else ""
            lines.append(f"  {folder}/  {count} images{extra}")
        return "\n".join(lines)


def build_caption_sets(image_dir, output_dir, sets: dict, *, repeats=10, caption_extension=".txt", sample=None,
                       seed=0, missing="error", link=False, overwrite=False) -> CaptionSetsReport:
    """Build '<repeats>_<name>/' under `output_dir` for each `name: source` of `sets`.
    missing: what to do when a source has no caption for an image: 'error', 'empty' or 'skip'."""
    image_dir = require_folder(image_dir, "image folder")
    if not sets:
        raise ToolError("no caption sets given: pass at least one NAME=SOURCE (e.g. empty=empty)")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ToolError(f"repeats must be an integer >= 1, got {repeats!r}")
    if missing not in ("error", "empty", "skip"):
        raise ToolError(f"missing must be 'error', 'empty' or 'skip', got {missing!r}")
    extension = dotted_extension(caption_extension)
    for name in sets:
        if not name or name != Path(name).name or name.startswith("."):
            raise ToolError(f"caption set name {name!r} must be a plain folder name such as 'wd'")
    sources = {name: parse_source(spec, image_dir) if isinstance(spec, str) else spec for name, spec in sets.items()}
    caption_folders = [source.location for source in sources.values() if source.kind == "folder"]
    output_dir = check_output_folder(output_dir, overwrite, inputs=[image_dir, *caption_folders])

    images = list_images(image_dir)
    if not images:
        raise ToolError(f"no images in '{image_dir}'")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, int) or not 1 <= sample <= len(images):
            raise ToolError(f"sample must be between 1 and the {len(images)} images of '{image_dir}', got {sample!r}")
        images = sorted(random.Random(seed).sample(images, sample), key=lambda p: p.name)

    plan, report = {}, CaptionSetsReport(output_dir, images)
    for name, source in sources.items():
        folder = f"{repeats}_{name}"
        rows, absent = [], []
        for image in images:
            caption_file = None if source.kind == "empty" else source.find(image, extension)
            if source.kind != "empty" and caption_file is None:
                absent.append(image.name)
                if missing == "skip":
                    continue
            rows.append((image, caption_file))
        if absent and missing == "error":
            where = source.location if source.kind == "folder" else f"'<image>{source.extension}' files"
            raise ToolError(f"caption set '{name}': {len(absent)} image(s) have no caption in {where}, e.g. "
                            f"{', '.join(absent[:5])}; pass missing='empty' or 'skip' to go on")
        plan[folder] = rows
        report.sets[folder] = len(rows)
        report.missing[folder] = absent

    def fill(temp):
        for folder, rows in plan.items():
            (temp / folder).mkdir()
            for image, caption_file in rows:
                _place(image, temp / folder / image.name, link)
                text = ""  # the source's whole text, stripped: a caption file like its source, not one line of it
                if caption_file is not None:
                    text = read_caption(caption_file, verbatim=True, error=ToolError).strip()
                (temp / folder / (image.stem + extension)).write_text(text, encoding="utf-8")

    build_folder_atomically(output_dir, fill)
    return report


def _place(source: Path, target: Path, link: bool):
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copy2(source, target)


def add_arguments(parser):
    parser.add_argument("image_dir", help="folder with the images")
    parser.add_argument("output_dir", help="new folder: becomes the train_data_dir")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=SOURCE", required=True,
                        help="a caption set: SOURCE is 'empty', a folder of captions, or an extension such as "
                             "'.wd14' for caption files next to the images; repeat for each set")
    parser.add_argument("--repeats", type=int, default=10, help="repeats in the folder names (default 10)")
    parser.add_argument("--sample", type=int, help="use a random sample of N images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--caption_extension", "--caption-extension", default=".txt",
                        help="extension of the written captions")
    parser.add_argument("--missing", choices=("error", "empty", "skip"), default="error",
                        help="when a source has no caption for an image")
    parser.add_argument("--link", action="store_true", help="hard-link the images instead of copying")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def run(args) -> int:
    sets = {}
    for item in args.sets:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ToolError(f"--set {item!r}: expected NAME=SOURCE, e.g. empty=empty or wd=tags/")
        if name in sets:
            raise ToolError(f"--set: the name '{name}' is given twice")
        sets[name] = spec
    report = build_caption_sets(args.image_dir, args.output_dir, sets, repeats=args.repeats,
                                caption_extension=args.caption_extension, sample=args.sample, seed=args.seed,
                                missing=args.missing, link=args.link, overwrite=args.overwrite)
    print(report.format())
    return 0
