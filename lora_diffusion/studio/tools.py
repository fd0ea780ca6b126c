"""The `lora-diffusion` tools from the page: each tool's form is made from its own argparse arguments, its values
become an argv list checked by that parser, and it runs as `lora-diffusion TOOL ...` would (no shell), with
its output kept for the page (`python -m lora_diffusion TOOL`, which imports only that tool)."""

import argparse
import itertools
import os
import subprocess
import sys
import threading
import time

from lora_diffusion import cli

from .form import FormError, check_path_items, parse_quietly, refuse_flag_like

# the page's tools (cli.SUBCOMMANDS' names): dataset tools, then the model and file tools
TOOLS = ("excise", "balance", "caption-sets", "caption", "inspect", "merge", "resize", "extract", "convert",
         "generate", "evaluate", "fuse")
# Arguments that name files or folders (besides positionals and *_dir/*_file): they must lie under the root.
PATH_ARGS = {"lora", "model", "output", "out", "prompts", "copy_to", "base", "tuned", "config", "reference",
             "embeddings_from", "clip_model", "images", "source"}


def tool_parser(name: str) -> argparse.ArgumentParser:
    if name not in TOOLS:
        raise FormError(f"no tool {name!r}; the studio runs {', '.join(TOOLS)}")
    return cli.subcommand_parser(name)


def tool_fields(name: str) -> list[dict]:
    fields = []
    for action in tool_parser(name)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        switch = action.nargs == 0
        many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")
        kind = "switch" if switch else "list" if many else "choice" if action.choices else \
            {int: "int", float: "float"}.get(action.type, "text")
        default = action.default if action.default is not argparse.SUPPRESS else None
        fields.append({"name": action.dest, "kind": kind, "help": action.help or "", "default": default,
                       "choices": list(action.choices) if action.choices else None,
                       "positional": not action.option_strings, "required": bool(action.required),
                       "path": is_path_arg(action)})
    return fields


def is_path_arg(action) -> bool:
    return not action.option_strings or action.dest in PATH_ARGS or action.dest.endswith(("_dir", "_file", "_to"))


def tool_argv(name: str, values: dict, root) -> list[str]:
    """The tool's argv from the page's values, its paths checked against the root and the whole parsed by the
    tool's own parser (its one-line error becomes FormError)."""
    if not isinstance(values, dict):
        raise FormError("expected the tool's values as an object of argument names")
    parser = tool_parser(name)
    actions = {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    positionals, flags = [], []
    for dest, value in values.items():
        action = actions.get(dest)
        if action is None:
            raise FormError(f"lora-diffusion {name}: no argument {dest!r}")
        if value is None or value == "" or value == [] or value is False:
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) for v in items):
            raise FormError(f"lora-diffusion {name} {dest}: expected text, a number or a list of them")
        items = [str(v) for v in items]
        if is_path_arg(action):
            check_path_items(root, items, f"lora-diffusion {name} {dest}")
        if not action.option_strings:
            refuse_flag_like(items, f"lora-diffusion {name} {dest}")
            positionals += items
        elif action.nargs == 0:
            if value is not True:
                raise FormError(f"lora-diffusion {name} --{dest}: expected true or false")
            flags.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendAction):
            flags += [f"{action.option_strings[0]}={item}" for item in items]
        elif action.nargs in ("*", "+"):
            flags += [action.option_strings[0], *items]
        else:
            flags.append(f"{action.option_strings[0]}={items[0]}")
    argv = flags + ["--", *positionals] if positionals else flags
    parse_quietly(parser, argv)
    return argv


class Tasks:
    """Tool runs in the background, their output kept in memory for the page (one studio's; not persisted)."""

    def __init__(self, root, python=sys.executable):
        self.root, self.python = root, python
        self.tasks, self.lock, self.ids = {}, threading.Lock(), itertools.count(1)

    def start(self, name: str, values: dict) -> dict:
        argv = [self.python, "-m", "lora_diffusion", name, *tool_argv(name, values, self.root)]
        task = {"id": next(self.ids), "tool": name, "argv": argv[3:], "state": "running", "output": "",
                "returncode": None, "started": time.time()}
        with self.lock:
            self.tasks[task["id"]] = task
        threading.Thread(target=self.run, args=(task, argv), daemon=True).start()
        return dict(task)

    def run(self, task: dict, argv: list[str]):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child = subprocess.Popen(argv, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        for line in iter(child.stdout.readline, b""):
            text = line.decode("utf-8", "replace").split("\r")[-1] or "\n"  # a progress bar's last redraw
            with self.lock:
                task["output"] = (task["output"] + text)[-200_000:]
        returncode = child.wait()
        with self.lock:
            task.update(state="finished" if returncode == 0 else "failed", returncode=returncode)

    def get(self, task_id: int) -> dict:
        with self.lock:
            if task_id not in self.tasks:
                raise FormError(f"no task {task_id}")
            return dict(self.tasks[task_id])
