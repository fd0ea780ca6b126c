"""The command line made from the declarations: argparse without abbreviations (a typo of a prefix must not train
silently), and an unknown flag answered in one line with the nearest flag's name."""

import argparse
import difflib
import sys

from .declare import Option


def nearest(name: str, names) -> str:
    """ "; did you mean --x?" for the closest of `names`, or ""."""
    close = difflib.get_close_matches(name.lstrip("-"), [n.lstrip("-") for n in names], n=1, cutoff=0.6)
    return f"; did you mean --{close[0]}?" if close else ""


class OptionParser(argparse.ArgumentParser):
    def __init__(self, options: list[Option], **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self.options = {o.name: o for o in options}
        groups = {}
        for option in options:
            if option.group not in groups:
                groups[option.group] = self.add_argument_group(option.group)
            add_option(groups[option.group], option)

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            words = [w for w in message.split(": ", 1)[1].split() if w.startswith("-")] or message.split()[-1:]
            flag = words[0].split("=")[0]
            message = f"unknown flag {flag}{nearest(flag, self.options)} (all flags: {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_option(parser, option: Option):
    flags = [f"--{option.name}", *option.aliases]
    if option.dest and option.switch:
        action = "store_false" if option.const is False else "store_true"
        parser.add_argument(*flags, dest=option.dest, action=action, default=argparse.SUPPRESS, help=option.help)
    elif option.switch:
        parser.add_argument(*flags, action="store_true", default=option.default, help=option.help)
    else:  # a second spelling of another option leaves that option's default alone
        extra = {"dest": option.dest, "default": argparse.SUPPRESS} if option.dest else {"default": option.default}
        parser.add_argument(*flags, type=option.type, nargs=option.nargs, choices=option.choices, help=option.help,
                            **extra)


def build_parser(options: list[Option], prog=None, description=None) -> OptionParser:
    return OptionParser(options, prog=prog or _prog(), description=description,
                        formatter_class=argparse.RawDescriptionHelpFormatter)


def _prog() -> str:
    return sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "train_lora.py"
