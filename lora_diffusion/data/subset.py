"""Settings of one image folder (a kohya "subset"), the flag names they come from, and their validation."""

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import DatasetError
from .files import MAX_REPEATS, dotted_extension

# kohya's --resize_interpolation names (linear = bilinear, cubic = bicubic)
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def _option(default, kind, level, help, **extra):
    """A dataset option: its default, its type in a dataset config file, where it may be set, and its one-line help.
    Levels: "folder": a [[datasets.subsets]] table only; "subset": also a flag and any table; "dataset": a flag,
    [general] or [[datasets]], shared by the subsets of one dataset; "flag": a flag (and LoRADataset keyword) only,
    never a key of a dataset config. `extra`: "choices", "config_key" (the config's key for a "flag" option) and
    "metadata" (True: kohya records the value as ss_<name> in the LoRA file)."""
    return field(default=default, metadata={"kind": kind, "level": level, "help": help, **extra})


@dataclass(frozen=True)
class Subset:
    """One image folder's settings: the one declaration of the dataset options (the flags of the same names,
    LoRADataset's keywords and the dataset config's keys are derived from these fields)."""

    image_dir: Path = field(metadata={"kind": str, "level": "folder", "help": "the folder that holds the images"})
    num_repeats: int = _option(1, int, "subset", "times each image of the folder is used per epoch (from a "
                               "folder's '<repeats>_' prefix, or a dataset config; not a flag)")
    is_reg: bool = _option(False, bool, "folder", "the folder holds regularization (prior-preservation) images")
    class_tokens: str | None = _option(None, str, "folder", "the caption of images without a caption file")
    caption_extension: str = _option(".txt", str, "subset", "extension of the caption files (<image stem><ext>)")
    shuffle_caption: bool = _option(False, bool, "subset", "shuffle the caption's tags (split on caption_separator)",
                                    metadata=True)
    keep_tokens: int = _option(0, int, "subset", "keep the first N tags in front when shuffling or dropping tags",
                               metadata=True)
    keep_tokens_separator: str = _option("", str, "subset", "in a caption, the tags before this separator stay in "
                                         "front (and those after a second one stay at the end); e.g. '|||'")
    secondary_separator: str | None = _option(None, str, "subset", "a separator inside a tag (e.g. ';;;'): tags "
                                              "joined by it move and drop together, then it becomes "
                                              "caption_separator")
    enable_wildcard: bool = _option(False, bool, "subset", "'{a|b|c}' in a caption picks one at random, and a "
                                    "caption file of several lines gives one line at random")
    caption_dropout_rate: float = _option(0.0, float, "subset", "share of samples trained with an empty caption",
                                          metadata=True)
    caption_dropout_every_n_epochs: int = _option(0, int, "subset", "train every N-th epoch with empty captions "
                                                  "(0: never)", metadata=True)
    caption_tag_dropout_rate: float = _option(0.0, float, "subset", "drop each tag (but the kept ones) with this "
                                              "probability", metadata=True)
    caption_prefix: str | None = _option(None, str, "subset", "text put before every caption")
    caption_suffix: str | None = _option(None, str, "subset", "text put after every caption")
    caption_separator: str = _option(",", str, "subset", "what separates the tags of a caption")
    token_warmup_min: int = _option(1, int, "subset", "with token_warmup_step: the number of tags used at step 0")
    token_warmup_step: float = _option(0.0, float, "subset", "use more and more tags until step N (N < 1: that "
                                       "share of max_train_steps), from token_warmup_min (0: all tags from the start)")
    flip_aug: bool = _option(False, bool, "subset", "mirror half the samples left to right", metadata=True)
    color_aug: bool = _option(False, bool, "subset", "a weak random colour change (hue shift or gamma) on a third "
                              "of the samples; not with cached latents", metadata=True)
    face_crop_aug_range: tuple | None = _option(None, tuple, "subset", "'LOW,HIGH': crop around the face whose "
                                                "box is in the file name (<name>_<cx>_<cy>_<w>_<h>), the face a "
                                                "1/HIGH to 1/LOW share of the side; buckets off only", metadata=True)
    random_crop: bool = _option(False, bool, "subset", "crop the bucket's window at random instead of centred",
                                metadata=True)
    resize_interpolation: str | None = _option(None, str, "subset", "the resampling filter of the image resize "
                                               "(unset: lanczos)", choices=INTERPOLATIONS, metadata=True)
    alpha_mask: bool = _option(False, bool, "subset", "the image's alpha channel is a loss mask (transparent: not "
                               "learned; opaque: learned); images without one get a full mask")
    conditioning_data_dir: Path | None = _option(None, str, "folder", "a folder of loss-mask images, one per image "
                                                 "of the same stem and size: its red channel is the mask (white: "
                                                 "learned, black: not)",
                                                 flag_help="loss masks for --masked_loss: the parent of mask "
                                                 "folders named as the concept folders of --train_data_dir "
                                                 "(masks/10_sks dog/ for train/10_sks dog/), one image of the same "
                                                 "stem and size per image, its red channel the mask")
    metadata_file: Path | None = _option(None, str, "folder", "kohya's fine-tuning metadata JSON ({image: "
                                         "{caption, tags}}) instead of caption files")
    in_json: str | None = _option(None, str, "flag", "kohya's fine-tuning metadata JSON: train_data_dir holds the "
                                  "images themselves, captions and tags come from the JSON", config_key="metadata_file")
    dataset_repeats: int = _option(1, int, "flag", "with --in_json: times each image is used per epoch; with a "
                                   "dataset config: the num_repeats of subsets that set none", config_key="num_repeats")
    # shared by all subsets of one [[datasets]] table in kohya's config
    resolution: tuple = _option((512, 512), "resolution", "dataset", "training size: W or W,H in pixels")
    enable_bucket: bool = _option(False, bool, "dataset", "aspect-ratio buckets: each image trains at the bucket "
                                  "nearest its aspect ratio", metadata=True)
    min_bucket_reso: int = _option(256, int, "dataset", "the smallest bucket side in pixels", metadata=True)
    max_bucket_reso: int = _option(1024, int, "dataset", "the largest bucket side in pixels", metadata=True)
    bucket_reso_steps: int = _option(64, int, "dataset", "bucket sides are multiples of this many pixels")
    bucket_no_upscale: bool = _option(False, bool, "dataset", "buckets from each image's own size: small images "
                                      "are never enlarged", metadata=True)


FOLDER_KEYS = tuple(f.name for f in fields(Subset) if f.metadata["level"] == "folder")
SUBSET_KEYS = tuple(f.name for f in fields(Subset) if f.metadata["level"] == "subset")
DATASET_KEYS = tuple(f.name for f in fields(Subset) if f.metadata["level"] == "dataset")
FLAG_ONLY_KEYS = tuple(f.name for f in fields(Subset) if f.metadata["level"] == "flag")
KEY_TYPES = {f.name: f.metadata["kind"] for f in fields(Subset)}  # the type of each key in a dataset config
# the options that are also flags (and LoRADataset keywords), with their defaults
FLAG_DEFAULTS = {f.name: f.default for f in fields(Subset) if f.name in SUBSET_KEYS + DATASET_KEYS + FLAG_ONLY_KEYS}
FLAG_DEFAULTS.pop("num_repeats")
# a folder option with a "flag_help" is also a flag that means the parent of such folders, one per concept folder
# (kohya's --conditioning_data_dir: masks/10_sks dog/ for train/10_sks dog/)
PARENT_FLAGS = tuple(f.name for f in fields(Subset) if "flag_help" in f.metadata)
FLAG_DEFAULTS.update(dict.fromkeys(PARENT_FLAGS))


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


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def parse_face_crop_range(value, where="face_crop_aug_range"):
    """None, "2.0,4.0" or [2.0, 4.0] -> None or (low, high) with 0 < low <= high."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: face_crop_aug_range must be 'LOW,HIGH' (two numbers, e.g. '2.0,4.0'), "
                           f"got {value!r}") from None
    if not 0 < low <= high:
        raise DatasetError(f"{where}: face_crop_aug_range needs 0 < LOW <= HIGH, got {value!r}")
    return (low, high)


def check_subset(s: Subset, where: str) -> Subset:
    def bad(key, expected):
        raise DatasetError(f"{where}: {key} must be {expected}, got {getattr(s, key)!r}")
    ext = s.caption_extension
    if not isinstance(ext, str) or not ext.strip(". "):
        bad("caption_extension", "a file extension such as '.txt'")
    s = replace(s, caption_extension=dotted_extension(ext))
    s = replace(s, resolution=parse_resolution(s.resolution, f"{where}: resolution"))
    if not _is_int(s.num_repeats) or not 1 <= s.num_repeats <= MAX_REPEATS:
        bad("num_repeats", f"an integer from 1 to {MAX_REPEATS} (use more epochs for more steps)")
    if not isinstance(s.keep_tokens, int) or s.keep_tokens < 0:
        bad("keep_tokens", "an integer >= 0")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not isinstance(getattr(s, key), (int, float)) or not 0.0 <= getattr(s, key) <= 1.0:
            bad(key, "a number between 0 and 1")
    if not isinstance(s.caption_separator, str) or not s.caption_separator:
        bad("caption_separator", "a non-empty string")
    if s.keep_tokens_separator is None:  # kohya's config default
        s = replace(s, keep_tokens_separator="")
    if not isinstance(s.keep_tokens_separator, str):
        bad("keep_tokens_separator", "a string (empty: off)")
    if s.secondary_separator is not None and (not isinstance(s.secondary_separator, str) or
                                              not s.secondary_separator):
        bad("secondary_separator", "a non-empty string")
    for key in ("caption_dropout_every_n_epochs", "token_warmup_min"):
        if not _is_int(getattr(s, key)) or getattr(s, key) < 0:
            bad(key, "an integer >= 0")
    if not isinstance(s.token_warmup_step, (int, float)) or isinstance(s.token_warmup_step, bool) or \
            s.token_warmup_step < 0:
        bad("token_warmup_step", "a number >= 0 (a step, or below 1 a share of max_train_steps)")
    if s.resize_interpolation is not None and s.resize_interpolation not in INTERPOLATIONS:
        bad("resize_interpolation", f"one of {', '.join(INTERPOLATIONS)}")
    s = replace(s, face_crop_aug_range=parse_face_crop_range(s.face_crop_aug_range, where))
    if s.face_crop_aug_range is not None and s.enable_bucket:
        raise DatasetError(f"{where}: face_crop_aug_range works with buckets off (kohya ignores it with buckets): "
                           f"turn off enable_bucket or face_crop_aug_range")
    if s.alpha_mask and s.conditioning_data_dir is not None:
        raise DatasetError(f"{where}: alpha_mask and conditioning_data_dir both give the loss mask; set one")
    if not _is_int(s.dataset_repeats) or not 1 <= s.dataset_repeats <= MAX_REPEATS:
        bad("dataset_repeats", f"an integer from 1 to {MAX_REPEATS}")
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



_WHERE = {"folder": "`[[datasets.subsets]]`", "subset": "flag, `[general]`, `[[datasets]]`, `[[datasets.subsets]]`",
          "dataset": "flag, `[general]`, `[[datasets]]`", "flag": "flag only"}
_KIND_WORDS = {str: "string", bool: "true/false", int: "integer", float: "number", tuple: "'LOW,HIGH' or [low, high]",
               "resolution": "W, 'W,H' or [w, h]"}


def option_table() -> str:
    """The Markdown table of every dataset option (docs/dataset.md holds it; a test keeps the two equal)."""
    rows = ["| option | where | type | default | what it does |", "| --- | --- | --- | --- | --- |"]
    for f in fields(Subset):
        meta = f.metadata
        where = _WHERE[meta["level"]] + (f" (config: `{meta['config_key']}`)" if "config_key" in meta else "")
        if f.name not in FLAG_DEFAULTS:
            where = where.replace("flag, ", "")
        if "flag_help" in meta:
            where = "flag (their parent folder), " + where
        kind = "one of " + ", ".join(meta["choices"]) if "choices" in meta else _KIND_WORDS[meta["kind"]]
        default = "required" if f.name == "image_dir" else "unset" if f.default is None else f"`{f.default!r}`"
        text = meta["help"].replace("|", "\\|")  # '{a|b}' inside a table cell
        rows.append(f"| `{f.name}` | {where} | {kind} | {default.replace('|', chr(92) + '|')} | {text} |")
    return "\n".join(rows)
