"""`wd14`: the WD14 / wd-v3 taggers (SmilingWolf/wd-v1-4-*-tagger-v2, SmilingWolf/wd-*-tagger-v3) as their
authors ship them, an ONNX model plus selected_tags.csv, run with onnxruntime (the `[caption]` extra).

The preprocessing, thresholds and options follow kohya's finetune/tag_images_by_wd14_tagger.py (its --onnx path
for these models), so the same model and image give the same tags:
- the image: transparency composited on white, RGB -> BGR, padded to a square with white (centred), resized to the
  model's side (448) with an area average when shrinking and Lanczos when growing (OpenCV's INTER_AREA when
  OpenCV is installed, as kohya; else the same area average in numpy), float32 0-255, NHWC;
- the outputs: the first len(ratings) are the rating tags (category 9, the largest one is the rating), then the
  general tags (category 0) and the character tags (category 4), in the CSV's order; a tag is written when its
  score is >= its threshold (--general_threshold / --character_threshold, default --thresh 0.35);
- the tag names: --character_tag_expand ('name_(series)' -> 'name<sep>series'), --remove_underscore (tags longer
  than 3 characters, so '^_^' stays), --tag_replacement; then --undesired_tags are dropped, character tags go
  first with --character_tags_first (each put at the front, as kohya), the rating first (--use_rating_tags) or
  last (--use_rating_tags_as_last_tag), and each of --always_first_tags found is moved to the front in turn.
Two differences, both where kohya has a bug: --tag_replacement replaces the tag (kohya's function rebinds its
list and its result is dropped, so it changes nothing for these models), and --always_first_tags are stripped of
spaces like --undesired_tags (kohya compares ' 1boy' from '1girl, 1boy')."""

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from .base import Captioner, CaptionError, require, resolve_model

DEFAULT_SIZE = 448  # the WD14 / wd-v3 taggers' input side (kohya's IMAGE_SIZE)
FILES = ["model.onnx", "selected_tags.csv"]
COMMAND = "caption --captioner wd14"


def read_tags(csv_path):
    """(rating, general, character) tag names from a selected_tags.csv (tag_id,name,category,count)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise CaptionError(f"{csv_path}: not a WD14 selected_tags.csv (its header is not tag_id,name,category,...)")
    body = [row for row in rows[1:] if len(row) >= 3]
    pick = lambda category: [row[1] for row in body if row[2].strip() == category]  # noqa: E731
    return pick("9"), pick("0"), pick("4")


def parse_replacements(spec):
    """'a,b;c\\,d,e' -> [('a', 'b'), ('c,d', 'e')] (kohya's --tag_replacement: ',' and ';' escaped by '\\')."""
    if not spec:
        return []
    pairs = []
    for item in spec.replace("\\,", "\0c").replace("\\;", "\0s").split(";"):
        if not item.strip():
            continue
        parts = item.split(",")
        if len(parts) != 2:
            raise CaptionError(f"--tag_replacement: '{item}' is not 'source,target' (escape ',' and ';' with '\\')")
        pairs.append(tuple(p.replace("\0c", ",").replace("\0s", ";") for p in parts))
    return pairs


def expand_character_tag(tag, separator):
    """'name_(series)' -> 'name<sep>series'; 'name_(costume)_(series)' -> 'name_(costume)<sep>series'."""
    if not tag.endswith(")"):
        return tag
    head, _, series = tag.rpartition("(")
    return head.removesuffix("_") + separator + series.replace(")", "")


def area_weights(n_in, n_out):
    """(n_out, n_in) weights of an area average: each output pixel averages the input span it covers."""
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        start, end = i * scale, (i + 1) * scale
        for j in range(int(np.floor(start)), min(n_in, int(np.ceil(end)))):
            weights[i, j] = (min(end, j + 1) - max(start, j)) / scale
    return weights


def area_resize(array, size):
    """uint8 HxWxC -> size x size x C by area averaging (OpenCV's INTER_AREA when shrinking)."""
    try:
        import cv2

        return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA)
    except ImportError:
        pass
    rows, cols = area_weights(array.shape[0], size), area_weights(array.shape[1], size)
    out = np.stack([rows @ array[:, :, c].astype(np.float64) @ cols.T for c in range(array.shape[2])], axis=-1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess(image, size=DEFAULT_SIZE) -> np.ndarray:
    """A PIL image -> float32 size x size x 3 BGR, 0-255 (kohya's preprocess_image)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    bgr = np.asarray(image)[:, :, ::-1]
    side = max(bgr.shape[:2])
    pad_y, pad_x = side - bgr.shape[0], side - bgr.shape[1]
    bgr = np.pad(bgr, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
                 constant_values=255)
    if side >= size:
        bgr = area_resize(np.ascontiguousarray(bgr), size)
    else:
        bgr = np.asarray(Image.fromarray(np.ascontiguousarray(bgr)).resize((size, size), Image.Resampling.LANCZOS))
    return bgr.astype(np.float32)


class WD14Tagger(Captioner):
    name = "wd14"
    style = "tags"

    def __init__(self, model_dir, *, thresh=0.35, general_threshold=None, character_threshold=None,
                 undesired_tags="", always_first_tags=None, caption_separator=", ", remove_underscore=False,
                 use_rating_tags=False, use_rating_tags_as_last_tag=False, character_tags_first=False,
                 character_tag_expand=False, tag_replacement=None, device="auto", threads=None, session=None):
        model_dir = Path(model_dir)
        onnx_path = model_dir / "model.onnx" if model_dir.is_dir() else model_dir
        csv_path = onnx_path.with_name("selected_tags.csv")
        for needed in (onnx_path, csv_path):
            if not needed.is_file():
                raise CaptionError(f"{COMMAND}: '{needed}' is missing; a WD14 tagger folder holds model.onnx and "
                                   f"selected_tags.csv (e.g. SmilingWolf/wd-v1-4-convnext-tagger-v2)")
        self.separator = caption_separator
        self.general_threshold = thresh if general_threshold is None else general_threshold
        self.character_threshold = thresh if character_threshold is None else character_threshold
        self.use_rating_first, self.use_rating_last = use_rating_tags, use_rating_tags_as_last_tag
        self.character_tags_first = character_tags_first
        self.ratings, self.general, self.characters = self._names(read_tags(csv_path), character_tag_expand,
                                                                  remove_underscore, tag_replacement)
        stripped = caption_separator.strip() or ","
        self.undesired = {t.strip() for t in (undesired_tags or "").split(stripped) if t.strip()}
        self.always_first = [t.strip() for t in (always_first_tags or "").split(stripped) if t.strip()]
        self.session = session or self._session(onnx_path, device, threads)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = list(model_input.shape)
        self.size = shape[1] if len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_SIZE
        self.model_batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        self.tag_frequencies = Counter()

    def _names(self, tags, expand, underscores, replacement):
        ratings, general, characters = (list(t) for t in tags)
        if expand:
            characters = [expand_character_tag(t, self.separator) for t in characters]
        if underscores:
            ratings, general, characters = ([t.replace("_", " ") if len(t) > 3 else t for t in group]
                                            for group in (ratings, general, characters))
        for source, target in parse_replacements(replacement):
            for group in (ratings, general, characters):
                group[:] = [target if t == source else t for t in group]
        return ratings, general, characters

    @staticmethod
    def _session(onnx_path, device, threads=None):
        ort = require("onnxruntime", COMMAND)
        available = ort.get_available_providers()
        wanted = str(device or "auto")
        if wanted == "cpu":
            providers = ["CPUExecutionProvider"]
        elif wanted.startswith("cuda") or wanted == "auto":
            gpu = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available]
            if not gpu and wanted != "auto":
                raise CaptionError(f"{COMMAND}: --device {wanted}: onnxruntime has no GPU provider here (it has "
                                   f"{', '.join(available)}); install onnxruntime-gpu or use --device cpu")
            providers = gpu[:1] + ["CPUExecutionProvider"]
        else:
            raise CaptionError(f"{COMMAND}: --device {wanted!r}: use auto, cpu or cuda")
        settings = ort.SessionOptions()
        if threads:
            settings.intra_op_num_threads = int(threads)
        try:
            return ort.InferenceSession(str(onnx_path), sess_options=settings, providers=providers)
        except Exception as error:
            raise CaptionError(f"{COMMAND}: cannot load '{onnx_path}' ({type(error).__name__}: {error})") from None

    @classmethod
    def from_options(cls, options):
        get = lambda key, default=None: getattr(options, key, default)  # noqa: E731
        spec = get("model") or "SmilingWolf/wd-v1-4-convnext-tagger-v2"
        folder = resolve_model(spec, COMMAND, files=FILES, how_to_get=f"`hf download {spec} {' '.join(FILES)}` "
                               f"or pass a folder holding those two files with --model")
        return cls(folder, thresh=get("thresh", 0.35), general_threshold=get("general_threshold"),
                   character_threshold=get("character_threshold"), undesired_tags=get("undesired_tags", ""),
                   always_first_tags=get("always_first_tags"), caption_separator=get("caption_separator", ", "),
                   remove_underscore=get("remove_underscore", False), use_rating_tags=get("use_rating_tags", False),
                   use_rating_tags_as_last_tag=get("use_rating_tags_as_last_tag", False),
                   character_tags_first=get("character_tags_first", False),
                   character_tag_expand=get("character_tag_expand", False),
                   tag_replacement=get("tag_replacement"), device=get("device", "auto"),
                   threads=get("threads"))

    def scores(self, images) -> np.ndarray:
        batch = np.stack([preprocess(image, self.size) for image in images])
        step = self.model_batch or len(batch)
        outputs = []
        for start in range(0, len(batch), step):
            chunk = batch[start:start + step]
            if self.model_batch and len(chunk) < self.model_batch:  # a fixed-batch model: pad, drop the padding
                chunk = np.concatenate([chunk, np.zeros((self.model_batch - len(chunk), *chunk.shape[1:]),
                                                        dtype=chunk.dtype)])
            outputs.append(self.session.run(None, {self.input_name: chunk})[0][:len(batch) - start])
        return np.concatenate(outputs)

    def tags_of(self, scores) -> list:
        tags, n_ratings, n_general = [], len(self.ratings), len(self.general)
        for i, p in enumerate(scores[n_ratings:]):
            if i < n_general:
                if p >= self.general_threshold and self.general[i] not in self.undesired:
                    tags.append(self.general[i])
            elif i - n_general < len(self.characters) and p >= self.character_threshold:
                tag = self.characters[i - n_general]
                if tag not in self.undesired:
                    tags.insert(0, tag) if self.character_tags_first else tags.append(tag)
        self.tag_frequencies.update(tags)
        if (self.use_rating_first or self.use_rating_last) and n_ratings:
            rating = self.ratings[int(np.argmax(scores[:n_ratings]))]
            if rating not in self.undesired:
                self.tag_frequencies[rating] += 1
                tags.insert(0, rating) if self.use_rating_first else tags.append(rating)
        for tag in self.always_first:
            if tag in tags:
                tags.remove(tag)
                tags.insert(0, tag)
        return tags

    def caption_batch(self, images) -> list:
        return [self.separator.join(self.tags_of(row)) for row in self.scores(images)]
