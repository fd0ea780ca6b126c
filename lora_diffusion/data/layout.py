"""kohya's folder layout: concept folders named <repeats>_<class tokens>, the images and captions in
them, and how many times each image repeats per epoch (regularization images included)."""

from dataclasses import dataclass, replace
from pathlib import Path

from .buckets import select_bucket
from .captions import read_caption
from .errors import DatasetError, warn
from .files import CONCEPT_FOLDER, MAX_REPEATS, is_image_file
from .images import image_size
from .subset import Subset


@dataclass
class ImageEntry:
    path: Path
    subset: int  # index into LoRADataset.subsets
    caption: str  # before per-epoch processing
    size: tuple  # (w, h) as displayed
    bucket: tuple  # (w, h)
    repeats: int = 0
    mask: Path | None = None  # the mask image (conditioning_data_dir) of this image
    face: tuple | None = None  # (cx, cy, w, h) of the face from the file name, with face_crop_aug_range


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


def mask_folders(subsets, parent):
    """kohya's --conditioning_data_dir: each concept folder's masks are in the folder of the same name under
    `parent` (train/10_sks dog/ -> masks/10_sks dog/)."""
    parent = Path(parent).expanduser()
    if not parent.is_dir():
        raise DatasetError(f"--conditioning_data_dir '{parent}' is not a folder; expected the parent of mask folders "
                           f"named as the concept folders (e.g. '{parent / subsets[0].image_dir.name}')")
    missing = [s.image_dir.name for s in subsets if not (parent / s.image_dir.name).is_dir()]
    if missing:
        raise DatasetError(f"--conditioning_data_dir '{parent}' has no mask folder for {', '.join(missing)}: each "
                           f"concept folder's masks go in a folder of the same name (e.g. '{parent / missing[0]}')")
    return [replace(s, conditioning_data_dir=parent / s.image_dir.name) for s in subsets]


def caption_file(path: Path, ext: str) -> Path:
    """<stem><ext>; for kohya's face-crop images '<name>_<cx>_<cy>_<w>_<h>' without their own, '<name><ext>' (the
    face tool writes several crops of one captioned photo)."""
    own = path.with_name(path.stem + ext)
    parts = path.stem.split("_")
    if not own.is_file() and len(parts) >= 5:
        return path.with_name("_".join(parts[:-4]) + ext)
    return own


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
        caption_path = caption_file(path, ext)
        if caption_path.is_file():
            caption = read_caption(caption_path, all_lines=subset.enable_wildcard)
        else:
            missing_captions += 1
            caption = subset.class_tokens or ""
        entries.append(ImageEntry(path, subset_index, caption, size, select_bucket(size, subset),
                                  face=face_box(path, subset)))
    if missing_captions:
        fallback = f"the class tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
        hint = ""
        others = sorted({p.suffix for p in folder.iterdir() if p.suffix.lower() in (".txt", ".caption", ".tags")
                         and p.suffix != ext})
        if others:
            hint = f" (there are {', '.join(others)} files: set caption_extension to use them)"
        warn(f"{missing_captions} of {len(entries)} image(s) in '{folder}' have no '{ext}' caption file; "
              f"using {fallback}{hint}")
    if subset.conditioning_data_dir is not None:
        attach_masks(entries, subset)
    return entries


def face_box(path, subset):
    """kohya's face_crop_aug_range reads the face's centre and size from the file name: <name>_<cx>_<cy>_<w>_<h>
    (what kohya's face detection tool writes). None without the option or without such a name."""
    if subset.face_crop_aug_range is None:
        return None
    parts = Path(path).stem.split("_")
    if len(parts) >= 5 and all(p.isdigit() for p in parts[-4:]) and int(parts[-2]) > 0 and int(parts[-1]) > 0:
        return tuple(int(p) for p in parts[-4:])
    return None


def attach_masks(entries, subset: Subset):
    """Each image's mask: the image file of the same stem in conditioning_data_dir, of the same displayed size.
    A missing mask, a mask of another size, or a mask without an image is an error (kohya's rules)."""
    folder = Path(subset.conditioning_data_dir)
    if not folder.is_dir():
        raise DatasetError(f"conditioning_data_dir '{folder}' (masks of '{subset.image_dir}') is not a folder")
    masks = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.is_file() and is_image_file(path):
            if path.stem in masks:
                raise DatasetError(f"conditioning_data_dir '{folder}' has two masks for '{path.stem}': "
                                   f"'{masks[path.stem].name}' and '{path.name}'")
            masks[path.stem] = path
    missing = [e.path.name for e in entries if e.path.stem not in masks]
    if missing:
        raise DatasetError(f"conditioning_data_dir '{folder}' has no mask for {len(missing)} image(s) of "
                           f"'{subset.image_dir}': {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
                           + " (a mask is an image file of the image's stem)")
    images = {p.stem for p in subset.image_dir.iterdir() if p.is_file() and is_image_file(p)}
    extra = sorted(m.name for stem, m in masks.items() if stem not in images)
    if extra:
        raise DatasetError(f"conditioning_data_dir '{folder}' has masks without an image in '{subset.image_dir}': "
                           f"{', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
    for entry in entries:
        entry.mask = masks[entry.path.stem]
        try:
            size = image_size(entry.mask)
        except Exception as e:
            raise DatasetError(f"mask image '{entry.mask}' cannot be read: {type(e).__name__}: {e}") from None
        if tuple(size) != tuple(entry.size):
            raise DatasetError(f"mask image '{entry.mask}' is {size[0]}x{size[1]}, its image '{entry.path}' is "
                               f"{entry.size[0]}x{entry.size[1]}: a mask must have its image's size")


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
