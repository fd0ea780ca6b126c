"""Settings of one image folder (a kohya "subset"), the flag names they come from, and their validation."""

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from lora_diffusion.data.errors import DatasetError
from lora_diffusion.data.files import MAX_REPEATS


@dataclass(frozen=True)
class Subset:
    image_dir: Path
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    flip_aug: bool = False
    random_crop: bool = False
    # shared by all subsets of one [[datasets]] table in kohya's config
    resolution: tuple = (512, 512)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


SUBSET_KEYS = ("num_repeats", "caption_extension", "shuffle_caption", "keep_tokens", "caption_dropout_rate",
               "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "caption_separator",
               "flip_aug", "random_crop")
DATASET_KEYS = ("resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "bucket_no_upscale")
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
    if not ext.startswith("."):
        s = replace(s, caption_extension="." + ext)
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

