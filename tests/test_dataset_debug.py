"""debug_dataset: kohya's --debug_dataset as printed lines (and optional image files), no window."""

import numpy as np
from PIL import Image

from dataset import LoRADataset, debug_dataset


def test_debug_dataset_prints_the_first_samples(tmp_path):
    folder = tmp_path / "t" / "2_x"
    folder.mkdir(parents=True)
    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    (folder / "a.txt").write_text("t0, t1, t2, t3", encoding="utf-8")
    ds = LoRADataset(tmp_path / "t", resolution=64, alpha_mask=True, flip_aug=True, token_warmup_min=1,
                     token_warmup_step=3)
    ds.set_epoch(5)
    ds.set_current_step(2)
    lines = []
    items = debug_dataset(ds, 3, epoch=1, save_dir=tmp_path / "out", out=lines.append)
    text = "\n".join(lines)
    assert len(items) == 2  # only two samples exist
    assert "first 2 of 2 samples of epoch 1 (step 0)" in text
    assert text.count("caption: 't0'") == 2  # step 0 of a 3-step warm-up from 1 tag
    assert "size 96x64 -> bucket 64x64, crop (left, top) (16, 0)" in text
    assert "mask mean 0.502" in text  # alpha 128 / 255
    assert (ds.epoch, ds.step) == (5, 2)  # put back
    saved = np.asarray(Image.open(tmp_path / "out" / "0.png"), dtype=np.float32)
    assert np.abs(saved - ((items[0]["image"].permute(1, 2, 0).numpy() + 1) * 127.5)).max() <= 0.5
    mask = np.asarray(Image.open(tmp_path / "out" / "0_mask.png"))
    assert (mask == 128).all()
