"""The training data: kohya's folder layout, captions, aspect-ratio buckets and a latent cache.

    train_data_dir/                  <- the PARENT of concept folders
        10_sks dog/                  <- <repeats>_<class tokens>
            img1.png   img1.txt      <- image + caption (<stem><caption_extension>)
    reg_data_dir/                    <- same layout, regularization (prior-preservation) images
        1_dog/ ...

LoRADataset(train_data_dir, reg_data_dir, **kohya_flag_names) or LoRADataset.from_config("dataset.toml").
ds[i] -> {"image" (3,H,W) in [-1,1] | "latents" (4,h,w), "caption", "is_reg", "bucket" (w,h), "path"}.
BucketBatchSampler draws every batch from one bucket; collate_fn stacks a batch.
Every random choice (caption shuffle/dropout, flip, crop) is a function of (seed, epoch, sample index).
"""

import hashlib
import json
import math
import multiprocessing
import random
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_diffusion.io import atomic_write

__all__ = ["LoRADataset", "BucketBatchSampler", "collate_fn", "DatasetError", "DatasetWarning",
           "Subset", "bucket_resolutions", "select_bucket", "load_image", "process_caption"]


class DatasetError(ValueError):
    """Bad training data or dataset settings; the message names the file, folder or option."""


class DatasetWarning(UserWarning):
    """Something in the data was skipped or guessed; training goes on."""


def _warn(message):
    warnings.warn(message, DatasetWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Settings of one image folder (a kohya "subset")

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


def _check_subset(s: Subset, where: str) -> Subset:
    def bad(key, expected):
        raise DatasetError(f"{where}: {key} must be {expected}, got {getattr(s, key)!r}")
    ext = s.caption_extension
    if not isinstance(ext, str) or not ext.strip(". "):
        bad("caption_extension", "a file extension such as '.txt'")
    if not ext.startswith("."):
        s = replace(s, caption_extension="." + ext)
    s = replace(s, resolution=parse_resolution(s.resolution, f"{where}: resolution"))
    if not isinstance(s.num_repeats, int) or s.num_repeats < 1:
        bad("num_repeats", "an integer >= 1")
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


# ----------------------------------------------------------------------------------------------
# Buckets

def bucket_resolutions(resolution, min_reso=256, max_reso=1024, steps=64):
    """All (w, h), multiples of `steps` within [min_reso, max_reso], of at most the area of `resolution`,
    the largest height for each width, plus the square bucket; sorted."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area)) // steps * steps
    buckets = {(side, side)}
    for width in range(min_reso - min_reso % steps or steps, max_reso + 1, steps):
        if width < min_reso:
            continue
        height = min(max_reso, max_area // width // steps * steps)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def select_bucket(image_size, subset: Subset):
    """The (w, h) an image of `image_size` trains at under the subset's bucket settings."""
    width, height = image_size
    if not subset.enable_bucket:
        return subset.resolution
    if subset.bucket_no_upscale:
        # the image's own aspect ratio, shrunk to the training area if larger, rounded down to steps
        steps = subset.bucket_reso_steps
        scale = min(1.0, math.sqrt(subset.resolution[0] * subset.resolution[1] / (width * height)))
        return (max(steps, int(width * scale) // steps * steps), max(steps, int(height * scale) // steps * steps))
    candidates = _buckets_for(subset.resolution, subset.min_bucket_reso, subset.max_bucket_reso,
                              subset.bucket_reso_steps)
    log_ratio = math.log(width / height)
    # nearest aspect ratio on a log scale (so 2:1 and 1:2 are equally far from 1:1); ties -> larger area
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - log_ratio), -b[0] * b[1]))


_BUCKET_LISTS = {}


def _buckets_for(resolution, min_reso, max_reso, steps):
    key = (tuple(resolution), min_reso, max_reso, steps)
    if key not in _BUCKET_LISTS:
        _BUCKET_LISTS[key] = bucket_resolutions(resolution, min_reso, max_reso, steps)
    return _BUCKET_LISTS[key]


def cover_size(image_size, bucket):
    """The size to resize to so that the image covers the bucket, keeping its aspect ratio."""
    scale = max(bucket[0] / image_size[0], bucket[1] / image_size[1])
    return (max(bucket[0], round(image_size[0] * scale)), max(bucket[1], round(image_size[1] * scale)))


# ----------------------------------------------------------------------------------------------
# Images

# formats Pillow can identify but not decode without extra software, or that are not pictures
_NOT_TRAINING_IMAGES = {".bufr", ".grib", ".h5", ".hdf", ".mpeg", ".mpg", ".emf", ".wmf", ".eps", ".ps"}
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in Image.OPEN and ext not in _NOT_TRAINING_IMAGES)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                              8: Image.Transpose.ROTATE_90}


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _orientation(img) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not cost the image
        return 1
    return value if value in _TRANSPOSE_FOR_ORIENTATION else 1


def image_size(path):
    """(width, height) as displayed (EXIF orientation applied), reading only the header."""
    with Image.open(path) as img:
        width, height = img.size
        return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)


def _to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(img, dtype=np.float64 if img.mode == "F" else np.int64)
        if img.mode != "F":  # 16-bit samples: keep the top 8 bits instead of clipping at 255
            array = array / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # transparent pixels become white, not whatever colour happens to be stored under them
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path, bucket, *, crop_rng: random.Random | None = None, flip=False) -> torch.Tensor:
    """Decode `path`, resize it to cover `bucket` (w, h) and crop (center, or random with `crop_rng`).
    Returns a float32 tensor (3, h, w) in [-1, 1]."""
    bucket_w, bucket_h = bucket
    with Image.open(path) as img:
        orientation = _orientation(img)
        swap = orientation in (5, 6, 7, 8)
        shown_w, shown_h = (img.height, img.width) if swap else img.size
        scale = max(bucket_w / shown_w, bucket_h / shown_h)
        if img.format == "JPEG" and scale < 1:
            # decode at 1/2, 1/4 or 1/8 size straight from the DCT, never below what the resize needs
            need = (math.ceil(shown_w * scale), math.ceil(shown_h * scale))
            img.draft(img.mode, (need[1], need[0]) if swap else need)
        img.load()
        if orientation != 1:
            img = img.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
        img = _to_rgb(img)
        resized_w, resized_h = cover_size(img.size, bucket)
        if crop_rng is not None:
            left, top = crop_rng.randint(0, resized_w - bucket_w), crop_rng.randint(0, resized_h - bucket_h)
        else:
            left, top = (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2
        # resize only the cropped region: one resampling pass, same pixels as resize-then-crop
        sx, sy = img.width / resized_w, img.height / resized_h
        box = (left * sx, top * sy, (left + bucket_w) * sx, (top + bucket_h) * sy)
        if img.size != (bucket_w, bucket_h) or box != (0, 0, bucket_w, bucket_h):
            img = img.resize((bucket_w, bucket_h), Image.Resampling.LANCZOS, box=box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(img)  # (h, w, 3) uint8
    out = torch.empty((3, bucket_h, bucket_w), dtype=torch.float32)
    out_np = out.numpy()
    np.divide(pixels.transpose(2, 0, 1), np.float32(127.5), out=out_np, dtype=np.float32, casting="unsafe")
    out_np -= 1.0
    return out


# ----------------------------------------------------------------------------------------------
# Captions

def read_caption(path: Path) -> str:
    """The first non-empty line of a UTF-8 caption file (a BOM is fine); '' for an empty file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                           f"re-save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        _warn(f"caption file {path} has {len(lines)} lines; only the first is used")
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


# ----------------------------------------------------------------------------------------------
# Finding the images

@dataclass
class ImageEntry:
    path: Path
    subset: int  # index into LoRADataset.subsets
    caption: str  # before per-epoch processing
    size: tuple  # (w, h) as displayed
    bucket: tuple  # (w, h)
    repeats: int = 0


_CONCEPT_FOLDER = re.compile(r"^(\d+)_(.*)$")


def _concept_subsets(parent, flag, is_reg, options):
    """The subsets of a kohya folder: one per <repeats>_<class tokens> child of `parent`."""
    parent = Path(parent).expanduser()
    if not parent.exists():
        raise DatasetError(f"{flag} '{parent}' does not exist")
    if not parent.is_dir():
        raise DatasetError(f"{flag} '{parent}' is a file; expected the parent folder of '<repeats>_<name>' "
                           f"folders such as '{parent.parent / 'train' / '10_sks dog'}'")
    subsets, skipped = [], []
    for child in sorted(parent.iterdir(), key=lambda p: p.name):
        if not child.is_dir() or child.name.startswith("."):
            continue
        match = _CONCEPT_FOLDER.match(child.name)
        if not match or int(match.group(1)) < 1:
            skipped.append(child.name)
            _warn(f"skipping folder '{child}': its name has no repeat prefix; concept folders are named "
                  f"'<repeats>_<class tokens>', e.g. '10_sks dog'")
            continue
        subsets.append(Subset(image_dir=child, num_repeats=int(match.group(1)), is_reg=is_reg,
                              class_tokens=match.group(2).strip() or None, **options))
    if not subsets:
        loose = sum(1 for p in parent.iterdir() if p.is_file() and is_image_file(p))
        message = (f"no training data found: {flag} '{parent}' has no '<repeats>_<name>' folders. {flag} must be "
                   f"the PARENT of folders such as '{parent / '10_sks dog'}' that hold the images and captions.")
        if loose:
            message += (f" It holds {loose} image(s) directly: move them into a subfolder named like "
                        f"'10_<class tokens>' (10 = repeats per epoch).")
        if _CONCEPT_FOLDER.match(parent.name):
            message += f" '{parent.name}' looks like a concept folder itself: pass its parent '{parent.parent}'."
        if skipped:
            message += f" Folders without a repeat prefix were skipped: {', '.join(skipped)}."
        raise DatasetError(message)
    return subsets


def _scan_subset(subset: Subset, subset_index: int):
    """ImageEntry for every readable image directly inside subset.image_dir (not recursive)."""
    folder = subset.image_dir
    if not folder.is_dir():
        raise DatasetError(f"image_dir '{folder}' does not exist or is not a folder")
    entries, missing_captions, ext = [], 0, subset.caption_extension
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.is_file() or not is_image_file(path):
            continue
        try:
            size = image_size(path)
        except Exception as e:  # Pillow raises many kinds of errors on bad files
            _warn(f"skipping unreadable image '{path}': {type(e).__name__}: {e}")
            continue
        caption_path = path.with_name(path.stem + ext)
        if caption_path.is_file():
            caption = read_caption(caption_path)
        else:
            missing_captions += 1
            caption = subset.class_tokens or ""
        entries.append(ImageEntry(path, subset_index, caption, size, select_bucket(size, subset)))
    if missing_captions:
        fallback = f"the class tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
        hint = ""
        others = sorted({p.suffix for p in folder.iterdir() if p.suffix.lower() in (".txt", ".caption", ".tags")
                         and p.suffix != ext})
        if others:
            hint = f" (there are {', '.join(others)} files: set caption_extension to use them)"
        _warn(f"{missing_captions} of {len(entries)} image(s) in '{folder}' have no '{ext}' caption file; "
              f"using {fallback}{hint}")
    return entries


def _assign_repeats(entries, subsets):
    """Training images repeat num_repeats times; the regularization pool repeats round-robin until it
    has as many samples as the training images (kohya's rule: it may stop before using every image)."""
    train = [e for e in entries if not subsets[e.subset].is_reg]
    reg = [e for e in entries if subsets[e.subset].is_reg]
    for e in train:
        e.repeats = subsets[e.subset].num_repeats
    target = sum(e.repeats for e in train)
    count, first_pass = 0, True
    while reg and count < target:
        for e in reg:
            step = subsets[e.subset].num_repeats if first_pass else 1
            e.repeats += step
            count += step
            if count >= target:
                break
        first_pass = False


# ----------------------------------------------------------------------------------------------
# kohya's dataset config file: [general], [[datasets]], [[datasets.subsets]]

_KEY_TYPES = {
    "num_repeats": int, "caption_extension": str, "shuffle_caption": bool, "keep_tokens": int,
    "caption_dropout_rate": float, "caption_tag_dropout_rate": float, "caption_prefix": str,
    "caption_suffix": str, "caption_separator": str, "flip_aug": bool, "random_crop": bool,
    "resolution": "resolution", "enable_bucket": bool, "min_bucket_reso": int, "max_bucket_reso": int,
    "bucket_reso_steps": int, "bucket_no_upscale": bool, "batch_size": int,
    "image_dir": str, "is_reg": bool, "class_tokens": str, "subsets": list,
}
_LEVEL_KEYS = {
    "[general]": set(SUBSET_KEYS + DATASET_KEYS + ("batch_size",)),
    "[[datasets]]": set(SUBSET_KEYS + DATASET_KEYS + ("batch_size", "subsets")),
    "[[datasets.subsets]]": set(SUBSET_KEYS + ("image_dir", "is_reg", "class_tokens")),
}
# kohya options this library does not implement: accepted only when switched off
_UNSUPPORTED_KOHYA_KEYS = {
    "color_aug", "face_crop_aug_range", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
    "token_warmup_min", "token_warmup_step", "caption_dropout_every_n_epochs", "alpha_mask",
    "custom_attributes", "cache_info", "metadata_file", "network_multiplier", "conditioning_data_dir",
}


def _check_table(table, level, where):
    if not isinstance(table, dict):
        raise DatasetError(f"{where}: expected a table of options, got {table!r}")
    for key, value in table.items():
        if key in _UNSUPPORTED_KOHYA_KEYS:
            if value not in (False, 0, None, "", [], {}):
                raise DatasetError(f"{where}: '{key}' is a kohya option that lora_diffusion does not support; "
                                   f"remove it")
            continue
        if key not in _LEVEL_KEYS[level]:
            import difflib
            elsewhere = [lvl for lvl, keys in _LEVEL_KEYS.items() if key in keys]
            close = difflib.get_close_matches(key, _KEY_TYPES, n=1)
            hint = (f"; it belongs in {' or '.join(elsewhere)}" if elsewhere else
                    f"; did you mean '{close[0]}'?" if close else "")
            raise DatasetError(f"{where}: unknown key '{key}'{hint}")
        expected = _KEY_TYPES[key]
        if expected == "resolution":
            parse_resolution(value, f"{where}: resolution")
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else
              isinstance(value, int) and not isinstance(value, bool) if expected is int else
              isinstance(value, expected))
        if not ok:
            raise DatasetError(f"{where}: '{key}' must be {_TYPE_WORDS[expected]}, got {value!r}")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list of tables"}


def _load_config_file(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"dataset config '{path}' does not exist")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8-sig"))
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise DatasetError(f"dataset config '{path}' cannot be parsed: {e}") from None


def read_dataset_config(path, defaults):
    """Parse and validate a kohya dataset config. Returns (subsets, batch_size or None).
    Precedence: [[datasets.subsets]] > [[datasets]] > [general] > `defaults` (the flags)."""
    path = Path(path)
    config = _load_config_file(path)
    where = f"dataset config '{path}'"
    for key in config:
        if key not in ("general", "datasets"):
            raise DatasetError(f"{where}: unknown top-level key '{key}'; expected [general] and [[datasets]]")
    general = config.get("general", {})
    _check_table(general, "[general]", f"{where} [general]")
    datasets = config.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetError(f"{where}: needs at least one [[datasets]] table with [[datasets.subsets]]")
    subsets, batch_sizes = [], set()
    for d, dataset in enumerate(datasets, 1):
        _check_table(dataset, "[[datasets]]", f"{where} [[datasets]] #{d}")
        if not dataset.get("subsets"):
            raise DatasetError(f"{where} [[datasets]] #{d}: needs at least one [[datasets.subsets]] with image_dir")
        if "batch_size" in dataset or "batch_size" in general:
            batch_sizes.add(dataset.get("batch_size", general.get("batch_size")))
        seen_dirs = set()
        for s, table in enumerate(dataset["subsets"], 1):
            here = f"{where} [[datasets]] #{d} [[datasets.subsets]] #{s}"
            _check_table(table, "[[datasets.subsets]]", here)
            if "image_dir" not in table:
                raise DatasetError(f"{here}: 'image_dir' is required (the folder that holds the images)")
            image_dir = _config_path(table["image_dir"], path, here)
            if image_dir in seen_dirs:
                _warn(f"{here}: image_dir '{image_dir}' appears twice in one dataset; the duplicate is ignored")
                continue
            seen_dirs.add(image_dir)
            values = {**defaults, "num_repeats": 1}
            for level in (general, dataset, table):
                values.update({k: v for k, v in level.items() if k in FLAG_DEFAULTS or k == "num_repeats"})
            subset = Subset(image_dir=image_dir, is_reg=table.get("is_reg", False),
                            class_tokens=table.get("class_tokens"), **values)
            subsets.append(_check_subset(subset, here))
    if len(batch_sizes) > 1:
        raise DatasetError(f"{where}: datasets ask for different batch_size values {sorted(batch_sizes)}; "
                           f"lora_diffusion trains with one batch size: set it once in [general]")
    return subsets, (batch_sizes.pop() if batch_sizes else None)


def _config_path(value, config_path, where):
    """A path as written: absolute, relative to the working folder, or relative to the config file."""
    written = Path(value).expanduser()
    for candidate in (written, config_path.parent / written):
        if candidate.is_dir():
            return candidate
    raise DatasetError(f"{where}: image_dir '{value}' is not a folder (looked in '{written.absolute()}' and "
                       f"'{(config_path.parent / written).absolute()}')")


# ----------------------------------------------------------------------------------------------
# The dataset

class LoRADataset(torch.utils.data.Dataset):
    def __init__(self, train_data_dir, reg_data_dir=None, *, caption_extension=".txt", resolution=512,
                 enable_bucket=False, min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64,
                 bucket_no_upscale=False, random_crop=False, flip_aug=False, shuffle_caption=False, keep_tokens=0,
                 caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0, caption_prefix=None, caption_suffix=None,
                 caption_separator=",", seed=0):
        options = dict(caption_extension=caption_extension, resolution=resolution, enable_bucket=enable_bucket,
                       min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso,
                       bucket_reso_steps=bucket_reso_steps, bucket_no_upscale=bucket_no_upscale,
                       random_crop=random_crop, flip_aug=flip_aug, shuffle_caption=shuffle_caption,
                       keep_tokens=keep_tokens, caption_dropout_rate=caption_dropout_rate,
                       caption_tag_dropout_rate=caption_tag_dropout_rate, caption_prefix=caption_prefix,
                       caption_suffix=caption_suffix, caption_separator=caption_separator)
        _check_subset(Subset(Path("."), **options), "dataset options")  # bad flags fail before any scanning
        subsets = _concept_subsets(train_data_dir, "train_data_dir", False, options)
        if reg_data_dir is not None:
            subsets += _concept_subsets(reg_data_dir, "reg_data_dir", True, options)
        self._setup(subsets, seed, sources=[f"train_data_dir '{train_data_dir}'"] +
                    ([f"reg_data_dir '{reg_data_dir}'"] if reg_data_dir is not None else []))

    @classmethod
    def from_config(cls, toml_path, **defaults):
        """A dataset from kohya's dataset config file (TOML or JSON). `defaults` are the flag values
        (LoRADataset keyword names); values in the file win. train_data_dir/reg_data_dir are ignored."""
        path = Path(toml_path).expanduser()
        ignored = [k for k in ("train_data_dir", "reg_data_dir") if defaults.pop(k, None) is not None]
        if ignored:
            _warn(f"{' and '.join(ignored)} ignored: the dataset config '{path}' lists the image folders")
        seed = defaults.pop("seed", 0)
        unknown = sorted(set(defaults) - set(FLAG_DEFAULTS))
        if unknown:
            raise DatasetError(f"LoRADataset.from_config: unknown option(s) {', '.join(unknown)}; expected "
                               f"LoRADataset keyword names ({', '.join(FLAG_DEFAULTS)}, seed)")
        subsets, batch_size = read_dataset_config(path, {**FLAG_DEFAULTS, **defaults})
        dataset = cls.__new__(cls)
        dataset._setup(subsets, seed, sources=[f"dataset config '{path}'"])
        dataset.batch_size = batch_size
        return dataset

    # -- building -------------------------------------------------------------------------------

    def _setup(self, subsets, seed, sources):
        if not isinstance(seed, int):
            raise DatasetError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.batch_size = None  # a batch_size from a dataset config file, for the trainer to use
        self.subsets = [_check_subset(s, f"folder '{s.image_dir}'") for s in subsets]
        self.entries = []
        for index, subset in enumerate(self.subsets):
            found = _scan_subset(subset, index)
            if not found:
                _warn(f"no images in '{subset.image_dir}'; the folder is skipped")
            self.entries.extend(found)
        if not any(not self.subsets[e.subset].is_reg for e in self.entries):
            folders = ", ".join(f"'{s.image_dir}'" for s in self.subsets if not s.is_reg)
            raise DatasetError(f"no training images found in {' and '.join(sources)}: looked for files ending in "
                               f"{', '.join(sorted({'.png', '.jpg', '.jpeg', '.webp', '.bmp'}))} (or any other "
                               f"format Pillow reads) directly inside {folders or 'no folder'}")
        _assign_repeats(self.entries, self.subsets)
        self.sample_entry = np.repeat(np.arange(len(self.entries)), [e.repeats for e in self.entries])
        self.sample_buckets = [self.entries[i].bucket for i in self.sample_entry]
        self._epoch = multiprocessing.Value("q", 0, lock=False)  # shared with DataLoader workers
        self._latents = None  # entry index -> (latents, flipped latents or None) once cached
        self._latent_store = {}  # cache key -> (latents, flipped), survives a re-cache with other settings

        train_subsets = [s for s in self.subsets if not s.is_reg]
        reg_subsets = [s for s in self.subsets if s.is_reg]
        self.num_train_images = sum(s.num_repeats * self._count(s) for s in train_subsets)
        self.num_reg_images = sum(s.num_repeats * self._count(s) for s in reg_subsets)
        self.dataset_dirs = {}
        self.tag_frequency = {}
        for index, subset in enumerate(self.subsets):
            name = subset.image_dir.name
            self.dataset_dirs[name] = {"n_repeats": subset.num_repeats, "img_count": self._count(subset)}
            frequency = self.tag_frequency.setdefault(name, {})
            for entry in self.entries:
                if entry.subset != index:
                    continue
                for tag in entry.caption.split(","):
                    tag = tag.strip().lower()
                    if tag:
                        frequency[tag] = frequency.get(tag, 0) + 1
        self.bucket_counts = dict(sorted(Counter(self.sample_buckets).items()))
        self.buckets = list(self.bucket_counts)

    def _count(self, subset):
        return sum(1 for e in self.entries if self.subsets[e.subset] is subset)

    def __getstate__(self):
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # a plain pickle or deepcopy (not a DataLoader worker being started): keep the value only
            state["_epoch"] = int(self._epoch.value)
        return state

    def __setstate__(self, state):
        if isinstance(state["_epoch"], int):
            state["_epoch"] = multiprocessing.Value("q", state["_epoch"], lock=False)
        self.__dict__.update(state)

    # -- epochs and items -----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int):
        self._epoch.value = int(epoch)

    @property
    def num_reg_samples(self) -> int:
        return int(sum(e.repeats for e in self.entries if self.subsets[e.subset].is_reg))

    @property
    def image_paths(self):
        return [e.path for e in self.entries]

    def __len__(self):
        return len(self.sample_entry)

    def _rng(self, index, purpose):
        return random.Random(f"{self.seed}/{self.epoch}/{index}/{purpose}")

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for a dataset of {len(self)} samples")
        index = index % len(self)
        entry_index = int(self.sample_entry[index])
        subset = self.subsets[self.entries[entry_index].subset]
        flip = subset.flip_aug and self._rng(index, "flip").random() < 0.5
        image, latents = None, None
        if self._latents is not None:
            plain, flipped = self._latents[entry_index]
            latents = flipped if flip else plain
        else:
            crop_rng = self._rng(index, "crop") if subset.random_crop else None
            image, entry_index = self._load_with_fallback(entry_index, crop_rng, flip)
        entry = self.entries[entry_index]
        subset = self.subsets[entry.subset]
        return {"image": image, "latents": latents,
                "caption": process_caption(entry.caption, subset, self._rng(index, "caption")),
                "is_reg": subset.is_reg, "bucket": entry.bucket, "path": str(entry.path)}

    def _load_with_fallback(self, entry_index, crop_rng, flip):
        """A file that fails to decode mid-training is replaced by the next image of the same bucket
        (with its own caption), with a warning naming it, instead of killing a long run."""
        bucket = self.entries[entry_index].bucket
        try:
            return load_image(self.entries[entry_index].path, bucket, crop_rng=crop_rng, flip=flip), entry_index
        except Exception as e:
            failures = [f"{self.entries[entry_index].path}: {type(e).__name__}: {e}"]
            _warn(f"could not decode image '{self.entries[entry_index].path}' ({type(e).__name__}: {e}); "
                  f"using another image of bucket {bucket[0]}x{bucket[1]} instead")
        same_bucket = [i for i, e in enumerate(self.entries) if e.bucket == bucket]
        start = same_bucket.index(entry_index)
        for candidate in same_bucket[start + 1:] + same_bucket[:start]:
            try:
                return load_image(self.entries[candidate].path, bucket, crop_rng=crop_rng, flip=flip), candidate
            except Exception as e:
                failures.append(f"{self.entries[candidate].path}: {type(e).__name__}: {e}")
                _warn(f"could not decode image '{self.entries[candidate].path}' ({type(e).__name__}: {e}); "
                      f"using another image of bucket {bucket[0]}x{bucket[1]} instead")
        raise DatasetError("no image of bucket %dx%d can be decoded:\n  %s" % (*bucket, "\n  ".join(failures)))

    # -- latent cache ---------------------------------------------------------------------------

    def cache_latents(self, vae, *, to_disk=False, batch_size=1, device="cpu", dtype=torch.float32, vae_id=None,
                      cache_dir=None):
        """Encode every image once; items then carry "latents" instead of "image".

        Latents are vae.encode(x).latent_dist.mode() (the posterior mean: deterministic, so a disk cache
        is exactly reproducible; kohya draws .sample()) times vae.config.scaling_factor. With flip_aug the
        flipped image is encoded too. With `to_disk`, each image gets '<stem>_<key>.safetensors' next to
        it (or in `cache_dir`), where the key hashes the image bytes, bucket, resize and crop, the VAE
        (`vae_id`, else a fingerprint of its config and weights) and `dtype`: a changed input never
        reuses a stale file."""
        if any(s.random_crop for s in self.subsets):
            raise DatasetError("random_crop cannot be combined with cached latents (a cached latent has one "
                               "fixed crop): turn off random_crop or the latent cache")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"vae_batch_size must be an integer >= 1, got {batch_size!r}")
        vae_key = str(vae_id) if vae_id is not None else vae_fingerprint(vae)
        keys = [self._latent_key(entry, vae_key, dtype) for entry in self.entries]
        results, todo = {}, defaultdict(list)
        for i, (entry, key) in enumerate(zip(self.entries, keys)):
            need_flip = self.subsets[entry.subset].flip_aug
            found = self._latent_store.get(key)
            if found is None and to_disk:
                found = _read_latent_file(self._latent_path(entry, key, cache_dir), key)
            if found is not None and (found[1] is not None or not need_flip):
                results[i] = found
            else:
                todo[entry.bucket].append(i)
        for bucket, indices in todo.items():
            jobs = [(i, False) for i in indices] + [(i, True) for i in indices
                                                     if self.subsets[self.entries[i].subset].flip_aug]
            encoded = {}
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                images = []
                for i, flip in chunk:
                    try:
                        images.append(load_image(self.entries[i].path, bucket, flip=flip))
                    except Exception as e:
                        raise DatasetError(f"image '{self.entries[i].path}' cannot be decoded ({type(e).__name__}: "
                                           f"{e}); remove or re-save it") from None
                latents = encode_latents(vae, torch.stack(images), device=device, dtype=dtype).cpu()
                for (i, flip), z in zip(chunk, latents):
                    encoded[(i, flip)] = z.clone()  # not a view: keeps one latent, not the whole batch, alive
            for i in indices:
                results[i] = (encoded[(i, False)], encoded.get((i, True)))
                if to_disk:
                    _write_latent_file(self._latent_path(self.entries[i], keys[i], cache_dir), keys[i], *results[i])
        for i, key in enumerate(keys):
            self._latent_store[key] = results[i]
        self._latents = [results[i] for i in range(len(self.entries))]

    def clear_latent_cache(self):
        """Serve images again (the in-memory store and disk files are kept)."""
        self._latents = None

    @property
    def latents_cached(self) -> bool:
        return self._latents is not None

    def _latent_key(self, entry, vae_key, dtype):
        resized = cover_size(entry.size, entry.bucket)
        crop = ((resized[0] - entry.bucket[0]) // 2, (resized[1] - entry.bucket[1]) // 2)
        fields_ = {"format": 1, "image": _file_sha256(entry.path), "bucket": list(entry.bucket),
                   "resized": list(resized), "crop": list(crop), "vae": vae_key, "dtype": str(dtype)}
        return hashlib.sha256(json.dumps(fields_, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _latent_path(entry, key, cache_dir):
        folder = Path(cache_dir) if cache_dir is not None else entry.path.parent
        return folder / f"{entry.path.stem}_{key[:16]}.safetensors"

    # -- summary --------------------------------------------------------------------------------

    def summary(self) -> str:
        n_train = len(self) - self.num_reg_samples
        lines = [f"LoRADataset: {len(self)} samples per epoch ({n_train} training + {self.num_reg_samples} "
                 f"regularization), {len(self.entries)} images in {len(self.subsets)} folders"]
        for is_reg in (False, True):
            chosen = [(i, s) for i, s in enumerate(self.subsets) if s.is_reg == is_reg]
            if not chosen:
                continue
            lines.append("regularization folders:" if is_reg else "training folders:")
            for index, subset in chosen:
                mine = [e for e in self.entries if e.subset == index]
                with_caption = sum(1 for e in mine if e.path.with_name(e.path.stem + subset.caption_extension)
                                   .is_file())
                samples = sum(e.repeats for e in mine)
                lines.append(f"  {str(subset.image_dir)!s:<40} {len(mine):>5} images x {subset.num_repeats:>3} "
                             f"repeats -> {samples:>6} samples; {with_caption} '{subset.caption_extension}' "
                             f"captions, class tokens {subset.class_tokens!r}")
        first = self.subsets[0]
        mode = ("off" if not first.enable_bucket else
                f"on, no upscale, steps {first.bucket_reso_steps}" if first.bucket_no_upscale else
                f"on, {first.min_bucket_reso}-{first.max_bucket_reso} px, steps {first.bucket_reso_steps}")
        lines.append(f"resolution {first.resolution[0]}x{first.resolution[1]}, buckets {mode}: "
                     f"{len(self.buckets)} in use")
        for bucket, count in self.bucket_counts.items():
            lines.append(f"  {bucket[0]:>5}x{bucket[1]:<5} {count:>6} samples")
        options = [f"{k}={getattr(first, k)!r}" for k in ("shuffle_caption", "keep_tokens", "caption_dropout_rate",
                   "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "flip_aug", "random_crop")
                   if getattr(first, k) != FLAG_DEFAULTS[k]]
        lines.append("captions and augmentation: " + (", ".join(options) if options else "defaults")
                     + f"; seed {self.seed}")
        if self._latents is not None:
            lines.append("latents: cached")
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()


# ----------------------------------------------------------------------------------------------
# Latent cache helpers

def encode_latents(vae, images, *, device="cpu", dtype=torch.float32):
    """Images (B,3,H,W) in [-1,1] -> scaled latents: (mode of the posterior - shift) * scaling_factor."""
    with torch.no_grad():
        output = vae.encode(images.to(device=device, dtype=dtype))
        distribution = output.latent_dist if hasattr(output, "latent_dist") else output[0]
        latents = distribution.mode() if hasattr(distribution, "mode") else distribution.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor


def vae_fingerprint(vae) -> str:
    """Identifies a VAE by its config and, per tensor, name, shape, dtype and rounded sums: cheap next to
    encoding, and a different VAE (or a fine-tuned one) gets a different fingerprint."""
    digest = hashlib.sha256()
    config = getattr(vae, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in vae.state_dict().items():
            values = tensor.detach().float()
            stats = (values.sum().item(), values.abs().sum().item(), values.flatten()[:4].tolist())
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{stats[0]:.6e}|{stats[1]:.6e}|"
                          f"{[f'{v:.6e}' for v in stats[2]]}".encode())
    return digest.hexdigest()


def _file_sha256(path, chunk=1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_latent_file(path: Path, key: str):
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            names = set(f.keys())
            plain = f.get_tensor("latents")
            flipped = f.get_tensor("latents_flipped") if "latents_flipped" in names else None
        return plain, flipped
    except Exception as e:
        _warn(f"latent cache file '{path}' is unreadable ({type(e).__name__}: {e}); encoding the image again")
        return None


def _write_latent_file(path: Path, key: str, plain, flipped):
    from safetensors.torch import save
    tensors = {"latents": plain.contiguous()}
    if flipped is not None:
        tensors["latents_flipped"] = flipped.contiguous()
    data = save(tensors, metadata={"key": key, "format": "lora_diffusion.latents.1"})
    atomic_write(path, lambda f: f.write(data))


# ----------------------------------------------------------------------------------------------
# Batching

class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields lists of sample indices, every batch from one bucket. The order is a function of
    (seed, epoch): call set_epoch(epoch) before each epoch (it also sets the dataset's epoch).
    To resume mid-epoch, set `skip_batches` (or pass it): the next iteration yields only the remaining
    batches of that epoch, and len() counts those; later epochs are whole again."""

    def __init__(self, dataset, batch_size, seed=0, shuffle=True, drop_last=False, skip_batches=0):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DatasetError(f"train_batch_size must be an integer >= 1, got {batch_size!r}")
        buckets = dataset.sample_buckets if hasattr(dataset, "sample_buckets") else list(dataset)
        self.dataset = dataset if hasattr(dataset, "set_epoch") else None
        self.groups = defaultdict(list)
        for index, bucket in enumerate(buckets):
            self.groups[tuple(bucket)].append(index)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.epoch = 0
        self.skip_batches = skip_batches

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)

    def batches(self, epoch=None):
        """All batches of an epoch, in order."""
        rng = random.Random(f"{self.seed}/{self.epoch if epoch is None else epoch}/batches")
        batches = []
        for bucket in sorted(self.groups):
            indices = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    @property
    def num_batches_per_epoch(self) -> int:
        sizes = [len(v) for v in self.groups.values()]
        if self.drop_last:
            return sum(n // self.batch_size for n in sizes)
        return sum(math.ceil(n / self.batch_size) for n in sizes)

    def __iter__(self):
        batches = self.batches()
        skip, self.skip_batches = self.skip_batches, 0
        yield from batches[skip:]

    def __len__(self):
        return max(0, self.num_batches_per_epoch - self.skip_batches)


def collate_fn(items):
    """A list of dataset items -> {"images" or "latents": stacked, "captions", "is_reg", "paths", "buckets"}."""
    batch = {"captions": [item["caption"] for item in items],
             "is_reg": torch.tensor([item["is_reg"] for item in items], dtype=torch.bool),
             "paths": [item["path"] for item in items],
             "buckets": [item["bucket"] for item in items]}
    if len(set(batch["buckets"])) > 1:
        raise DatasetError(f"a batch mixes buckets {sorted(set(batch['buckets']))}: use BucketBatchSampler "
                           f"(or enable_bucket=False) so that all images in a batch have one size")
    have_latents = [item.get("latents") is not None for item in items]
    if all(have_latents):
        batch["latents"] = torch.stack([item["latents"] for item in items])
    elif not any(have_latents):
        batch["images"] = torch.stack([item["image"] for item in items])
    else:
        raise DatasetError("a batch mixes cached latents and images")
    return batch
