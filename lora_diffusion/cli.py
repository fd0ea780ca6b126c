"""The `lora-diffusion` command: one subcommand per tool.

To add one, append (name, module, help) to SUBCOMMANDS, where the module defines
`add_arguments(parser)` and `run(args) -> int`; or call register() with the two functions. A module with a parser
of its own (the trainer: a --config_file fills its flags' defaults) defines `command(argv, prog) -> int` instead,
and gets the rest of the command line as written.
"""

import argparse
import importlib
import sys

SUBCOMMANDS = [
    ("train", "lora_diffusion.train", "train a LoRA: the flags of `python train_lora.py` (kohya sd-scripts' names)"),
    ("excise", "lora_diffusion.tools.excise", "remove words or phrases from every caption (writes a copy)"),
    ("balance", "lora_diffusion.tools.balance", "set each concept folder's repeats from a target steps per epoch"),
    ("caption-sets", "lora_diffusion.tools.caption_sets", "build 10_empty/ 10_wd/ ... folders from caption sources"),
    ("generate", "lora_diffusion.generate", "images from a base model plus LoRA files with multipliers"),
    ("evaluate", "lora_diffusion.evaluate", "score LoRA files (every epoch, multipliers): judge, FID/KID, CLIP, grid"),
    ("pretrain-mini", "lora_diffusion.pretrain_mini", "pretrain builtin:mini from scratch on the shapes world"),
    ("convert", "lora_diffusion.tools.model_convert", "single-file SD1.x/2.x/SDXL checkpoint <-> diffusers folder"),
    ("merge", "lora_diffusion.tools.merge", "LoRA files into a base model, or several LoRA files into one"),
    ("resize", "lora_diffusion.tools.resize", "a LoRA to a lower rank by SVD (fixed or kohya's dynamic methods)"),
    ("extract", "lora_diffusion.tools.extract", "a LoRA from the difference of a fine-tuned model and its base"),
    ("inspect", "lora_diffusion.tools.inspect", "a LoRA file's metadata, modules, per-block norms and loaders"),
]


def register(name, add_arguments, run, help=""):
    """Add a subcommand from two functions: add_arguments(parser) and run(args) -> int."""
    SUBCOMMANDS.append((name, (add_arguments, run), help))


def build_parser():
    parser = argparse.ArgumentParser(prog="lora-diffusion", description="LoRA for Stable Diffusion: training and "
                                     "tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, target, help in SUBCOMMANDS:
        if isinstance(target, str):
            module = importlib.import_module(target)
            if hasattr(module, "command"):  # parses its own flags: listed here, run by main() before parsing
                subparsers.add_parser(name, help=help, add_help=False)
                continue
            add_arguments, run, description = module.add_arguments, module.run, module.__doc__
        else:
            (add_arguments, run), description = target, help
        sub = subparsers.add_parser(name, help=help, description=description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(sub)
        sub.set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for name, target, _ in SUBCOMMANDS:
        if argv[:1] == [name] and isinstance(target, str):
            module = importlib.import_module(target)
            if hasattr(module, "command"):
                return int(module.command(argv[1:], prog=f"lora-diffusion {name}") or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as e:  # the tools' errors say what to fix; no traceback
        print(f"lora-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
