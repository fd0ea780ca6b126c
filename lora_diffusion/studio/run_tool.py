"""`python -m lora_diffusion.studio.run_tool TOOL ARGS...`: one `lora-diffusion` tool, importing only its own
module (the full command line imports every tool's to build its help, seconds of torch imports for excise), with
cli.main's handling of the tools' errors."""

import argparse
import importlib
import sys

from .tools import TOOLS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in TOOLS:
        print(f"run_tool: expected one of {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    name, module = argv[0], importlib.import_module(TOOLS[argv[0]])
    parser = argparse.ArgumentParser(prog=f"lora-diffusion {name}", allow_abbrev=False)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:  # the tools' errors say what to fix; no traceback (as cli.main)
        print(f"lora-diffusion {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
