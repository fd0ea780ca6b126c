"""Captioners for training images, one module each, and the one table of them (like core/adapters/).

    wd14      WD14 / wd-v3 taggers (ONNX + selected_tags.csv, onnxruntime), kohya's options    wd14.py
    kosmos2   Kosmos-2 (transformers), grounding prompt, entities and boxes stripped          kosmos2.py
    blip      BLIP and BLIP-2 (transformers), optional text prefix                            blip.py
    florence2 Florence-2 (transformers), <CAPTION> / <DETAILED_CAPTION> / <MORE_DETAILED_CAPTION>  florence2.py
    vlm       a Qwen2-VL / Qwen2.5-VL-class image-text-to-text model with a user prompt       vlm.py
    world     the shapes world's own captioner (builtin:mini images), sentence or tags        world.py

`captioner(name, options)` builds one; `caption_images(captioner, paths, ...)` captions files (base.py). The
modules are imported only when asked for, so a missing extra stops only the captioner that needs it.
"""

import importlib

from .base import (  # noqa: F401
    Captioner,
    CaptionError,
    CaptionReport,
    caption_images,
    caption_path,
    find_images,
    load_image,
    require,
    resolve_model,
)

CAPTIONERS = {  # name -> (module, class, default model)
    "wd14": ("wd14", "WD14Tagger", "SmilingWolf/wd-v1-4-convnext-tagger-v2"),
    "kosmos2": ("kosmos2", "Kosmos2Captioner", "microsoft/kosmos-2-patch14-224"),
    "blip": ("blip", "BlipCaptioner", "Salesforce/blip-image-captioning-large"),
    "florence2": ("florence2", "Florence2Captioner", "florence-community/Florence-2-large"),
    "vlm": ("vlm", "VLMCaptioner", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "world": ("world", "WorldCaptioner", None),
}


def names() -> list:
    return list(CAPTIONERS)


def captioner_class(name):
    if name not in CAPTIONERS:
        raise CaptionError(f"--captioner {name!r} is not one of {', '.join(CAPTIONERS)}")
    module, cls, _ = CAPTIONERS[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def default_model(name):
    return CAPTIONERS[name][2] if name in CAPTIONERS else None


def captioner(name, options):
    """The captioner `name` built from `options` (caption.py's flags as an object; missing ones take defaults)."""
    return captioner_class(name).from_options(options)
