"""Repeat balancing (the multi-concept seed): give every concept the same number of steps per epoch.

repeats = round(steps_per_concept / images), e.g. 5200 / 14 = 371 and 5200 / 28 = 186, and the folder is
renamed (or copied) to '<repeats>_<name>'. A dry run (the default) only prints the plan.

    lora-diffusion balance data/train --steps 5200            # show the plan
    lora-diffusion balance data/train --steps 5200 --apply    # rename the folders
    lora-diffusion balance data/train --steps 5200 --copy_to data/balanced
"""

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lora_diffusion.data.files import MAX_REPEATS

from . import ToolError, build_folder_atomically, check_output_folder, list_images, require_folder, split_concept_name


@dataclass
class BalanceRow:
    folder: Path
    images: int
    old_repeats: int | None
    new_repeats: int
    new_name: str

    @property
    def steps(self) -> int:
        return self.images * self.new_repeats


def balanced_repeats(steps_per_concept: int, images: int) -> int:
    return max(1, math.floor(steps_per_concept / images + 0.5))


def plan_balance(dataset_dir, steps_per_concept) -> list:
    """One row per concept folder (with or without a repeat prefix) of `dataset_dir` that holds images."""
    dataset_dir = require_folder(dataset_dir, "dataset folder")
    if isinstance(steps_per_concept, bool) or not isinstance(steps_per_concept, int) or steps_per_concept < 1:
        raise ToolError(f"steps per concept must be an integer >= 1, got {steps_per_concept!r}")
    rows = []
    for folder in sorted(p for p in dataset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = len(list_images(folder))
        if images == 0:
            continue
        old, name = split_concept_name(folder.name)
        repeats = balanced_repeats(steps_per_concept, images)
        if repeats > MAX_REPEATS:
            raise ToolError(f"'{folder.name}' would need {repeats} repeats ({steps_per_concept} steps / {images} "
                            f"images); the dataset allows at most {MAX_REPEATS}: use fewer steps and more epochs")
        rows.append(BalanceRow(folder, images, old, repeats, f"{repeats}_{name}"))
    if not rows:
        raise ToolError(f"no concept folders with images in '{dataset_dir}': expected subfolders such as "
                        f"'{dataset_dir / '10_conceptA'}' holding the images")
    names = [row.new_name for row in rows]
    for clash in sorted({n for n in names if names.count(n) > 1}):
        sources = " and ".join(f"'{row.folder.name}'" for row in rows if row.new_name == clash)
        raise ToolError(f"{sources} would both become '{clash}': give the concepts distinct names")
    return rows


def format_plan(rows) -> str:
    width = max(len(row.folder.name) for row in rows)
    lines = [f"{'folder':<{width}}  images  repeats         steps/epoch"]
    for row in rows:
        old = "-" if row.old_repeats is None else str(row.old_repeats)
        lines.append(f"{row.folder.name:<{width}}  {row.images:>6}  {old:>5} -> {row.new_repeats:<5}  "
                     f"{row.steps:>8}  -> {row.new_name}")
    return "\n".join(lines)


def apply_balance(rows, *, copy_to=None, overwrite=False) -> list:
    """Rename the folders in place, or copy them under `copy_to` with the new names. Returns new paths."""
    if copy_to is not None:
        output = check_output_folder(copy_to, overwrite, inputs=[rows[0].folder.parent])

        def fill(temp):
            for row in rows:
                shutil.copytree(row.folder, temp / row.new_name)
        build_folder_atomically(output, fill)
        return [output / row.new_name for row in rows]
    moving = [row for row in rows if row.folder.name != row.new_name]
    for row in moving:
        target = row.folder.with_name(row.new_name)
        if target.exists() and target not in {r.folder for r in moving}:
            raise ToolError(f"cannot rename '{row.folder}': '{target}' already exists")
    # two steps through temporary names, so that swaps such as 10_a <-> 20_b cannot collide
    temporary = []
    for row in moving:
        temp = row.folder.with_name(f".balance-{os.getpid()}-{row.folder.name}")
        row.folder.rename(temp)
        temporary.append((temp, row))
    for temp, row in temporary:
        temp.rename(row.folder.with_name(row.new_name))
    return [row.folder.with_name(row.new_name) for row in rows]


def add_arguments(parser):
    parser.add_argument("dataset_dir", help="the parent of the concept folders (train_data_dir)")
    parser.add_argument("--steps", type=int, required=True, help="target steps per concept per epoch, e.g. 5200")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--apply", action="store_true", help="rename the folders in place")
    action.add_argument("--copy_to", "--copy-to", metavar="DIR", help="copy the folders, renamed, into DIR")
    parser.add_argument("--overwrite", action="store_true", help="with --copy_to: replace a non-empty DIR")


def run(args) -> int:
    rows = plan_balance(args.dataset_dir, args.steps)
    print(format_plan(rows))
    if args.apply or args.copy_to:
        paths = apply_balance(rows, copy_to=args.copy_to, overwrite=args.overwrite)
        print(f"{'copied to' if args.copy_to else 'renamed'}: " + ", ".join(str(p) for p in paths))
    else:
        print("dry run: nothing changed. Pass --apply to rename the folders or --copy_to DIR to copy them.")
    return 0
