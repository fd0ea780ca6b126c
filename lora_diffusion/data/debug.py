"""kohya's --debug_dataset without a window: what the first samples of an epoch are, printed (and optionally saved
as images), so captions, buckets, crops, flips and masks can be checked before training."""

from pathlib import Path

import numpy as np
from PIL import Image


def debug_dataset(dataset, n=10, *, epoch=0, step=0, save_dir=None, out=print) -> list[dict]:
    """Print the first `n` samples of `epoch` (at optimizer step `step`, for token_warmup_step): path, caption,
    bucket, original size, crop, flip and mask coverage; with `save_dir`, also write each sample's pixels as
    <index>.png (and its mask as <index>_mask.png). Returns the items. The dataset's epoch and step are put back."""
    saved_epoch, saved_step = dataset.epoch, dataset.step
    dataset.set_epoch(epoch)
    dataset.set_current_step(step)
    items = []
    try:
        out(dataset.summary())
        out(f"first {min(n, len(dataset))} of {len(dataset)} samples of epoch {epoch} (step {step}):")
        for index in range(min(n, len(dataset))):
            item = dataset[index]
            items.append(item)
            mask = item.get("alpha_mask")
            pixels = ("latents " + "x".join(map(str, item["latents"].shape)) if item["image"] is None else
                      "image " + "x".join(map(str, item["image"].shape)))
            out(f"[{index}] {item['path']}{' (regularization)' if item['is_reg'] else ''}\n"
                f"    caption: {item['caption']!r}\n"
                f"    size {item['original_size'][0]}x{item['original_size'][1]} -> bucket "
                f"{item['bucket'][0]}x{item['bucket'][1]}, crop (left, top) {item['crop']}"
                f"{', flipped' if item.get('flipped') else ''}; {pixels}"
                + ("" if mask is None else f"; mask mean {float(mask.mean()):.3f}"))
            if save_dir is not None:
                _save(item, Path(save_dir), index)
    finally:
        dataset.set_epoch(saved_epoch)
        dataset.set_current_step(saved_step)
    return items


def _save(item, folder: Path, index: int):
    folder.mkdir(parents=True, exist_ok=True)
    if item["image"] is not None:
        rgb = ((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{index}.png")
    if item.get("alpha_mask") is not None:
        gray = (item["alpha_mask"].numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(gray, "L").save(folder / f"{index}_mask.png")
