"""What every captioner shares: the Captioner interface, its errors, model folders (a local folder or the Hugging
Face cache), devices and dtypes, and the loop that captions a folder (batches, a progress bar, atomic writes that
never replace a caption unless asked, unreadable images skipped with a warning)."""

import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lora_diffusion.data.files import is_image_file
from lora_diffusion.formats.io import atomic_write

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CaptionError(ValueError):
    """A captioning problem the user fixes (a missing model or extra, a bad option): one line, no traceback."""


def require(module: str, command: str, extra: str = "caption", package: str | None = None):
    """import `module`, or a CaptionError naming the command and the install line."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        pip = f"pip install 'lora-diffusion[{extra}]'" if extra else f"pip install {package or module}"
        raise CaptionError(f"{command} needs {package or module} ({error}); install it with `{pip}`") from None


def resolve_model(spec, command: str, *, files=None, ignore=None, how_to_get: str = "") -> Path:
    """The local folder of model `spec`: a folder as given, else the Hugging Face cache's snapshot of the repo id
    `spec` (fetched with huggingface_hub unless HF_HUB_OFFLINE is set). `files`: the files the captioner needs
    (only those are fetched), `ignore`: files not to fetch. A CaptionError names the model and how to get it
    when it is not there."""
    if spec is None or not str(spec).strip():
        raise CaptionError(f"{command}: no model given; pass --model FOLDER_OR_HF_ID")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    get = how_to_get or f"`hf download {spec}` (huggingface_hub's CLI) or pass a local folder with --model"
    if not REPO_ID.match(str(spec)):
        raise CaptionError(f"{command}: model '{spec}' is not a folder (nor a Hugging Face repo id such as "
                           f"'owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CaptionError(f"{command}: model '{spec}' is not a local folder and huggingface_hub is not installed; "
                           f"pass a local folder with --model") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(str(spec), allow_patterns=files, ignore_patterns=ignore, local_files_only=True))
    except Exception as cached_error:  # not in the cache (huggingface_hub's errors vary by version)
        if offline:
            raise CaptionError(f"{command}: model '{spec}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
                               f"; get it with {get}") from None
        try:
            return Path(snapshot_download(str(spec), allow_patterns=files, ignore_patterns=ignore))
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CaptionError(f"{command}: model '{spec}' is not a local folder or in the Hugging Face cache, and "
                               f"downloading it failed ({reason[:200]}); get it with {get}") from cached_error


def torch_device(name):
    """'auto' (cuda when there is one, else cpu) or a torch device name."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise CaptionError(f"--device {name!r} is not a torch device ({error})") from None


DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_dtype(name, device):
    """'auto' (float16 on cuda, float32 elsewhere), float32/fp32, float16/fp16, bfloat16/bf16."""
    import torch

    if name not in DTYPES:
        raise CaptionError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    if DTYPES[name] is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, DTYPES[name])


class Captioner:
    """One captioning model: caption_batch(images) -> one caption per PIL image. Subclasses set `name`, `style`
    ('tags' or 'sentence': how --append/--prepend join), define `from_options(options)` and caption_batch."""

    name = "?"
    style = "sentence"
    separator = ", "

    @classmethod
    def from_options(cls, options):  # options: an argparse Namespace or SimpleNamespace of caption.py's flags
        raise NotImplementedError

    def caption_batch(self, images) -> list:
        raise NotImplementedError

    def combine(self, existing: str, new: str, where: str) -> str:
        """`new` added to an existing caption: tags are joined without repeats (kohya's --append_tags), sentences
        with a space."""
        existing = existing.strip()
        if not existing:
            return new
        if self.style == "tags":
            sep = self.separator.strip() or ","
            old = [t.strip() for t in existing.split(sep) if t.strip()]
            fresh = [t.strip() for t in new.split(sep) if t.strip()]
            if where == "append":
                return self.separator.join(old + [t for t in fresh if t not in old])
            return self.separator.join(fresh + [t for t in old if t not in fresh])
        return f"{existing} {new}" if where == "append" else f"{new} {existing}"


def find_images(paths, recursive=False) -> list:
    """Image files from folders (their images, sorted; subfolders with `recursive`) and image files as given."""
    found = []
    for spec in paths:
        path = Path(spec).expanduser()
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            found += sorted((p for p in pattern if p.is_file() and is_image_file(p)),
                            key=lambda p: str(p))
        elif path.is_file():
            found.append(path)
        else:
            raise CaptionError(f"'{spec}' is not an image file or a folder")
    return list(dict.fromkeys(found))


def load_image(path):
    """The image as a PIL image (loaded, not converted: each captioner converts as its model expects)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy() if image.mode != "P" else image.convert("RGBA" if "transparency" in image.info else "RGB")


@dataclass
class CaptionReport:
    written: list = field(default_factory=list)
    skipped_existing: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)

    def format(self) -> str:
        parts = [f"{len(self.written)} caption(s) written"]
        if self.skipped_existing:
            parts.append(f"{len(self.skipped_existing)} kept (a caption exists; --overwrite to replace)")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable image(s) skipped")
        return ", ".join(parts)


def caption_path(image: Path, out_ext: str, output_dir=None, root=None) -> Path:
    ext = out_ext if out_ext.startswith(".") else "." + out_ext
    if output_dir is None:
        return image.with_name(image.stem + ext)
    relative = image.parent.relative_to(root) if root is not None and image.is_relative_to(root) else Path()
    return Path(output_dir) / relative / (image.stem + ext)


def caption_images(captioner: Captioner, images, *, out_ext=".txt", output_dir=None, root=None, overwrite=False,
                   batch_size=1, mode="write", progress=True, warn=None) -> CaptionReport:
    """Caption each image into '<stem><out_ext>' beside it (or under `output_dir`, keeping the folders below
    `root`). mode: 'write' (a new caption; an existing one is kept unless `overwrite`), 'append' or 'prepend' (to
    the existing caption). Unreadable images are skipped with a warning naming them."""
    warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr))
    if batch_size < 1:
        raise CaptionError(f"--batch_size must be >= 1, got {batch_size}")
    report, todo = CaptionReport(), []
    for image in images:
        target = caption_path(image, out_ext, output_dir, root)
        if mode == "write" and target.exists() and not overwrite:
            report.skipped_existing.append(image)
        else:
            todo.append((image, target))
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="image", desc=f"caption ({captioner.name})", file=sys.stderr)
    try:
        for start in range(0, len(todo), batch_size):
            loaded = []
            for image, target in todo[start:start + batch_size]:
                try:
                    loaded.append((image, target, load_image(image)))
                except Exception as error:  # PIL raises many kinds for broken files
                    warn(f"cannot read image '{image}' ({type(error).__name__}: {error}); skipped")
                    report.unreadable.append(image)
            if loaded:
                captions = captioner.caption_batch([pil for _, _, pil in loaded])
                for (image, target, _), text in zip(loaded, captions):
                    if mode != "write" and target.exists():
                        text = captioner.combine(target.read_text(encoding="utf-8"), text, mode)
                    atomic_write(target, lambda f, text=text: f.write(text.strip() + "\n"), mode="w")
                    report.written.append(target)
            if bar is not None:
                bar.update(len(todo[start:start + batch_size]))
    finally:
        if bar is not None:
            bar.close()
    return report
