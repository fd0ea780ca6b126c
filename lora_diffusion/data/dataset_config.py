"""kohya's dataset config file (TOML or JSON): [general], [[datasets]], [[datasets.subsets]], read and
validated into Subsets."""

import json
from pathlib import Path

from lora_diffusion.formats.io import loads_toml

from .errors import DatasetError, warn
from .subset import (
    DATASET_KEYS,
    FLAG_DEFAULTS,
    FLAG_ONLY_KEYS,
    FOLDER_KEYS,
    KEY_TYPES,
    PARENT_FLAGS,
    SUBSET_KEYS,
    Subset,
    check_subset,
    parse_face_crop_range,
    parse_resolution,
)

_KEY_TYPES = {**KEY_TYPES, "batch_size": int, "subsets": list}
_LEVEL_KEYS = {
    "[general]": set(SUBSET_KEYS + DATASET_KEYS + ("batch_size",)),
    "[[datasets]]": set(SUBSET_KEYS + DATASET_KEYS + ("batch_size", "subsets")),
    "[[datasets.subsets]]": set(SUBSET_KEYS + FOLDER_KEYS),
}
# kohya options this library does not implement: accepted only when switched off, else refused with the reason
_UNSUPPORTED_KOHYA_KEYS = {
    "custom_attributes": "it passes extra values to kohya's own model-specific training code, which this trainer "
                         "does not have",
    "cache_info": "kohya caches image sizes and captions in a metadata file to start faster; this dataset reads "
                  "only image headers, so there is nothing to cache",
    "network_multiplier": "a per-dataset LoRA strength needs one network multiplier per sample in the loop, "
                          "which this trainer does not implement",
    "validation_split": "set --validation_split on the command line (one held-out share for the whole dataset)",
    "validation_seed": "set --validation_seed on the command line",
}


def _check_table(table, level, where):
    if not isinstance(table, dict):
        raise DatasetError(f"{where}: expected a table of options, got {table!r}")
    for key, value in table.items():
        if key in _UNSUPPORTED_KOHYA_KEYS:
            if value not in (False, 0, None, "", [], {}):
                raise DatasetError(f"{where}: '{key}' is a kohya option that lora_diffusion does not support "
                                   f"({_UNSUPPORTED_KOHYA_KEYS[key]}); remove it")
            continue
        if key in FLAG_ONLY_KEYS:
            config_key = _FLAG_CONFIG_KEYS[key]
            raise DatasetError(f"{where}: '{key}' is a command-line flag, not a dataset config key; in a dataset "
                               f"config write '{config_key}' in [[datasets.subsets]]")
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
        if key == "face_crop_aug_range":
            parse_face_crop_range(value, f"{where}: face_crop_aug_range")
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if expected is float else
              isinstance(value, int) and not isinstance(value, bool) if expected is int else
              isinstance(value, expected))
        if not ok:
            raise DatasetError(f"{where}: '{key}' must be {_TYPE_WORDS[expected]}, got {value!r}")


_FLAG_CONFIG_KEYS = {name: Subset.__dataclass_fields__[name].metadata["config_key"] for name in FLAG_ONLY_KEYS}
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list of tables"}


def _load_config_file(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"dataset config '{path}' does not exist")
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text(encoding="utf-8-sig"))
        return loads_toml(path.read_text(encoding="utf-8-sig"))
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
            metadata_file = table.get("metadata_file")
            if metadata_file:
                metadata_file = _config_path(metadata_file, path, here, "metadata_file", want_file=True)
            if "image_dir" in table:
                image_dir = _config_path(table["image_dir"], path, here)
            elif metadata_file:
                image_dir = metadata_file.parent  # kohya: then the JSON's image paths are absolute
            else:
                raise DatasetError(f"{here}: 'image_dir' is required (the folder that holds the images), or "
                                   f"'metadata_file' (kohya's fine-tuning metadata JSON)")
            if table.get("is_reg") and metadata_file:
                raise DatasetError(f"{here}: a metadata_file subset cannot be is_reg (kohya's fine-tuning dataset "
                                   f"has no regularization images)")
            conditioning = table.get("conditioning_data_dir")
            if conditioning:
                conditioning = _config_path(conditioning, path, here, "conditioning_data_dir")
            identity = (image_dir, metadata_file)
            if identity in seen_dirs:
                warn(f"{here}: image_dir '{image_dir}' appears twice in one dataset; the duplicate is ignored")
                continue
            seen_dirs.add(identity)
            values = {**defaults, "num_repeats": defaults.get("dataset_repeats", 1)}
            for level in (general, dataset, table):
                values.update({k: v for k, v in level.items() if k in FLAG_DEFAULTS or k == "num_repeats"})
            for name in PARENT_FLAGS:  # the flag means a parent folder; the subset's own key was read above
                values.pop(name, None)
            subset = Subset(image_dir=image_dir, is_reg=table.get("is_reg", False),
                            class_tokens=table.get("class_tokens"), conditioning_data_dir=conditioning or None,
                            metadata_file=metadata_file or None, **values)
            subsets.append(check_subset(subset, here))
    if len(batch_sizes) > 1:
        raise DatasetError(f"{where}: datasets ask for different batch_size values {sorted(batch_sizes)}; "
                           f"lora_diffusion trains with one batch size: set it once in [general]")
    return subsets, (batch_sizes.pop() if batch_sizes else None)


def _config_path(value, config_path, where, key="image_dir", want_file=False):
    """A path as written: absolute, relative to the working folder, or relative to the config file."""
    written = Path(value).expanduser()
    for candidate in (written, config_path.parent / written):
        if candidate.is_file() if want_file else candidate.is_dir():
            return candidate
    raise DatasetError(f"{where}: {key} '{value}' is not a {'file' if want_file else 'folder'} (looked in "
                       f"'{written.absolute()}' and '{(config_path.parent / written).absolute()}')")
