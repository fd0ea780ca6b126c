"""Sample prompt files, kohya's format: one prompt a line (blank lines and # comments skipped), with inline options
    a photo of sks dog on the beach --n blurry, lowres --w 512 --h 768 --d 42 --l 7.5 --s 30 --ss euler_a
(--n negative prompt, --w/--h size, --d seed, --l guidance scale, --s steps, --ss sampler), or kohya's .toml
([prompt] defaults + [[prompt.subset]] entries) and .json (a list of objects) files. Each prompt becomes a dict
(prompt, negative_prompt, width, height, seed, scale, steps, sampler) that models.sampling.sample_images draws.
"""

import json
import re
from pathlib import Path

from lora_diffusion.formats.io import loads_toml

from .sampling import SAMPLERS

# inline option -> (prompt dict key, parser)
PROMPT_OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("scale", float),
    "s": ("steps", int),
    "ss": ("sampler", str),
}
# keys accepted in .toml/.json prompt files (kohya's names first) -> prompt dict key
FILE_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "scale": "scale",
    "guidance_scale": "scale",
    "sample_steps": "steps",
    "steps": "steps",
    "sample_sampler": "sampler",
    "sampler": "sampler",
}


class PromptFileError(ValueError):
    """A sample prompt (file) that cannot be read."""


class PromptFileNotFoundError(PromptFileError, FileNotFoundError):
    """--sample_prompts names a file that does not exist."""


def _finish(prompt):
    """Validate and normalise a prompt dict in place (kohya: sizes down to a multiple of 8, steps 1..1000)."""
    for key in ("width", "height"):
        if prompt[key] < 64:
            raise ValueError(f"{key} must be at least 64 pixels, got {prompt[key]}")
        prompt[key] -= prompt[key] % 8
    prompt["steps"] = max(1, min(1000, prompt["steps"]))
    if prompt["sampler"] is not None and prompt["sampler"].lower() not in SAMPLERS:
        raise ValueError(f"unknown sampler {prompt['sampler']!r}; known: {', '.join(SAMPLERS)}")
    return prompt


def _defaults(width, height, scale, steps, seed, negative_prompt, sampler):
    return dict(
        prompt="", negative_prompt=negative_prompt, width=width, height=height,
        seed=seed, scale=scale, steps=steps, sampler=sampler,
    )


def parse_prompt_line(line, *, width=512, height=512, scale=7.5, steps=30, seed=None, negative_prompt="", sampler=None):
    """One prompt line -> dict(prompt, negative_prompt, width, height, seed, scale, steps, sampler).

    The keyword arguments are the defaults for options the line does not set (pass the training resolution).
    """
    prompt = _defaults(width, height, scale, steps, seed, negative_prompt, sampler)
    parts = (" " + line.strip()).split(" --")
    prompt["prompt"] = parts[0].strip()
    for part in parts[1:]:
        match = re.fullmatch(r"(\w+)(?:\s+(.*))?", part.strip(), flags=re.DOTALL)
        option = match.group(1).lower() if match else part
        if option not in PROMPT_OPTIONS:
            raise ValueError(f"unknown option --{option}; known: " + ", ".join(f"--{o}" for o in PROMPT_OPTIONS))
        key, parse = PROMPT_OPTIONS[option]
        value = (match.group(2) or "").strip()
        try:
            prompt[key] = parse(value)
        except ValueError:
            raise ValueError(f"--{option} expects {parse.__name__}, got {value!r}") from None
    return _finish(prompt)


def _apply_keys(entry, base):
    """base updated with a .toml/.json entry's keys (kohya's names)."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a table/object of prompt settings, got {entry!r}")
    prompt = dict(base)
    for key, value in entry.items():
        if key not in FILE_KEYS:
            raise ValueError(f"unknown key {key!r}; known: {', '.join(FILE_KEYS)}")
        prompt[FILE_KEYS[key]] = value
    return prompt


def _from_mapping(entry, defaults):
    prompt = _apply_keys(entry, defaults)
    if not prompt["prompt"]:
        raise ValueError(f"an entry has no 'prompt': {entry!r}")
    return _finish(prompt)


def read_prompts(path, *, width=512, height=512, scale=7.5, steps=30, seed=None, negative_prompt="", sampler=None):
    """All prompts of a .txt (one a line), .toml (kohya's [prompt] / [[prompt.subset]]) or .json (list) file."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileNotFoundError(f"--sample_prompts {path}: no such file (expected a .txt with one prompt a line)")
    defaults = _defaults(width, height, scale, steps, seed, negative_prompt, sampler)
    if path.suffix.lower() in (".toml", ".json"):
        try:
            if path.suffix.lower() == ".json":
                entries = json.loads(path.read_text(encoding="utf-8"))
            else:
                table = loads_toml(path.read_text(encoding="utf-8")).get("prompt", {})
                entries = table.pop("subset", [])
                defaults = _apply_keys(table, defaults)  # [prompt] holds file-wide defaults
            if not isinstance(entries, list):
                raise ValueError("expected a list of prompt objects")
            return [_from_mapping(entry, defaults) for entry in entries]
        except (ValueError, TypeError, AttributeError) as e:
            raise PromptFileError(f"--sample_prompts {path}: {e}") from e
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            prompts.append(parse_prompt_line(line, **{k: v for k, v in defaults.items() if k != "prompt"}))
        except ValueError as e:
            raise PromptFileError(f"--sample_prompts {path}, line {number}: {e}") from e
    return prompts
