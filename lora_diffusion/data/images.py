"""Reading training images: EXIF orientation, colour modes, resize and crop (which files are images: files.py)."""

import math
import random

import numpy as np
import torch
from PIL import Image

from lora_diffusion.data.buckets import cover_size

_EXIF_ORIENTATION = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                              8: Image.Transpose.ROTATE_90}


def _orientation(img) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not cost the image
        return 1
    return value if value in _TRANSPOSE_FOR_ORIENTATION else 1


def image_size(path):
    """(width, height) as displayed (EXIF orientation applied), reading only the header."""
    with Image.open(path) as img:
        width, height = img.size
        return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)


def _to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(img, dtype=np.float64 if img.mode == "F" else np.int64)
        if img.mode != "F":  # 16-bit samples: keep the top 8 bits instead of clipping at 255
            array = array / 257.0
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # transparent pixels become white, not whatever colour happens to be stored under them
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def center_crop(image_size, bucket, *, flip=False):
    """(left, top) of the bucket's window in the image resized to cover it (`image_size` (w, h) as displayed), as
    load_image crops without `crop_rng`; with `flip`, the window's left in the mirrored image. The SDXL trainer
    passes these as the U-Net's crop coordinates."""
    resized_w, resized_h = cover_size(image_size, bucket)
    left, top = (resized_w - bucket[0]) // 2, (resized_h - bucket[1]) // 2
    return (resized_w - bucket[0] - left if flip else left), top


def load_image(path, bucket, *, crop_rng: random.Random | None = None, flip=False, return_crop=False):
    """Decode `path`, resize it to cover `bucket` (w, h) and crop (center, or random with `crop_rng`).
    Returns a float32 tensor (3, h, w) in [-1, 1]; with `return_crop`, (tensor, (left, top)): the crop's offset in
    the resized image (flipped: in the mirrored one), what SDXL's crop conditioning takes."""
    bucket_w, bucket_h = bucket
    with Image.open(path) as img:
        orientation = _orientation(img)
        swap = orientation in (5, 6, 7, 8)
        shown_w, shown_h = (img.height, img.width) if swap else img.size
        scale = max(bucket_w / shown_w, bucket_h / shown_h)
        if img.format == "JPEG" and scale < 1:
            # decode at 1/2, 1/4 or 1/8 size straight from the DCT, never below what the resize needs
            need = (math.ceil(shown_w * scale), math.ceil(shown_h * scale))
            img.draft(img.mode, (need[1], need[0]) if swap else need)
        img.load()
        if orientation != 1:
            img = img.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
        img = _to_rgb(img)
        resized_w, resized_h = cover_size(img.size, bucket)
        if crop_rng is not None:
            left, top = crop_rng.randint(0, resized_w - bucket_w), crop_rng.randint(0, resized_h - bucket_h)
        else:
            left, top = (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2
        if crop_rng is None:  # the displayed size's, also for a JPEG decoded at a reduced size (as the latent cache)
            crop = center_crop((shown_w, shown_h), bucket, flip=flip)
        else:
            crop = (max(0, resized_w - bucket_w - left) if flip else left, top)
        # resize only the cropped region: one resampling pass, same pixels as resize-then-crop
        sx, sy = img.width / resized_w, img.height / resized_h
        box = (left * sx, top * sy, (left + bucket_w) * sx, (top + bucket_h) * sy)
        if img.size != (bucket_w, bucket_h) or box != (0, 0, bucket_w, bucket_h):
            img = img.resize((bucket_w, bucket_h), Image.Resampling.LANCZOS, box=box)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(img)  # (h, w, 3) uint8
    out = torch.empty((3, bucket_h, bucket_w), dtype=torch.float32)
    out_np = out.numpy()
    np.divide(pixels.transpose(2, 0, 1), np.float32(127.5), out=out_np, dtype=np.float32, casting="unsafe")
    out_np -= 1.0
    return (out, crop) if return_crop else out
