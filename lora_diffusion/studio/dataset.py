"""The dataset view: a training folder (and a reg folder) read by the dataset code itself (LoRADataset), so its
concepts, captions, buckets and warnings are what training would see; and a caption saved all-or-nothing."""

import warnings
from collections import Counter
from pathlib import Path

from lora_diffusion.data.dataset import LoRADataset
from lora_diffusion.data.files import dotted_extension, is_image_file
from lora_diffusion.data.layout import caption_file
from lora_diffusion.data.subset import FLAG_DEFAULTS
from lora_diffusion.formats.io import atomic_write

from .paths import inside_root, relative_to_root

MAX_IMAGES = 2000  # listed per view (the counts cover them all)


def scan(root: Path, train_data_dir: str, reg_data_dir: str | None = None, **given) -> dict:
    """`given`: dataset options by their flag names (the train form's caption_extension, resolution,
    enable_bucket, ...); unset ones take the flags' defaults."""

    train = inside_root(root, train_data_dir, "train_data_dir")
    reg = inside_root(root, reg_data_dir, "reg_data_dir") if reg_data_dir else None
    options = {k: v for k, v in given.items() if k in FLAG_DEFAULTS and v not in (None, "")}
    options.setdefault("caption_extension", ".txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = LoRADataset(train, reg, **options)
    concepts = []
    for index, subset in enumerate(dataset.subsets):
        entries = [e for e in dataset.entries if e.subset == index]
        concepts.append({"folder": relative_to_root(root, subset.image_dir), "repeats": subset.num_repeats,
                         "class_tokens": subset.class_tokens, "is_reg": subset.is_reg, "images": len(entries),
                         "steps_per_epoch": sum(e.repeats for e in entries)})
    extension = dotted_extension(options["caption_extension"])
    images = [{"path": relative_to_root(root, e.path), "caption": e.caption,
               "caption_file": relative_to_root(root, caption_file(e.path, extension)),
               "size": list(e.size), "bucket": list(e.bucket), "concept": e.subset,
               "is_reg": dataset.subsets[e.subset].is_reg} for e in dataset.entries[:MAX_IMAGES]]
    buckets = Counter(f"{e.bucket[0]}x{e.bucket[1]}" for e in dataset.entries)
    return {"concepts": concepts, "images": images, "total_images": len(dataset.entries),
            "buckets": dict(sorted(buckets.items())), "warnings": [str(w.message) for w in caught]}


def save_caption(root: Path, image: str, caption_extension: str, text: str) -> str:
    """Writes the image's caption file (<stem><ext> beside it), atomically; returns its path under the root."""
    path = image_file(root, image)
    extension = dotted_extension(caption_extension or ".txt")  # 'txt' as the trainer reads it
    if "/" in extension or "\\" in extension:
        raise ValueError(f"caption_extension {extension!r}: expected an extension such as .txt")
    if not isinstance(text, str):
        raise ValueError("caption: expected text")
    target = inside_root(root, str(path.with_name(path.stem + extension)), "caption file")
    atomic_write(target, lambda f: f.write(text.strip() + "\n"), mode="w")
    return relative_to_root(root, target)


def thumbnail(root: Path, image: str, size: int = 192) -> bytes:
    from io import BytesIO

    from PIL import Image

    with Image.open(image_file(root, image)) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        buffer = BytesIO()
        img.save(buffer, format="PNG")
    return buffer.getvalue()


def image_file(root: Path, image: str) -> Path:
    """An image file under the root (the only files the studio serves, besides evaluation results)."""

    path = inside_root(root, image, "image")
    if not path.is_file() or not is_image_file(path):
        raise ValueError(f"image {image!r}: no such image under the studio's root")
    return path


def folders(root: Path, under: str = ".") -> list[str]:
    """The folders directly inside `under` (for the folder pickers)."""
    path = inside_root(root, under or ".", "folder")
    if not path.is_dir():
        raise ValueError(f"folder {under!r}: not a folder under the studio's root")
    return sorted(relative_to_root(root, p) for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and inside_or_none(root, p))


def inside_or_none(root, path: Path) -> bool:
    try:
        inside_root(root, str(path))
    except ValueError:
        return False
    return True


def images_in(root: Path, under: str) -> list[str]:
    """The images directly inside a folder under the root (generated images, samples)."""

    path = inside_root(root, under or ".", "folder")
    if not path.is_dir():
        raise ValueError(f"folder {under!r}: not a folder under the studio's root")
    return sorted(relative_to_root(root, p) for p in path.iterdir() if p.is_file() and is_image_file(p)
                  and inside_or_none(root, p))
