"""kohya's folder layout: concept folders named <repeats>_<class tokens>, the images and captions in
them, and how many times each image repeats per epoch (regularization images included)."""

from dataclasses import dataclass
from pathlib import Path

from lora_diffusion.data.buckets import select_bucket
from lora_diffusion.data.captions import read_caption
from lora_diffusion.data.errors import DatasetError, warn
from lora_diffusion.data.files import CONCEPT_FOLDER, MAX_REPEATS, is_image_file
from lora_diffusion.data.images import image_size
from lora_diffusion.data.subset import Subset


@dataclass
class ImageEntry:
    path: Path
    subset: int  # index into LoRADataset.subsets
    caption: str  # before per-epoch processing
    size: tuple  # (w, h) as displayed
    bucket: tuple  # (w, h)
    repeats: int = 0


def concept_subsets(parent, flag, is_reg, options):
    """The subsets of a kohya folder: one per <repeats>_<class tokens> child of `parent`."""
    parent = Path(parent).expanduser()
    if not parent.exists():
        raise DatasetError(f"{flag} '{parent}' does not exist")
    if not parent.is_dir():
        raise DatasetError(f"{flag} '{parent}' is a file; expected the parent folder of '<repeats>_<name>' "
                           f"folders such as '{parent.parent / 'train' / '10_sks dog'}'")
    subsets, skipped = [], []
    for child in sorted(parent.iterdir(), key=lambda p: p.name):
        if not child.is_dir() or child.name.startswith("."):
            continue
        match = CONCEPT_FOLDER.match(child.name)
        if match and int(match.group(1)) > MAX_REPEATS:
            raise DatasetError(f"folder '{child}' asks for {match.group(1)} repeats per epoch; the limit is "
                               f"{MAX_REPEATS}: rename it (e.g. '10_{match.group(2)}') and train more epochs instead")
        if not match or int(match.group(1)) < 1:
            skipped.append(child.name)
            warn(f"skipping folder '{child}': its name has no repeat prefix; concept folders are named "
                  f"'<repeats>_<class tokens>', e.g. '10_sks dog'")
            continue
        subsets.append(Subset(image_dir=child, num_repeats=int(match.group(1)), is_reg=is_reg,
                              class_tokens=match.group(2).strip() or None, **options))
    if not subsets:
        loose = sum(1 for p in parent.iterdir() if p.is_file() and is_image_file(p))
        message = (f"no training data found: {flag} '{parent}' has no '<repeats>_<name>' folders. {flag} must be "
                   f"the PARENT of folders such as '{parent / '10_sks dog'}' that hold the images and captions.")
        if loose:
            message += (f" It holds {loose} image(s) directly: move them into a subfolder named like "
                        f"'10_<class tokens>' (10 = repeats per epoch).")
        if CONCEPT_FOLDER.match(parent.name):
            message += f" '{parent.name}' looks like a concept folder itself: pass its parent '{parent.parent}'."
        if skipped:
            message += f" Folders without a repeat prefix were skipped: {', '.join(skipped)}."
        raise DatasetError(message)
    return subsets


def scan_subset(subset: Subset, subset_index: int):
    """ImageEntry for every readable image directly inside subset.image_dir (not recursive)."""
    folder = subset.image_dir
    if not folder.is_dir():
        raise DatasetError(f"image_dir '{folder}' does not exist or is not a folder")
    entries, missing_captions, ext = [], 0, subset.caption_extension
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if not path.is_file() or not is_image_file(path):
            continue
        try:
            size = image_size(path)
        except Exception as e:  # Pillow raises many kinds of errors on bad files
            warn(f"skipping unreadable image '{path}': {type(e).__name__}: {e}")
            continue
        caption_path = path.with_name(path.stem + ext)
        if caption_path.is_file():
            caption = read_caption(caption_path)
        else:
            missing_captions += 1
            caption = subset.class_tokens or ""
        entries.append(ImageEntry(path, subset_index, caption, size, select_bucket(size, subset)))
    if missing_captions:
        fallback = f"the class tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
        hint = ""
        others = sorted({p.suffix for p in folder.iterdir() if p.suffix.lower() in (".txt", ".caption", ".tags")
                         and p.suffix != ext})
        if others:
            hint = f" (there are {', '.join(others)} files: set caption_extension to use them)"
        warn(f"{missing_captions} of {len(entries)} image(s) in '{folder}' have no '{ext}' caption file; "
              f"using {fallback}{hint}")
    return entries


def assign_repeats(entries, subsets):
    """Training images repeat num_repeats times; the regularization pool repeats round-robin until it
    has as many samples as the training images (kohya's rule: it may stop before using every image)."""
    train = [e for e in entries if not subsets[e.subset].is_reg]
    reg = [e for e in entries if subsets[e.subset].is_reg]
    for e in train:
        e.repeats = subsets[e.subset].num_repeats
    target = sum(e.repeats for e in train)
    count, first_pass = 0, True
    while reg and count < target:
        for e in reg:
            step = subsets[e.subset].num_repeats if first_pass else 1
            e.repeats += step
            count += step
            if count >= target:
                break
        first_pass = False
