"""Write benchmarks/kohya_flags.json: the flags of kohya sd-scripts' sdxl_train_network.py (train_network.py's and
the SDXL additions), read from a checkout by running only its `add_*_arguments` functions and `setup_parser` (no
torch, no kohya imports: each function's source is compiled on its own), so the coverage check needs no network.

    python benchmarks/kohya_flag_snapshot.py path/to/sd-scripts > benchmarks/kohya_flags.json
"""

import argparse
import ast
import json
import pathlib
import subprocess
import sys
import types
import typing

MODULES = {"train_util": "library/train_util.py", "config_util": "library/config_util.py",
           "custom_train_functions": "library/custom_train_functions.py",
           "deepspeed_utils": "library/deepspeed_utils.py", "sai_model_spec": "library/sai_model_spec.py",
           "sdxl_train_util": "library/sdxl_train_util.py", "utils": "library/utils.py",
           "train_network": "train_network.py", "sdxl_train_network": "sdxl_train_network.py"}


def wanted(node) -> bool:
    if isinstance(node, ast.FunctionDef):
        return node.name == "setup_parser" or (node.name.startswith("add_") and node.name.endswith("arguments"))
    return isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)


def load(root: pathlib.Path) -> dict:
    modules = {name: types.ModuleType(name) for name in MODULES}
    for name, module in modules.items():
        module.__dict__.update(modules, argparse=argparse, Path=pathlib.Path, Optional=typing.Optional,
                               Union=typing.Union, List=typing.List)
    for name, rel in MODULES.items():
        for node in ast.parse((root / rel).read_text(encoding="utf-8")).body:
            if wanted(node):
                try:
                    exec(compile(ast.Module(body=[node], type_ignores=[]), rel, "exec"), modules[name].__dict__)
                except Exception:  # a constant built from kohya's imports: not needed for the flags
                    pass
    for module in modules.values():
        module.add_logging_arguments = modules["utils"].add_logging_arguments
    return modules


def main():
    root = pathlib.Path(sys.argv[1])
    parser = load(root)["sdxl_train_network"].setup_parser()
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    flags = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        choices = list(action.choices) if action.choices and len(action.choices) <= 20 else None
        default = action.default if isinstance(action.default, (int, float, str, bool, type(None))) else None
        flags.append(dict(name=action.dest, type=getattr(action.type, "__name__", None), nargs=action.nargs,
                          default=default, choices=choices))
    json.dump({"source": f"kohya-ss/sd-scripts sdxl_train_network.py setup_parser at {commit.strip() or '?'}",
               "how": "python benchmarks/kohya_flag_snapshot.py <sd-scripts checkout> > benchmarks/kohya_flags.json",
               "flags": flags}, sys.stdout, indent=0)
    print()


if __name__ == "__main__":
    main()
