"""Loss masks: kohya's alpha_mask (the image's alpha channel) and conditioning_data_dir (mask images, red
channel). Expectations come from the pixels the test writes: a mask must follow its image through every resize,
crop and flip, so images are made whose pixels equal (or mirror) their mask."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import BucketBatchSampler, DatasetError, LoRADataset, collate_fn

TINY_VAE = Path(__file__).resolve().parents[1] / "lora_diffusion" / "assets" / "tiny-sd" / "vae"


def smooth_noise(width, height, seed):
    """uint8 (h, w) values with structure at several scales, so a misplaced crop shows."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, height // 8), max(2, width // 8)), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.BILINEAR))


def black_rgba(width, height, seed):
    """A black image whose alpha is smooth noise: composited on white its pixels are 255 - alpha."""
    alpha = smooth_noise(width, height, seed)
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    return Image.fromarray(rgba, "RGBA"), alpha


def pixels(item):
    """An item's image as 0-255 gray values (h, w)."""
    return ((item["image"] + 1) * 127.5).mean(0)


def test_alpha_mask_is_the_alpha_channel_at_the_image_size(tmp_path):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    image, alpha = black_rgba(64, 64, seed=1)
    image.save(folder / "a.png")
    ds = LoRADataset(tmp_path / "t", resolution=64, alpha_mask=True, flip_aug=True)
    assert ds.has_masks
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        flipped = torch.allclose(pixels(item), torch.from_numpy(255.0 - alpha[:, ::-1].astype(np.float32)), atol=0.01)
        expected = (alpha[:, ::-1] if flipped else alpha).astype(np.float32) / 255
        assert torch.equal(item["alpha_mask"], torch.from_numpy(expected.copy()))
        seen.add(flipped)
    assert seen == {True, False}


def test_alpha_mask_follows_resize_crop_and_flip(tmp_path):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    for i, size in enumerate([(150, 100), (90, 160), (200, 200)]):
        black_rgba(*size, seed=i)[0].save(folder / f"a{i}.png")
    ds = LoRADataset(tmp_path / "t", resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                     bucket_reso_steps=32, alpha_mask=True, flip_aug=True, random_crop=True)
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            mask = item["alpha_mask"]
            assert mask.shape == item["image"].shape[1:] and mask.dtype == torch.float32
            assert 0 <= mask.min() and mask.max() <= 1
            # composited on white, a black pixel of alpha a shows 255 - a; filters commute with that map (the
            # image is rounded twice: composite and resize; a misplaced window is off by tens)
            assert (mask * 255 - (255 - pixels(item))).abs().max() <= 1.6


def test_alpha_mask_of_an_opaque_image_is_all_ones(tmp_path):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    Image.new("RGB", (80, 64), (10, 20, 30)).save(folder / "a.jpg")
    item = LoRADataset(tmp_path / "t", resolution=64, alpha_mask=True)[0]
    assert torch.equal(item["alpha_mask"], torch.ones(64, 64))


def mask_folders(tmp_path, sizes, mask_sizes=None):
    """Gray images and mask images (red = the image's gray; green and blue noise, to show only red counts)."""
    images, masks = tmp_path / "img", tmp_path / "mask"
    images.mkdir()
    masks.mkdir()
    for i, size in enumerate(sizes):
        gray = smooth_noise(*size, seed=10 + i)
        Image.fromarray(gray, "L").save(images / f"p{i}.png")
        mask_size = (mask_sizes or sizes)[i]
        red = gray if mask_size == size else smooth_noise(*mask_size, seed=99)
        noise = np.random.default_rng(i).integers(0, 256, red.shape + (2,), dtype=np.uint8)
        Image.fromarray(np.dstack([red, noise]), "RGB").save(masks / f"p{i}.webp", lossless=True)
    return images, masks


def config_with_masks(tmp_path, images, masks, extra=""):
    path = tmp_path / "data.toml"
    path.write_text(f"[[datasets]]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\n"
                    f"max_bucket_reso = 128\nbucket_reso_steps = 32\n{extra}\n[[datasets.subsets]]\n"
                    f"image_dir = '{images.name}'\nconditioning_data_dir = '{masks.name}'\n", encoding="utf-8")
    return path


def test_conditioning_masks_follow_their_images(tmp_path):
    images, masks = mask_folders(tmp_path, [(150, 100), (64, 64), (96, 200)])
    ds = LoRADataset.from_config(config_with_masks(tmp_path, images, masks, "flip_aug = true\nrandom_crop = true"))
    assert ds.has_masks
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            # the image is resized in Pillow's 8-bit fixed point, the mask in float: about 1 apart, a misplaced
            # window tens
            assert (item["alpha_mask"] * 255 - pixels(item)).abs().max() <= 1.5
    exact = LoRADataset.from_config(config_with_masks(tmp_path, images, masks))
    item = next(exact[i] for i in range(len(exact)) if exact[i]["path"].endswith("p1.png"))
    gray = np.asarray(Image.open(images / "p1.png"), dtype=np.float32)
    assert torch.equal(item["alpha_mask"], torch.from_numpy(gray / 255))  # 64x64 at 64x64: no resampling


@pytest.mark.parametrize("case,message", [
    ("missing", "has no mask for 1 image.*p2.png"),
    ("extra", "masks without an image.*stray.png"),
    ("size", "mask image '.*p0.webp' is 70x100, its image '.*p0.png' is 150x100"),
])
def test_mask_folder_errors_name_the_files(tmp_path, case, message):
    images, masks = mask_folders(tmp_path, [(150, 100), (64, 64), (96, 200)],
                                 [(70, 100), (64, 64), (96, 200)] if case == "size" else None)
    if case == "missing":
        (masks / "p2.webp").unlink()
    if case == "extra":
        Image.new("L", (8, 8)).save(masks / "stray.png")
    with pytest.raises(DatasetError, match=message):
        LoRADataset.from_config(config_with_masks(tmp_path, images, masks))


def test_alpha_mask_and_conditioning_masks_are_one_or_the_other(tmp_path):
    images, masks = mask_folders(tmp_path, [(64, 64)])
    with pytest.raises(DatasetError, match="alpha_mask and conditioning_data_dir"):
        LoRADataset.from_config(config_with_masks(tmp_path, images, masks, "alpha_mask = true"))


def test_collate_gives_masks_only_when_some_item_has_one(tmp_path):
    with_mask, without = tmp_path / "m", tmp_path / "n"
    with_mask.mkdir()
    without.mkdir()
    black_rgba(64, 64, seed=3)[0].save(with_mask / "a.png")
    Image.new("RGB", (64, 64)).save(without / "b.png")
    config = tmp_path / "c.toml"
    config.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'm'\nalpha_mask = true\n"
                      "[[datasets.subsets]]\nimage_dir = 'n'\n", encoding="utf-8")
    ds = LoRADataset.from_config(config)
    items = [ds[i] for i in range(len(ds))]
    masked = next(item for item in items if item["path"].endswith("a.png"))
    plain = next(item for item in items if item["path"].endswith("b.png"))
    assert plain["alpha_mask"] is None
    batch = collate_fn([masked, plain])
    alpha = np.asarray(Image.open(with_mask / "a.png").getchannel("A"), dtype=np.float32) / 255
    assert batch["alpha_masks"].shape == (2, 64, 64)
    assert torch.equal(batch["alpha_masks"][0], torch.from_numpy(alpha))
    assert torch.equal(batch["alpha_masks"][1], torch.ones(64, 64))  # kohya: no mask learns everywhere
    assert "alpha_masks" not in collate_fn([plain, plain])
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(folder / "c.png")
    assert not LoRADataset(tmp_path / "t", resolution=64).has_masks


def test_masks_are_cached_with_the_latents(tmp_path, vae):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    image, alpha = black_rgba(64, 64, seed=5)
    image.save(folder / "a.png")
    options = dict(resolution=64, alpha_mask=True, flip_aug=True)
    ds = LoRADataset(tmp_path / "t", **options)
    ds.cache_latents(vae, to_disk=True)
    expected = torch.from_numpy(alpha.astype(np.float32) / 255)
    latents = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["image"] is None
        is_flipped = torch.equal(item["alpha_mask"], expected.flip(-1))
        assert is_flipped or torch.equal(item["alpha_mask"], expected)
        latents.add((is_flipped, item["latents"].sum().item()))
    assert len(latents) == 2 and len({f for f, _ in latents}) == 2  # a mirrored mask goes with mirrored latents
    assert collate_fn([ds[0], ds[0]])["alpha_masks"].shape == (2, 64, 64)
    files = list(folder.glob("a_*.safetensors"))
    assert len(files) == 1
    from safetensors.torch import load_file
    assert torch.equal(load_file(files[0])["alpha_mask"], torch.from_numpy(alpha))  # stored as bytes

    calls = vae.calls
    again = LoRADataset(tmp_path / "t", **options)
    again.cache_latents(vae, to_disk=True)
    assert vae.calls == calls  # read back, mask included
    assert torch.equal(again[0]["alpha_mask"] if not torch.equal(again[0]["alpha_mask"], expected.flip(-1))
                       else again[0]["alpha_mask"].flip(-1), expected)
    plain = LoRADataset(tmp_path / "t", resolution=64, flip_aug=True)
    plain.cache_latents(vae, to_disk=True)
    assert vae.calls == calls + 2 and plain[0]["alpha_mask"] is None  # no mask: another key, another file
    assert len(list(folder.glob("a_*.safetensors"))) == 2


def test_a_changed_mask_file_is_never_served_from_the_cache(tmp_path, vae):
    images, masks = mask_folders(tmp_path, [(64, 64)])
    config = tmp_path / "c.toml"
    config.write_text("[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'img'\n"
                      "conditioning_data_dir = 'mask'\n", encoding="utf-8")
    ds = LoRADataset.from_config(config)
    ds.cache_latents(vae, to_disk=True)
    gray = np.asarray(Image.open(images / "p0.png"), dtype=np.float32)
    assert torch.equal(ds[0]["alpha_mask"], torch.from_numpy(gray / 255))
    Image.new("RGB", (64, 64), (255, 0, 0)).save(masks / "p0.webp", lossless=True)
    again = LoRADataset.from_config(config)
    again.cache_latents(vae, to_disk=True)
    assert torch.equal(again[0]["alpha_mask"], torch.ones(64, 64))


def test_sampler_and_masks_in_a_dataloader(tmp_path):
    images, masks = mask_folders(tmp_path, [(150, 100), (64, 64), (100, 150), (64, 64)])
    ds = LoRADataset.from_config(config_with_masks(tmp_path, images, masks))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=BucketBatchSampler(ds, 2), collate_fn=collate_fn)
    for batch in loader:
        images_gray = ((batch["images"] + 1) * 127.5).mean(1)
        assert batch["alpha_masks"].shape == images_gray.shape
        assert (batch["alpha_masks"] * 255 - images_gray).abs().max() <= 1.5


def test_a_jpeg_mask_is_decoded_at_the_size_its_image_needs(tmp_path):
    # a JPEG mask may be decoded at 1/2..1/8 size only while that still covers the bucket, as a JPEG image is
    images, masks = tmp_path / "img", tmp_path / "mask"
    images.mkdir()
    masks.mkdir()
    gray = smooth_noise(800, 600, seed=7)
    Image.fromarray(gray, "L").save(images / "p.png")
    Image.fromarray(gray, "L").convert("RGB").save(masks / "p.jpg", quality=98)
    config = tmp_path / "c.toml"
    config.write_text("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = 'img'\n"
                      "conditioning_data_dir = 'mask'\n", encoding="utf-8")
    item = LoRADataset.from_config(config)[0]
    assert (item["alpha_mask"] * 255 - pixels(item)).abs().mean() < 2  # decoded at 1/8: about 40


def test_conditioning_data_dir_flag_is_the_parent_of_mask_folders_named_as_the_concepts(tmp_path):
    """kohya's --conditioning_data_dir: train/10_x/ finds its masks in masks/10_x/; reg images have none."""
    images, masks = mask_folders(tmp_path, [(64, 64), (96, 64)])
    (tmp_path / "train").mkdir()
    (tmp_path / "cond").mkdir()
    images.rename(tmp_path / "train" / "2_x")
    masks.rename(tmp_path / "cond" / "2_x")
    reg = tmp_path / "reg" / "1_y"
    reg.mkdir(parents=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(reg / "r.png")
    ds = LoRADataset(tmp_path / "train", tmp_path / "reg", resolution=64, conditioning_data_dir=tmp_path / "cond")
    assert ds.has_masks
    for i in range(len(ds)):
        item = ds[i]
        if item["path"].endswith("r.png"):
            assert item["alpha_mask"] is None  # collate_fn gives it a mask of ones
        elif item["path"].endswith("p0.png"):  # 64x64 at 64x64: the mask is the image's own gray, exactly
            gray = np.asarray(Image.open(tmp_path / "train" / "2_x" / "p0.png"), dtype=np.float32)
            assert torch.equal(item["alpha_mask"], torch.from_numpy(gray / 255))
    (tmp_path / "cond" / "2_x").rename(tmp_path / "cond" / "2_z")
    with pytest.raises(DatasetError, match=r"--conditioning_data_dir .*cond' has no mask folder for 2_x"):
        LoRADataset(tmp_path / "train", resolution=64, conditioning_data_dir=tmp_path / "cond")
