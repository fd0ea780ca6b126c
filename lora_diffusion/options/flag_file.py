"""Flag files: `--config_file x.toml` (kohya's: any sections, keys are flag names) or a kohya_ss GUI `.json`, and
`--output_config` to write the flags of a run back out as TOML.

The parser (made from lora_diffusion.options) is the authority on flag names: a key that is no flag gets a warning
that names it and the nearest flag, and the run goes on (kohya keeps such keys without a word); a kohya_ss GUI JSON
is read by the GUI's own rules (lora_diffusion.options.kohya_ss).
"""

import argparse
import json
import math
import shlex
import warnings
from pathlib import Path

from lora_diffusion.formats.io import TOMLDecodeError, atomic_write, loads_toml

from .kohya_ss import GuiConfigError, gui_flags
from .parser import nearest
from .trainer import int_or_float


class ConfigFileError(ValueError):
    pass


def flag_dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{destination: its flag}: the first flag of each (a second spelling, --no_cache_latents or
    --caption_extention, shares the destination and has no default of its own)."""
    dests = {}
    for action in parser._actions:
        if action.dest != "help":
            dests.setdefault(action.dest, action)
    return dests


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Flag values from a TOML or kohya_ss GUI JSON file, checked against the parser's flags."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"--config_file {path}: no such file")
    try:
        if path.suffix.lower() == ".json":
            return _from_gui_json(json.loads(path.read_text(encoding="utf-8-sig")), path, parser)
        document = loads_toml(path.read_text(encoding="utf-8"))
    except (TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"--config_file {path} is not valid TOML/JSON: {e}") from None
    except RecursionError:
        raise ConfigFileError(f"--config_file {path}: nested too deeply to be a flag file (flags are key = value, "
                              f"in sections one level deep)") from None
    flat = {}
    for key, value in document.items():  # kohya groups flags in any sections; one level deep
        for k, v in (value.items() if isinstance(value, dict) else [(key, value)]):
            flat[k] = v
    return _checked(flat, path, parser)


# String flags that a TOML or GUI file may well give as a number (resolution = 512).
NUMBER_AS_STRING = {"resolution"}


def _checked(values: dict, path: Path, parser: argparse.ArgumentParser) -> dict:
    """The values typed as their flags. A key that is no flag is dropped with a warning naming the nearest flag
    (kohya itself keeps unknown keys without a word); on the command line the same typo is an error."""

    actions = flag_dests(parser)
    for key in sorted(k for k in values if k not in actions):
        warnings.warn(f"--config_file {path}: {key} is no flag of this trainer nor of kohya's; ignored"
                      f"{nearest(key, actions)}", stacklevel=3)
    checked = {}
    for key, value in values.items():
        if key not in actions:
            continue
        value = _typed(key, value, actions[key], path)
        action = actions[key]
        if action.choices is not None and value is not None and value not in action.choices:
            raise ConfigFileError(f"--config_file {path}: {key} = {value!r}; expected one of {list(action.choices)}")
        checked[key] = value
    return checked


def _typed(key: str, value, action: argparse.Action, path: Path):
    """The value as the flag's type, without any lossy coercion (true is no number, 2.9 no whole number)."""
    def bad(expected):
        raise ConfigFileError(f"--config_file {path}: {key} = {value!r} ({type(value).__name__}); expected {expected}")

    if value is None:
        return None
    if action.nargs == 0:  # --flag switches
        if not isinstance(value, bool):
            bad("true or false")
        return value
    if action.nargs in ("*", "+") and action.type in (int, float):  # text_encoder_lr = 1e-4 or [1e-4, 5e-5]
        return [_number(v, action.type, bad) for v in (value if isinstance(value, list) else [value])]
    if action.nargs in ("*", "+"):
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            bad('a list of strings such as ["conv_dim=4", "conv_alpha=1"]')
        return items
    if action.type in (int, float):
        return _number(value, action.type, bad)
    if action.type is int_or_float and not isinstance(value, str):
        number = _number(value, float, bad)
        return int(number) if isinstance(value, int) else number
    if isinstance(value, list) and key in NUMBER_AS_STRING and 1 <= len(value) <= 2 and \
            all(type(v) is int for v in value):
        return ",".join(map(str, value))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in NUMBER_AS_STRING:
        return str(value)
    if not isinstance(value, str):
        bad("a string")
    return value if action.type is None else action.type(value)


def _number(value, kind, bad):
    """`value` as an int or float flag's value; bad(expected) for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        bad("a whole number" if kind is int else "a number")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            bad("a whole number" if kind is int else "a number")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            bad("a whole number")
        return int(value)
    if not math.isfinite(value):
        bad("a finite number")
    return float(value)


def _from_gui_json(document, path: Path, parser: argparse.ArgumentParser) -> dict:
    """A kohya_ss GUI config: its keys read by the GUI's own rules (options.kohya_ss), then
    `additional_parameters` parsed as flags (they win, as on the GUI's command line)."""

    if not isinstance(document, dict):
        raise ConfigFileError(f"--config_file {path}: expected a JSON object of settings (a kohya_ss GUI config), "
                              f"got a {type(document).__name__}")
    try:
        values, unused, additional = gui_flags(document, path, flag_dests(parser))
    except GuiConfigError as e:
        raise ConfigFileError(str(e)) from None
    if additional:
        given, unknown = _additional_parameters(additional, path, parser)
        defaults = vars(parser.parse_known_args([])[0])
        values.update({k: v for k, v in vars(given).items() if k in defaults and v != defaults[k]})
        unused += [f"additional_parameters {u}" for u in unknown if u.startswith("-")]
    if unused:
        warnings.warn(f"{path}: ignoring kohya_ss GUI setting(s) that train nothing here: "
                      f"{', '.join(sorted(unused))}", stacklevel=2)
    return _checked(values, path, parser)


def _additional_parameters(value, path: Path, parser: argparse.ArgumentParser):
    """The GUI's free-text flags, parsed by the trainer's parser; every problem names the file and the key."""
    if not isinstance(value, str):
        raise ConfigFileError(f"--config_file {path}: additional_parameters = {value!r}; expected a string of flags")
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise ConfigFileError(f"--config_file {path}: additional_parameters = {value!r} cannot be split into flags "
                              f"({e})") from None
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        return parser.parse_known_args(words)
    except (argparse.ArgumentError, SystemExit) as e:
        raise ConfigFileError(f"--config_file {path}: additional_parameters = {value!r}: {e}") from None
    finally:
        parser.exit_on_error = exit_on_error


def write_config_file(path: str, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Every flag that differs from its default, as a flat TOML that --config_file reads back."""
    text = config_text(args, parser)
    atomic_write(path, lambda f: f.write(text), mode="w")


def config_text(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The text of write_config_file."""
    lines = []
    for dest, action in flag_dests(parser).items():
        if dest in ("config_file", "output_config") or action.default is argparse.SUPPRESS:
            continue  # a second spelling of another flag (--caption_extention) writes nothing of its own
        value = getattr(args, dest, None)
        if value is None or value == action.default:
            continue
        lines.append(f"{dest} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))
