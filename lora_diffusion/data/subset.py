"""Settings of one image folder (a kohya "subset"), the flag names they come from, and their validation."""

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from lora_diffusion.data.errors import DatasetError
from lora_diffusion.data.files import MAX_REPEATS, dotted_extension


def _option(default, kind, level):
    """A dataset option: its default, its type in a dataset config file, and where it may be set ("folder": a
    [[datasets.subsets]] table only; "subset": also a flag and any table; "dataset": a flag, [general] or
    [[datasets]], shared by the subsets of one dataset)."""
    return field(default=default, metadata={"kind": kind, "level": level})


@dataclass(frozen=True)
class Subset:
    """One image folder's settings: the one declaration of the dataset options (the flags of the same names,
    LoRADataset's keywords and the dataset config's keys are derived from these fields)."""

    image_dir: Path = field(metadata={"kind": str, "level": "folder"})
    num_repeats: int = _option(1, int, "subset")  # from a folder's name, or a config; not a flag
    is_reg: bool = _option(False, bool, "folder")
    class_tokens: str | None = _option(None, str, "folder")
    caption_extension: str = _option(".txt", str, "subset")
    shuffle_caption: bool = _option(False, bool, "subset")
    keep_tokens: int = _option(0, int, "subset")
    caption_dropout_rate: float = _option(0.0, float, "subset")
    caption_tag_dropout_rate: float = _option(0.0, float, "subset")
    caption_prefix: str | None = _option(None, str, "subset")
    caption_suffix: str | None = _option(None, str, "subset")
    caption_separator: str = _option(",", str, "subset")
    flip_aug: bool = _option(False, bool, "subset")
    random_crop: bool = _option(False, bool, "subset")
    # shared by all subsets of one [[datasets]] table in kohya's config
    resolution: tuple = _option((512, 512), "resolution", "dataset")
    enable_bucket: bool = _option(False, bool, "dataset")
    min_bucket_reso: int = _option(256, int, "dataset")
    max_bucket_reso: int = _option(1024, int, "dataset")
    bucket_reso_steps: int = _option(64, int, "dataset")
    bucket_no_upscale: bool = _option(False, bool, "dataset")


FOLDER_KEYS = tuple(f.name for f in fields(Subset) if f.metadata["level"] == "folder")
SUBSET_KEYS = tuple(f.name for f in fields(Subset) if f.metadata["level"] == "subset")
DATASET_KEYS = tuple(f.name for f in fields(Subset) if f.metadata["level"] == "dataset")
KEY_TYPES = {f.name: f.metadata["kind"] for f in fields(Subset)}  # the type of each key in a dataset config
# the options that are also flags (and LoRADataset keywords), with their defaults
FLAG_DEFAULTS = {f.name: f.default for f in fields(Subset) if f.name in SUBSET_KEYS + DATASET_KEYS}
FLAG_DEFAULTS.pop("num_repeats")


def parse_resolution(value, where="resolution"):
    """512, "512", "512,768", (512, 768) or [512, 768] -> (width, height)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,x\s]+", value.strip()) if p]
        if not all(p.isdigit() for p in parts):
            raise DatasetError(f"{where}: expected 'SIZE' or 'WIDTH,HEIGHT' in pixels, got {value!r}")
        value = [int(p) for p in parts]
    if isinstance(value, bool):
        raise DatasetError(f"{where}: expected an integer or [width, height], got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (list, tuple)) and len(value) in (1, 2) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise DatasetError(f"{where}: expected an integer or [width, height], got {value!r}")
    width, height = (value[0], value[0]) if len(value) == 1 else value
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise DatasetError(f"{where}: width and height must be positive multiples of 8 (the VAE downsamples "
                           f"by 8), got {width}x{height}")
    return (width, height)


def check_subset(s: Subset, where: str) -> Subset:
    def bad(key, expected):
        raise DatasetError(f"{where}: {key} must be {expected}, got {getattr(s, key)!r}")
    ext = s.caption_extension
    if not isinstance(ext, str) or not ext.strip(". "):
        bad("caption_extension", "a file extension such as '.txt'")
    s = replace(s, caption_extension=dotted_extension(ext))
    s = replace(s, resolution=parse_resolution(s.resolution, f"{where}: resolution"))
    if not isinstance(s.num_repeats, int) or isinstance(s.num_repeats, bool) or not 1 <= s.num_repeats <= MAX_REPEATS:
        bad("num_repeats", f"an integer from 1 to {MAX_REPEATS} (use more epochs for more steps)")
    if not isinstance(s.keep_tokens, int) or s.keep_tokens < 0:
        bad("keep_tokens", "an integer >= 0")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not isinstance(getattr(s, key), (int, float)) or not 0.0 <= getattr(s, key) <= 1.0:
            bad(key, "a number between 0 and 1")
    if not isinstance(s.caption_separator, str) or not s.caption_separator:
        bad("caption_separator", "a non-empty string")
    steps = s.bucket_reso_steps
    if not isinstance(steps, int) or steps < 8 or steps % 8:
        bad("bucket_reso_steps", "a positive multiple of 8")
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if not isinstance(getattr(s, key), int) or getattr(s, key) < steps:
            bad(key, f"an integer >= bucket_reso_steps ({steps})")
    if s.enable_bucket and not s.bucket_no_upscale:
        if s.min_bucket_reso > min(s.resolution) or s.max_bucket_reso < max(s.resolution):
            raise DatasetError(f"{where}: min_bucket_reso {s.min_bucket_reso} and max_bucket_reso "
                               f"{s.max_bucket_reso} must enclose the resolution {s.resolution}")
    return s

