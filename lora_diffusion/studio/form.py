"""The train form, made from the option declarations (lora_diffusion.options.trainer_options): one field per
option, grouped as --help groups them, with its help and default. The page's values become an argv list (never a
shell line) that the trainer's own parser and resolve() check, exactly as on the command line."""

import argparse
import contextlib
import io
import shlex
import tempfile
import warnings
from pathlib import Path

from .paths import inside_root

# The two options the studio does itself: Import reads a file, Export writes the TOML.
NOT_IN_FORM = {"config_file": "the Import button reads a TOML or kohya_ss GUI file",
               "output_config": "the Export button writes the run's TOML"}
# String options that name files or folders (besides every *_dir, *_path, *_file): they must lie under --root.
PATH_OPTIONS = {"pretrained_model_name_or_path", "vae", "dataset_config", "in_json", "network_weights",
                "base_weights", "resume", "sample_prompts", "validation_prompts", "log_tracker_config"}
SCHEMES = ("builtin:", "world:")  # model and prompt names that are no paths


class FormError(ValueError):
    """A value the trainer would refuse (the message is the trainer's, naming the flag)."""


def kind_of(option) -> str:
    if option.switch:
        return "switch"
    if option.nargs:
        return "list"
    if option.choices:
        return "choice"
    return {int: "int", float: "float"}.get(option.type, "text")


def option_fields() -> list[dict]:
    """Every declared option but NOT_IN_FORM, as the page draws it."""
    from lora_diffusion.options import trainer_options

    fields = []
    for option in trainer_options():
        if option.name in NOT_IN_FORM:
            continue
        default = option.default
        fields.append({"name": option.name, "group": option.group, "kind": kind_of(option), "help": option.help,
                       "default": list(default) if isinstance(default, tuple) else default,
                       "choices": list(option.choices) if option.choices else None, "refused": option.refused,
                       "alias_of": option.dest, "kohya": option.kohya, "path": is_path_option(option.name)})
    return fields


def is_path_option(name: str) -> bool:
    return name in PATH_OPTIONS or (name.endswith(("_dir", "_path", "_file")) and not name.startswith("huggingface"))


def values_to_argv(values: dict) -> list[str]:
    """The flags of the page's values. `--name=value` keeps a value that starts with '-' a value; list items
    that look like flags are refused (argparse would read them as flags)."""
    if not isinstance(values, dict):
        raise FormError("expected the form's values as an object of option names")
    fields = {f["name"]: f for f in option_fields()}
    argv = []
    for name, value in values.items():
        field = fields.get(name)
        if field is None:
            raise FormError(f"--{name}: no such option of train_lora.py" if name not in NOT_IN_FORM else
                            f"--{name}: not set in the form ({NOT_IN_FORM[name]})")
        if value is None or value == "" or value == []:
            continue
        if field["kind"] == "switch":
            if not isinstance(value, bool):
                raise FormError(f"--{name}: expected true or false, got {value!r}")
            if value:
                argv.append(f"--{name}")
        elif field["kind"] == "list":
            items = value.split() if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, (str, int, float)) for v in items):
                raise FormError(f"--{name}: expected a list of values, got {value!r}")
            refuse_flag_like(map(str, items), f"--{name}")
            argv += [f"--{name}", *map(str, items)]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv.append(f"--{name}={value}")
        else:
            raise FormError(f"--{name}: expected a value, got {value!r}")
    return argv


def looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def refuse_flag_like(items, what: str):
    """Values that argparse would read as flags ('-x', but not '-1') are refused, naming the field."""
    for item in items:
        if item.startswith("-") and not looks_like_number(item):
            raise FormError(f"{what}: {item!r} starts with '-', so it would be read as a flag (on a command line it "
                            "would be a flag, not this value)")


def check_path_items(root: Path, items, what: str):
    """Each path value lies under the root (a scheme such as builtin: names no file); PathRefused names `what`."""
    for item in items:
        if isinstance(item, str) and not item.startswith(SCHEMES):
            inside_root(root, item, what)


def parse_quietly(parser: argparse.ArgumentParser, argv: list[str], prefix: str = ""):
    """parser.parse_args(argv), its one-line error (without `prefix`) as FormError instead of usage on stderr."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            return parser.parse_args(argv)
        except SystemExit:
            lines = errors.getvalue().strip().splitlines()
            raise FormError(lines[-1].removeprefix(prefix) if lines else f"{parser.prog}: invalid arguments") \
                from None


def check_paths(values: dict, root: Path):
    """Every file or folder option's value lies under the root (PathRefused names the flag otherwise)."""
    for name, value in values.items():
        if not is_path_option(name) or value in (None, "", []):
            continue
        check_path_items(root, value if isinstance(value, list) else [value], f"--{name}")


def parse(values: dict) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """The trainer's parser over the values' argv (its own one-line errors become FormError)."""
    from lora_diffusion.training.trainer import build_parser

    parser = build_parser(prog="train_lora.py")
    return parse_quietly(parser, values_to_argv(values), "train_lora.py: error: "), parser


def check(values: dict, root: Path) -> dict:
    """The run the values describe, checked as the CLI checks it: {"toml", "command", "warnings", "output_dir",
    "output_name"}. FormError (or PathRefused) says what is wrong."""
    from lora_diffusion.training.errors import TrainingError
    from lora_diffusion.training.trainer import resolve

    check_paths(values, root)
    args, parser = parse(values)
    with warnings.catch_warnings(record=True) as caught:  # relative paths: the studio works in its root
        warnings.simplefilter("always")
        try:
            resolved = resolve(args)
        except (TrainingError, ValueError) as e:  # each message names its flag, as the CLI prints it
            raise FormError(str(e)) from None
    return {"toml": toml_text(args, parser), "command": command_line(values),
            "warnings": [str(w.message) for w in caught], "output_dir": str(resolved.output_dir or "."),
            "output_name": resolved.output_name or "last"}


def toml_text(args: argparse.Namespace, parser) -> str:
    """The flags that differ from their defaults, as a flat TOML that --config_file reads back (--output_config's)."""
    from lora_diffusion.options.flag_file import config_text

    return config_text(args, parser)


def command_line(values: dict) -> str:
    return shlex.join(["python", "train_lora.py", *values_to_argv(values)])


def import_config(text: str, filename: str) -> dict:
    """The form values of a TOML or kohya_ss GUI .json (read by the trainer's reader): {"values", "warnings"}."""
    from lora_diffusion.options.flag_file import read_config_file
    from lora_diffusion.training.trainer import build_parser

    suffix = ".json" if str(filename).lower().endswith(".json") else ".toml"
    fields = {f["name"] for f in option_fields()}
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = Path(folder) / f"imported{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            flags = read_config_file(str(path), build_parser(prog="train_lora.py"))
        except ValueError as e:
            raise FormError(str(e).replace(str(path), filename)) from None
    values = {name: value for name, value in flags.items() if name in fields}
    return {"values": values, "warnings": [str(w.message).replace(str(path), filename) for w in caught]}
