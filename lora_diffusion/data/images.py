"""Reading training images: EXIF orientation, colour modes, resize and crop (which files are images: files.py)."""

import math
import random

import numpy as np
import torch
from PIL import Image

from .buckets import cover_size
from .errors import DatasetError

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


# kohya's --resize_interpolation names -> Pillow filters (kohya resizes with OpenCV except for lanczos and box; the
# filters are the same in kind, the pixels differ slightly). area is a box average when shrinking, as OpenCV's.
_FILTERS = {None: Image.Resampling.LANCZOS, "lanczos": Image.Resampling.LANCZOS,
            "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "cubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX, "box": Image.Resampling.BOX}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(path, bucket, *, crop_rng: random.Random | None = None, flip=False, return_crop=False,
               interpolation=None):
    """Decode `path`, resize it to cover `bucket` (w, h) and crop (center, or random with `crop_rng`).
    Returns a float32 tensor (3, h, w) in [-1, 1]; with `return_crop`, (tensor, (left, top)): the crop's offset in
    the resized image (flipped: in the mirrored one), what SDXL's crop conditioning takes."""
    image, crop, _ = load_example(path, bucket, crop_rng=crop_rng, flip=flip, interpolation=interpolation)
    return (image, crop) if return_crop else image


def _open_oriented(path, bucket, region=None):
    """The decoded image as displayed (EXIF orientation applied); a large JPEG decoded at a reduced size when that
    still covers the bucket with the `region` (w, h) of the displayed image that is used (default: all of it).
    Returns (image, displayed (w, h))."""
    with Image.open(path) as img:
        orientation = _orientation(img)
        swap = orientation in (5, 6, 7, 8)
        shown_w, shown_h = (img.height, img.width) if swap else img.size
        used_w, used_h = region or (shown_w, shown_h)
        scale = max(bucket[0] / used_w, bucket[1] / used_h)
        if img.format == "JPEG" and scale < 1:
            # decode at 1/2, 1/4 or 1/8 size straight from the DCT, never below what the resize needs
            need = (math.ceil(shown_w * scale), math.ceil(shown_h * scale))
            img.draft(img.mode, (need[1], need[0]) if swap else need)
        img.load()
        if orientation != 1:
            img = img.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
        return img, (shown_w, shown_h)


def _mask_band(img):
    """A mask file's red channel (kohya reads masks as RGB and takes R) as a float image in [0, 1]."""
    if img.mode in ("L", "1", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA", "La", "RGBa"):
        band = img.convert("RGB").getchannel("R")
        return band.convert("F").point(lambda v: v / 255.0)
    array = np.asarray(img, dtype=np.float64)  # 16-bit and float modes
    return Image.fromarray((array / (65535.0 if img.mode.startswith("I;16") else 255.0)).astype(np.float32), "F")


def load_example(path, bucket, *, crop_rng=None, flip=False, interpolation=None, color_rng=None, mask=None,
                 crop_box=None):
    """load_image's work plus a loss mask and colour augmentation: returns (image (3, h, w) in [-1, 1],
    (left, top), mask (h, w) in [0, 1] or None). `mask`: None, "alpha" (the image's alpha channel; all ones without
    one) or the path of a mask image of the same displayed size (its red channel). The mask gets the image's
    resize, crop and flip. `color_rng`: kohya's color_aug drawn from it. `crop_box`: (left, top, right, bottom) of
    the region of the displayed image to use instead of the whole (face_crop_aug_range)."""
    bucket_w, bucket_h = bucket
    region_wh = None if crop_box is None else (crop_box[2] - crop_box[0], crop_box[3] - crop_box[1])
    img, shown = _open_oriented(path, bucket, region_wh)
    alpha = None
    if mask == "alpha":
        has_alpha = img.mode in _ALPHA_MODES or "transparency" in img.info
        alpha = img.convert("RGBA").getchannel("A").convert("F").point(lambda v: v / 255.0) if has_alpha else None
    img = _to_rgb(img)
    region = (0, 0) + tuple(shown) if crop_box is None else crop_box
    region_size = (region[2] - region[0], region[3] - region[1])
    resized_w, resized_h = cover_size(region_size, bucket)
    if crop_rng is not None:
        left, top = crop_rng.randint(0, resized_w - bucket_w), crop_rng.randint(0, resized_h - bucket_h)
    else:
        left, top = (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2
    if crop_rng is None and crop_box is None:  # the displayed size's, also for a JPEG decoded at a reduced size
        crop = center_crop(shown, bucket, flip=flip)
    else:
        crop = (max(0, resized_w - bucket_w - left) if flip else left, top)
    resample = _FILTERS[interpolation]

    def window(picture):
        """The bucket's window of `picture` (any size showing the displayed image), resized in one pass."""
        sx, sy = picture.width / shown[0], picture.height / shown[1]
        fx, fy = region_size[0] / resized_w, region_size[1] / resized_h
        box = ((region[0] + left * fx) * sx, (region[1] + top * fy) * sy,
               (region[0] + (left + bucket_w) * fx) * sx, (region[1] + (top + bucket_h) * fy) * sy)
        if picture.size != (bucket_w, bucket_h) or box != (0, 0, bucket_w, bucket_h):
            picture = picture.resize((bucket_w, bucket_h), resample, box=box)
        return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else picture

    pixels = np.asarray(window(img))  # (h, w, 3) uint8
    if color_rng is not None:
        pixels = color_augment(pixels, color_rng)
    out = torch.empty((3, bucket_h, bucket_w), dtype=torch.float32)
    out_np = out.numpy()
    np.divide(pixels.transpose(2, 0, 1), np.float32(127.5), out=out_np, dtype=np.float32, casting="unsafe")
    out_np -= 1.0
    if mask is None:
        return out, crop, None
    if mask == "alpha":
        if alpha is None:
            return out, crop, torch.ones((bucket_h, bucket_w), dtype=torch.float32)
        band = alpha
    else:
        mask_img, mask_shown = _open_oriented(mask, bucket, region_wh)  # a JPEG mask: no coarser than the image
        if mask_shown != tuple(shown):
            raise DatasetError(f"mask image '{mask}' is {mask_shown[0]}x{mask_shown[1]}, its image '{path}' is "
                               f"{shown[0]}x{shown[1]}: a mask must have its image's size")
        band = _mask_band(mask_img)
    values = np.asarray(window(band), dtype=np.float32)
    return out, crop, torch.from_numpy(np.clip(values, 0.0, 1.0))


def color_augment(pixels, rng: random.Random):
    """kohya's color_aug: on a third of the samples, half the time a hue shift of up to 8 OpenCV hue units (16
    degrees) either way, else a gamma in [0.95, 1.05]. kohya raises the 0-255 values themselves to the gamma (a
    change of up to 30 %, not a weak one); here the gamma acts on values scaled to [0, 1], as the
    albumentations RandomGamma it replaced did."""
    if rng.random() > 0.33:
        return pixels
    if rng.random() > 0.5:
        return hue_shift(pixels, rng.uniform(-8, 8) * 2.0)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(np.rint(255.0 * (pixels / 255.0) ** gamma), 0, 255).astype(np.uint8)


def hue_shift(pixels, degrees):
    """Rotate the hue of (h, w, 3) uint8 RGB pixels by `degrees` (saturation and value kept)."""
    rgb = pixels.astype(np.float64) / 255.0
    value = rgb.max(axis=2)
    chroma = value - rgb.min(axis=2)
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(value == r, ((g - b) / safe) % 6, np.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.where(chroma > 0, (hue + degrees / 60.0) % 6, 0.0)
    # back from hue, chroma and value: each channel's distance from the hue sector
    out = np.empty_like(rgb)
    for channel, n in enumerate((5, 3, 1)):
        k = (n + hue) % 6
        out[..., channel] = value - chroma * np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def face_crop_box(size, face, target, face_range, rng: random.Random, random_crop=False):
    """kohya's face_crop_aug_range (buckets off): the region of the displayed image (w, h) `size` to resize to
    `target` (w, h) so that the face (cx, cy, w, h) fills 1/HIGH to 1/LOW of the target's shorter side, centred on
    the face (with random_crop: shifted at random, keeping some background). Never shrinks the image below the
    target; kohya refuses an image smaller than the target, which is enlarged here."""
    (width, height), (face_cx, face_cy, face_w, face_h), (target_w, target_h) = size, face, target
    face_size, short = max(face_w, face_h), min(target_w, target_h)
    cover = max(target_w / width, target_h / height)
    limit = max(1.0, cover)  # no enlarging beyond what covering the target needs
    low_scale = min(limit, max(cover, short / (face_size * face_range[1])))
    high_scale = min(limit, max(low_scale, short / (face_size * face_range[0])))
    scale = low_scale if low_scale >= high_scale else rng.uniform(low_scale, high_scale)
    scaled = (max(target_w, int(width * scale + 0.5)), max(target_h, int(height * scale + 0.5)))
    sx, sy = scaled[0] / width, scaled[1] / height
    start = []
    for target_side, length, centre in ((target_w, scaled[0], int(face_cx * sx + 0.5)),
                                         (target_h, scaled[1], int(face_cy * sy + 0.5))):
        p = centre - target_side // 2
        if random_crop:  # two draws: near the face more often than far from it
            spread = max(length - centre, centre)
            p += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif face_range[0] != face_range[1] and face_size > short // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, face_size // 20)
        start.append(max(0, min(p, length - target_side)))
    left, top = start
    return (left / sx, top / sy, (left + target_w) / sx, (top + target_h) / sy)
