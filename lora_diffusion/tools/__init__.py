"""Dataset tools from the seeds: caption excision, repeat balancing, caption sets.

Each module has plain functions (for scripts and notebooks) and a small `add_arguments`/`run` pair
that `lora_diffusion.cli` registers as a subcommand.
"""

import os
from pathlib import Path

from lora_diffusion.data.files import CONCEPT_FOLDER, IMAGE_EXTENSIONS, is_image_file  # noqa: F401
from lora_diffusion.formats.io import (
    build_folder_atomically,  # the tools write their output folders through it (io.replace_folder)
)

__all__ = ["ToolError", "list_images", "split_concept_name", "check_output_apart", "build_folder_atomically"]


class ToolError(ValueError):
    """Bad input to a dataset tool; the message names the file or option."""


def list_images(folder) -> list:
    """Image files directly inside `folder` (any extension Pillow reads, in any case), sorted by name."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)),
                  key=lambda p: p.name)


def split_concept_name(name: str):
    """'10_sks dog' -> (10, 'sks dog'); 'sks dog' -> (None, 'sks dog')."""
    match = CONCEPT_FOLDER.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def require_folder(path, what) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ToolError(f"{what} '{path}' is not a folder")
    return path


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # also right on case-insensitive file systems and through symlinks
    except OSError:
        return a == b


def check_output_apart(output, inputs):
    """Refuse an output folder that is an input, lies inside one, or contains one: replacing it would delete
    the input. Called before anything is written."""
    out = Path(output).expanduser().absolute()
    for source in inputs:
        src = Path(source).expanduser().absolute()
        if _same(out, src):
            relation = "is the same folder as"
        elif any(_same(parent, src) for parent in out.resolve().parents):
            relation = "is inside"
        elif any(_same(out, parent) for parent in src.resolve().parents):
            relation = "contains"
        else:
            continue
        raise ToolError(f"output folder '{output}' {relation} the input '{source}': writing there could delete "
                        f"the input; choose an output folder outside it (nothing was changed)")


def check_output_folder(output, overwrite=False, inputs=()):
    """An output folder must be new (or empty), or `overwrite` is set; never an input, inside one or around one."""
    output = Path(output).expanduser()
    check_output_apart(output, inputs)
    if output.exists() and not output.is_dir():
        raise ToolError(f"output '{output}' exists and is a file")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ToolError(f"output folder '{output}' exists and is not empty; choose a new folder or pass overwrite")
    return output
