"""The `lora-diffusion` command: one subcommand per tool.

To add one, append (name, module, help) to SUBCOMMANDS, where the module defines
`add_arguments(parser)` and `run(args) -> int`; or call register() with the two functions. A module with a parser
of its own (the trainer: a --config_file fills its flags' defaults) defines `command(argv, prog) -> int` instead,
and gets the rest of the command line as written.
"""

import argparse
import importlib
import os
import sys

SUBCOMMANDS = [
    ("train", "lora_diffusion.training.trainer",
     "train a LoRA: the flags of `python train_lora.py` (kohya sd-scripts' names)"),
    ("excise", "lora_diffusion.tools.excise", "remove words or phrases from every caption (writes a copy)"),
    ("balance", "lora_diffusion.tools.balance", "set each concept folder's repeats from a target steps per epoch"),
    ("caption-sets", "lora_diffusion.tools.caption_sets", "build 10_empty/ 10_wd/ ... folders from caption sources"),
    ("caption", "lora_diffusion.tools.caption", "caption images: wd14, kosmos2, blip, florence2, vlm, world"),
    ("generate", "lora_diffusion.tools.generate", "images from a base model plus LoRA files with multipliers"),
    ("evaluate", "lora_diffusion.tools.evaluate",
     "score LoRA files (every epoch, multipliers): judge, FID/KID, CLIP, grid"),
    ("pretrain-mini", "lora_diffusion.world.pretrain_mini", "pretrain builtin:mini from scratch on the shapes world"),
    ("convert", "lora_diffusion.tools.model_convert", "single-file SD1.x/2.x/SDXL checkpoint <-> diffusers folder"),
    ("merge", "lora_diffusion.tools.merge", "LoRA files into a base model, or several LoRA files into one"),
    ("resize", "lora_diffusion.tools.resize", "a LoRA to a lower rank by SVD (fixed or kohya's dynamic methods)"),
    ("extract", "lora_diffusion.tools.extract", "a LoRA from the difference of a fine-tuned model and its base"),
    ("fuse", "lora_diffusion.tools.fuse",
     "several concept LoRAs into one model by gradient fusion (Mix-of-Show): a diffusers folder and a kohya LoRA"),
    ("inspect", "lora_diffusion.tools.inspect", "a LoRA file's metadata, modules, per-block norms and loaders"),
    ("studio", "lora_diffusion.studio.command", "a local web UI: dataset, train form, job queue, live progress, tools"),
]


def cpu_threads(requested=None) -> int | None:
    """The torch CPU threads for a command: `requested` (its --threads) when given; else, unless OMP_NUM_THREADS
    says otherwise (None: leave torch's choice), the cores free now: the cores this process may use minus the
    1-minute load average, at least 1. torch's default, a thread per core, spin-waits against other busy
    processes: on 2 busy cores builtin:mini's training step took 0.5-2.9 s with 2 threads, 0.14-0.19 s with 1."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not on Windows
        return None
    return max(1, min(cores, round(cores - load)))


def set_cpu_threads(requested=None, command="", say=None) -> int:
    """torch.set_num_threads(cpu_threads(requested)); says when it chose fewer threads than cores, with `say`
    (default: a line on stderr)."""
    import torch

    threads = cpu_threads(requested)
    if threads is not None:
        torch.set_num_threads(threads)
        if not requested and threads < (os.cpu_count() or 1):
            (say or (lambda line: print(line, file=sys.stderr)))(
                f"{command}: {threads} CPU thread(s): the machine is busy (load {os.getloadavg()[0]:.1f}); "
                f"--threads N to choose")
    return torch.get_num_threads()


def register(name, add_arguments, run, help=""):
    """Add a subcommand from two functions: add_arguments(parser) and run(args) -> int."""
    SUBCOMMANDS.append((name, (add_arguments, run), help))


def _functions(name):
    """(add_arguments, run, description) of a subcommand, importing only its module; None for a module with a
    parser of its own (`command`)."""
    target, help = {n: (t, h) for n, t, h in SUBCOMMANDS}[name]
    if not isinstance(target, str):
        return (*target, help)
    module = importlib.import_module(target)
    return None if hasattr(module, "command") else (module.add_arguments, module.run, module.__doc__)


def subcommand_parser(name, subparsers=None) -> argparse.ArgumentParser:
    """The parser of one subcommand's flags: in `subparsers`, or on its own (prog `lora-diffusion NAME`)."""
    add_arguments, run, description = _functions(name)
    options = dict(description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    if subparsers is None:
        parser = argparse.ArgumentParser(prog=f"lora-diffusion {name}", **options)
    else:
        parser = subparsers.add_parser(name, help={n: h for n, _, h in SUBCOMMANDS}[name], **options)
    add_arguments(parser)
    parser.set_defaults(_run=run)
    return parser


def build_parser(only=None):
    """The `lora-diffusion` parser. A subcommand's module is imported only when its flags are needed: `only` (a
    name) builds just that one's (what main() runs); None builds them all (the full reference)."""
    parser = argparse.ArgumentParser(prog="lora-diffusion", description="LoRA for Stable Diffusion: training and "
                                     "tools", allow_abbrev=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, _, help in SUBCOMMANDS:
        if (only is None or name == only) and _functions(name) is not None:
            subcommand_parser(name, subparsers)
        else:  # listed in the help; a module with its own parser is run by main() before parsing
            subparsers.add_parser(name, help=help, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = [name for name, _, _ in SUBCOMMANDS]
    chosen = argv[0] if argv[:1] and argv[0] in names else ""  # "": the help, or an error naming the commands
    target = dict((name, target) for name, target, _ in SUBCOMMANDS).get(chosen)
    if isinstance(target, str):
        module = importlib.import_module(target)
        if hasattr(module, "command"):
            return int(module.command(argv[1:], prog=f"lora-diffusion {chosen}") or 0)
    args = build_parser(only=chosen).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, OSError) as e:  # the tools' errors say what to fix; no traceback
        print(f"lora-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
