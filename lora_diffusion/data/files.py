"""Which files are training images and which folders are concept folders (`<repeats>_<name>`); no torch, so the
dataset tools share it with the dataset."""

import re
from pathlib import Path

from PIL import Image

# formats Pillow can identify but not decode without extra software, or that are not pictures
_NOT_TRAINING_IMAGES = {".bufr", ".grib", ".h5", ".hdf", ".mpeg", ".mpg", ".emf", ".wmf", ".eps", ".ps"}
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in Image.OPEN and ext not in _NOT_TRAINING_IMAGES)

CONCEPT_FOLDER = re.compile(r"^(\d+)_(.*)$")
# repeats of one folder per epoch: kohya's examples use 1-400; more is a typo, and 999999999999 would
# need terabytes for the per-epoch sample list. More steps come from more epochs.
MAX_REPEATS = 10_000


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def dotted_extension(extension: str) -> str:
    """A caption extension as written in a file name: 'txt' -> '.txt' ('.txt' stays); the one normalisation of
    caption_extension (dataset options, excise, caption-sets)."""
    return extension if extension.startswith(".") else "." + extension
