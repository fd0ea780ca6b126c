"""kohya's fine-tuning dataset: a metadata JSON (what kohya's finetune/merge_*_to_metadata.py scripts write) gives
each image's caption and tags, instead of caption files and concept folders."""

import json
from pathlib import Path

from .buckets import select_bucket
from .errors import DatasetError, warn
from .files import IMAGE_EXTENSIONS, MAX_REPEATS
from .images import image_size
from .layout import ImageEntry, attach_masks, face_box
from .subset import Subset


def metadata_subset(train_data_dir, reg_data_dir, options) -> Subset:
    """The one subset of `--in_json`: train_data_dir holds the images, repeated --dataset_repeats times."""
    if reg_data_dir is not None:
        raise DatasetError("reg_data_dir cannot be used with in_json: kohya's fine-tuning dataset has no "
                           "regularization images (use concept folders or a dataset config for those)")
    if train_data_dir is None:
        raise DatasetError("in_json needs train_data_dir: the folder that holds the images the JSON names")
    folder = Path(train_data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"train_data_dir '{folder}' (the images of in_json '{options['in_json']}') is not a folder")
    repeats = options["dataset_repeats"]
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= MAX_REPEATS:
        raise DatasetError(f"dataset_repeats must be an integer from 1 to {MAX_REPEATS}, got {repeats!r}")
    return Subset(image_dir=folder, num_repeats=repeats,
                  **{**options, "metadata_file": Path(options["in_json"]).expanduser()})


def read_metadata(path: Path) -> dict:
    """{image key: {"caption", "tags", ...}} from kohya's JSON, or its JSON Lines form ({"image_path", "caption",
    "tags"} per line)."""
    if not path.is_file():
        raise DatasetError(f"metadata file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(row, dict) and "image_path" in row for row in rows):
                raise DatasetError(f"metadata file '{path}': every line must be an object with 'image_path'")
            return {row["image_path"]: row for row in rows}
        metadata = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"metadata file '{path}' cannot be parsed as JSON: {e}") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        raise DatasetError(f"metadata file '{path}': expected an object of {{image: {{\"caption\": ..., \"tags\": "
                           f"...}}}}, as kohya's finetune scripts write")
    return metadata


def _image_path(key: str, folder: Path, where: str) -> Path:
    """A key as kohya writes it: the image's stem (in the image folder), or its path (absolute or relative)."""
    written = Path(key).expanduser()
    candidate = written if written.is_absolute() else folder / written
    if candidate.is_file():
        return candidate
    for extension in sorted(IMAGE_EXTENSIONS):  # a stem: the image file of that name
        for name in (candidate.name + extension, candidate.name + extension.upper()):
            if (candidate.parent / name).is_file():
                return candidate.parent / name
    raise DatasetError(f"{where}: image '{key}' is not in '{candidate.parent}' (looked for '{candidate.name}' and "
                       f"'{candidate.name}.<image extension>')")


def _caption(record: dict, subset: Subset, where: str) -> str:
    """kohya's rule: the caption, then caption_separator and the tags; with enable_wildcard the tags follow every
    line of the caption."""
    caption, tags = record.get("caption") or "", record.get("tags") or ""
    if not isinstance(caption, str) or not isinstance(tags, str):
        raise DatasetError(f"{where}: 'caption' and 'tags' must be strings, got {caption!r} and {tags!r}")
    separator = subset.caption_separator
    lines = [line.strip() for line in caption.split("\n") if line.strip()]
    if subset.enable_wildcard:
        tags = tags.replace("\n", separator)
        if tags:
            return "\n".join(f"{line}{separator}{tags}" for line in lines) if lines else tags
        return "\n".join(lines)
    caption = lines[0] if lines else ""
    return caption + separator + tags if caption and tags else caption or tags


def scan_metadata(subset: Subset, subset_index: int):
    """The ImageEntry of every image the subset's metadata file names."""

    path = Path(subset.metadata_file)
    metadata = read_metadata(path)
    entries = []
    for key, record in metadata.items():
        where = f"metadata file '{path}', image '{key}'"
        image = _image_path(key, subset.image_dir, where)
        try:
            size = image_size(image)
        except Exception as e:  # Pillow raises many kinds of errors on bad files
            warn(f"skipping unreadable image '{image}' ({where}): {type(e).__name__}: {e}")
            continue
        entries.append(ImageEntry(image, subset_index, _caption(record, subset, where), size,
                                  select_bucket(size, subset), face=face_box(image, subset)))
    if subset.conditioning_data_dir is not None:
        attach_masks(entries, subset)
    return entries
