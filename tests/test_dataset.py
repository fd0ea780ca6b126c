"""dataset.py on small generated image sets. Expected values come from formulas written here or from
Pillow / diffusers directly, never from dataset.py itself."""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dataset import BucketBatchSampler, DatasetError, DatasetWarning, LoRADataset, bucket_resolutions, collate_fn

TINY_VAE = Path(__file__).resolve().parents[1] / "lora_diffusion" / "assets" / "tiny-sd" / "vae"


def noise_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def make_folder(folder, sizes, captions=None, ext=".png", seed=0):
    """Images of the given (w, h) named img0.., with optional {index: caption text} files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        noise_image(w, h, seed=seed + i).save(folder / f"img{i}{ext}")
    for i, text in (captions or {}).items():
        (folder / f"img{i}.txt").write_text(text, encoding="utf-8")
    return folder


def to_tensor(img):
    """The expected item pixels for a Pillow image: (3,H,W) float in [-1, 1]."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


# ---------------------------------------------------------------------------------------------- layout

def test_repeats_items_and_metadata(tmp_path):
    make_folder(tmp_path / "train" / "3_sks dog", [(64, 64)] * 4, {0: "a, b", 1: "b, c"})
    make_folder(tmp_path / "train" / "2_cat", [(64, 64)] * 2, {0: "x", 1: "y"})
    with pytest.warns(DatasetWarning, match="have no '.txt' caption"):
        ds = LoRADataset(tmp_path / "train", resolution=64)
    assert len(ds) == 4 * 3 + 2 * 2
    assert ds.num_train_images == 16 and ds.num_reg_images == 0
    assert ds.dataset_dirs == {"3_sks dog": {"n_repeats": 3, "img_count": 4}, "2_cat": {"n_repeats": 2, "img_count": 2}}
    assert ds.tag_frequency["3_sks dog"] == {"a": 1, "b": 2, "c": 1, "sks dog": 2}
    counts = Counter(ds[i]["path"] for i in range(len(ds)))
    assert sorted(counts.values()) == [2, 2, 3, 3, 3, 3]
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["is_reg"] is False and item["bucket"] == (64, 64) and item["latents"] is None
    captions = {Path(ds[i]["path"]).name + "@" + Path(ds[i]["path"]).parent.name: ds[i]["caption"]
                for i in range(len(ds))}
    assert captions["img0.png@3_sks dog"] == "a, b"
    assert captions["img2.png@3_sks dog"] == "sks dog"  # no caption file -> class tokens
    summary = ds.summary()
    for text in ("3_sks dog", "2_cat", "16 samples per epoch", "64x64"):
        assert text in summary


def test_regularization_round_robin(tmp_path):
    make_folder(tmp_path / "train" / "10_sks", [(64, 64)] * 3, {0: "", 1: "", 2: ""})
    make_folder(tmp_path / "reg" / "1_dog", [(64, 64)] * 4, {i: "dog" for i in range(4)})
    ds = LoRADataset(tmp_path / "train", tmp_path / "reg", resolution=64)
    # 30 training samples; the 4 reg images are dealt out one at a time until 30: 8, 8, 7, 7
    reg = Counter(Path(ds[i]["path"]).name for i in range(len(ds)) if ds[i]["is_reg"])
    assert sorted(reg.values(), reverse=True) == [8, 8, 7, 7] and len(ds) == 60
    assert ds.num_reg_images == 4  # kohya's ss_num_reg_images: images x folder repeats


def test_regularization_pool_larger_than_training(tmp_path):
    make_folder(tmp_path / "train" / "1_sks", [(64, 64)] * 3)
    make_folder(tmp_path / "reg" / "20_dog", [(64, 64)] * 4)
    with pytest.warns(DatasetWarning):
        ds = LoRADataset(tmp_path / "train", tmp_path / "reg", resolution=64)
    # kohya: the first pass adds 20 per image and stops once 3 are covered -> one image, 20 samples
    reg = Counter(ds[i]["path"] for i in range(len(ds)) if ds[i]["is_reg"])
    assert list(reg.values()) == [20] and len(ds) == 23


def test_folders_without_prefix_are_skipped(tmp_path):
    make_folder(tmp_path / "train" / "5_ok", [(64, 64)])
    make_folder(tmp_path / "train" / "no_prefix_here", [(64, 64)])
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    with pytest.warns(DatasetWarning, match="no_prefix_here"):
        ds = LoRADataset(tmp_path / "train", resolution=64)
    assert len(ds) == 5


@pytest.mark.parametrize("case", ["missing", "file", "empty", "loose_images", "concept_folder_itself"])
def test_wrong_train_data_dir_says_what_is_expected(tmp_path, case):
    train = tmp_path / "train"
    if case == "file":
        train.write_text("x")
    elif case == "empty":
        train.mkdir()
    elif case == "loose_images":
        make_folder(train, [(64, 64)] * 2)
    elif case == "concept_folder_itself":
        train = make_folder(tmp_path / "train" / "10_dog", [(64, 64)])
    with pytest.raises(DatasetError) as error:
        LoRADataset(train, resolution=64)
    message = str(error.value)
    assert str(train) in message
    if case in ("empty", "loose_images", "concept_folder_itself"):
        assert "PARENT" in message and "10_" in message
    if case == "loose_images":
        assert "2 image(s) directly" in message
    if case == "concept_folder_itself":
        assert f"pass its parent '{tmp_path / 'train'}'" in message


def test_nothing_readable_left(tmp_path):
    folder = tmp_path / "train" / "10_x"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "notes.md").write_text("hi")
    with pytest.warns(DatasetWarning, match="a.png"), pytest.raises(DatasetError) as error:
        LoRADataset(tmp_path / "train", resolution=64)
    assert "no training images found" in str(error.value) and str(folder) in str(error.value)


# ---------------------------------------------------------------------------------------------- captions

def test_caption_files(tmp_path):
    folder = make_folder(tmp_path / "t" / "1_cls tok", [(64, 64)] * 5)
    (folder / "img0.txt").write_bytes("\ufeffcafé, ünïcode\n".encode("utf-8"))  # BOM
    (folder / "img1.txt").write_bytes(b"")  # empty file -> empty caption (unconditional)
    (folder / "img2.txt").write_text("  \n first line \nsecond line\n", encoding="utf-8")
    (folder / "img3.txt").write_text("   ", encoding="utf-8")
    with pytest.warns(DatasetWarning) as record:
        ds = LoRADataset(tmp_path / "t", resolution=64)
    messages = " ".join(str(w.message) for w in record)
    assert "img2.txt" in messages and "1 of 5 image(s)" in messages
    captions = {Path(ds[i]["path"]).stem: ds[i]["caption"] for i in range(len(ds))}
    assert captions == {"img0": "café, ünïcode", "img1": "", "img2": "first line", "img3": "", "img4": "cls tok"}


def test_caption_extension_and_hint(tmp_path):
    folder = make_folder(tmp_path / "t" / "1_", [(64, 64)] * 2)
    (folder / "img0.caption").write_text("from caption file")
    with pytest.warns(DatasetWarning, match=r"\.caption files"):
        ds = LoRADataset(tmp_path / "t", resolution=64)  # default .txt: no caption, no class tokens -> ""
    assert [ds[i]["caption"] for i in range(2)] == ["", ""]
    with pytest.warns(DatasetWarning, match="1 of 2"):
        ds = LoRADataset(tmp_path / "t", resolution=64, caption_extension="caption")  # dot added
    assert ds[0]["caption"] == "from caption file"


def test_non_utf8_caption_is_an_error(tmp_path):
    folder = make_folder(tmp_path / "t" / "1_x", [(64, 64)])
    (folder / "img0.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match="img0.txt.*UTF-8"):
        LoRADataset(tmp_path / "t", resolution=64)


TAGS = "t0, t1, t2, t3, t4, t5, t6, t7"


def tag_dataset(tmp_path, **options):
    make_folder(tmp_path / "t" / "1_x", [(64, 64)], {0: TAGS})
    return LoRADataset(tmp_path / "t", resolution=64, **options)


def test_prefix_suffix(tmp_path):
    ds = tag_dataset(tmp_path, caption_prefix="sks style,", caption_suffix=", high quality")
    assert ds[0]["caption"] == "sks style, " + TAGS + ", high quality"


def test_shuffle_keeps_tokens_and_is_reproducible(tmp_path):
    ds = tag_dataset(tmp_path, shuffle_caption=True, keep_tokens=2, seed=3)
    seen = set()
    for epoch in range(20):
        ds.set_epoch(epoch)
        tags = ds[0]["caption"].split(", ")
        assert tags[:2] == ["t0", "t1"] and sorted(tags) == sorted(TAGS.split(", "))
        seen.add(tuple(tags))
    assert len(seen) > 10  # 6! orders: twenty epochs see many
    ds.set_epoch(7)
    first = ds[0]["caption"]
    again = LoRADataset(tmp_path / "t", resolution=64, shuffle_caption=True, keep_tokens=2, seed=3)
    again.set_epoch(7)
    assert again[0]["caption"] == first
    other_seed = LoRADataset(tmp_path / "t", resolution=64, shuffle_caption=True, keep_tokens=2, seed=4)
    orders = set()
    for epoch in range(5):
        other_seed.set_epoch(epoch)
        ds.set_epoch(epoch)
        orders.add(other_seed[0]["caption"] == ds[0]["caption"])
    assert False in orders


def test_caption_dropout_rate(tmp_path):
    ds = tag_dataset(tmp_path, caption_dropout_rate=0.3, caption_prefix="pre")
    dropped = 0
    for epoch in range(600):
        ds.set_epoch(epoch)
        caption = ds[0]["caption"]
        assert caption in ("", "pre " + TAGS)
        dropped += caption == ""
    # binomial(600, 0.3): mean 180, sd 11.2; +-5 sd
    assert 124 < dropped < 236


def test_tag_dropout(tmp_path):
    ds = tag_dataset(tmp_path, caption_tag_dropout_rate=0.5, keep_tokens=1)
    kept = []
    for epoch in range(200):
        ds.set_epoch(epoch)
        tags = ds[0]["caption"].split(", ")
        assert tags[0] == "t0"
        order = [int(t[1:]) for t in tags]
        assert order == sorted(order)  # dropout alone does not shuffle
        kept.append(len(tags) - 1)
    assert 3.5 * 200 * 0.5 * 0.5 < sum(kept) < 7 * 200 * 0.75  # 7 droppable tags at rate 0.5: mean 3.5
    full = tag_dataset(tmp_path / "b", caption_tag_dropout_rate=1.0, keep_tokens=2)
    assert full[0]["caption"] == "t0, t1"


# ---------------------------------------------------------------------------------------------- images

def single_image_dataset(tmp_path, image, name="img.png", **options):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    image.save(folder / name) if isinstance(image, Image.Image) else (folder / name).write_bytes(image)
    (folder / (Path(name).stem + ".txt")).write_text("c")
    return LoRADataset(tmp_path / "t", **{"resolution": 64, **options})


def test_resize_to_cover_and_center_crop_matches_pillow(tmp_path):
    img = noise_image(150, 100)
    ds = single_image_dataset(tmp_path, img)
    expected = to_tensor(img.resize((96, 64), Image.LANCZOS).crop((16, 0, 80, 64)))
    assert torch.allclose(ds[0]["image"], expected, atol=1e-6)


def test_flip_aug_flips_about_half(tmp_path):
    img = noise_image(64, 64)
    ds = single_image_dataset(tmp_path, img, flip_aug=True)
    plain, mirrored = to_tensor(img), to_tensor(ImageOps.mirror(img))
    flips = 0
    for epoch in range(100):
        ds.set_epoch(epoch)
        x = ds[0]["image"]
        assert torch.equal(x, plain) or torch.equal(x, mirrored)
        flips += torch.equal(x, mirrored)
    assert 25 < flips < 75


def test_random_crop_stays_inside_the_image(tmp_path):
    img = noise_image(128, 64)  # resized to cover 64x64: unchanged height, crop anywhere along 128 px
    ds = single_image_dataset(tmp_path, img, random_crop=True)
    full = to_tensor(img)
    lefts = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        x = ds[0]["image"]
        matches = [left for left in range(65) if torch.equal(full[:, :, left:left + 64], x)]
        assert len(matches) == 1
        lefts.add(matches[0])
    assert len(lefts) > 5


def test_rgba_and_palette_transparency_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 128), (0, 0, 32, 64))
    ds = single_image_dataset(tmp_path / "a", rgba)
    white = Image.new("RGBA", (64, 64), (255, 255, 255, 255))
    expected = to_tensor(Image.alpha_composite(white, rgba))
    assert torch.allclose(ds[0]["image"], expected, atol=1e-6)
    assert torch.allclose(ds[0]["image"][:, 0, 63], torch.ones(3))  # fully transparent -> white

    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 64, 32))
    palette.info["transparency"] = 0
    ds = single_image_dataset(tmp_path / "p", palette)
    x = ds[0]["image"]
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1)
    assert torch.allclose(x[:, 63, 0], torch.ones(3))


def test_grayscale_and_16_bit(tmp_path):
    gray = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L")
    ds = single_image_dataset(tmp_path / "g", gray)
    assert torch.allclose(ds[0]["image"], to_tensor(gray.convert("RGB")), atol=1e-6)

    values = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    ds = single_image_dataset(tmp_path / "16", Image.fromarray(values))
    expected = torch.from_numpy(np.rint(values / 257.0).astype(np.float32)) / 127.5 - 1
    x = ds[0]["image"]
    assert torch.allclose(x[0], expected, atol=1e-6) and torch.equal(x[0], x[2])
    assert x.max() == 1.0 and x.min() == -1.0  # not clipped to white


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation(tmp_path, orientation):
    img = noise_image(96, 64)
    exif = Image.Exif()
    exif[0x0112] = orientation
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    img.save(folder / "photo.JPG", exif=exif, quality=95)
    with pytest.warns(DatasetWarning):
        ds = LoRADataset(tmp_path / "t", resolution=(64, 96) if orientation in (6, 8) else (96, 64))
    upright = ImageOps.exif_transpose(Image.open(folder / "photo.JPG"))
    assert ds[0]["image"].shape[1:] == (upright.height, upright.width)
    assert torch.allclose(ds[0]["image"], to_tensor(upright), atol=1e-6)


@pytest.mark.parametrize("name,mode,options", [("a.JPEG", "CMYK", {}), ("b.webp", "RGB", {}), ("c.tif", "RGB", {}),
                                               ("d.bmp", "1", {}), ("e.GIF", "P", {}), ("f.PNG", "LA", {})])
def test_formats_and_modes(tmp_path, name, mode, options):
    img = noise_image(64, 64).convert(mode)
    ds = single_image_dataset(tmp_path, img, name=name)
    with Image.open(ds[0]["path"]) as reference:
        reference.load()
        if reference.mode in ("LA", "RGBA"):
            white = Image.new("RGBA", reference.size, (255, 255, 255, 255))
            reference = Image.alpha_composite(white, reference.convert("RGBA"))
        expected = to_tensor(reference)
    assert torch.allclose(ds[0]["image"], expected, atol=1e-6)


def test_large_jpeg_draft_decoding_is_close_to_a_full_decode(tmp_path):
    y, x = np.mgrid[0:768, 0:1024]
    smooth = np.stack([x / 4, y / 3, (x + y) / 7], -1).astype(np.uint8)
    ds = single_image_dataset(tmp_path, Image.fromarray(smooth), name="big.jpg", resolution=128)
    full = Image.open(ds[0]["path"]).convert("RGB").resize((171, 128), Image.LANCZOS).crop((21, 0, 149, 128))
    assert (ds[0]["image"] - to_tensor(full)).abs().mean() < 0.01


def test_truncated_image_is_replaced_with_a_warning(tmp_path):
    folder = make_folder(tmp_path / "t" / "1_x", [(64, 64)] * 2, {0: "good", 1: "broken"}, ext=".jpg")
    data = (folder / "img1.jpg").read_bytes()
    (folder / "img1.jpg").write_bytes(data[: len(data) // 3])
    ds = LoRADataset(tmp_path / "t", resolution=64)
    broken = next(i for i in range(len(ds)) if ds.entries[int(ds.sample_entry[i])].path.name == "img1.jpg")
    with pytest.warns(DatasetWarning, match="img1.jpg"):
        item = ds[broken]
    assert item["path"].endswith("img0.jpg") and item["caption"] == "good"


# ---------------------------------------------------------------------------------------------- buckets

def brute_force_buckets(resolution, lo, hi, steps):
    area = resolution * resolution
    sizes = range(steps, hi + 1, steps)
    found = {(resolution // steps * steps,) * 2}
    for w in sizes:
        fits = [h for h in sizes if lo <= h and w * h <= area]
        if w >= lo and fits:
            found |= {(w, max(fits)), (max(fits), w)}
    return sorted(b for b in found if lo <= min(b) and max(b) <= hi)


def test_bucket_list():
    assert bucket_resolutions((512, 512), 256, 1024, 64) == brute_force_buckets(512, 256, 1024, 64)
    assert {(512, 512), (448, 576), (576, 448), (256, 1024), (704, 320)} <= set(bucket_resolutions((512, 512)))
    assert all(w * h <= 512 * 512 for w, h in bucket_resolutions((512, 512)))


def test_images_go_to_the_bucket_of_nearest_aspect_ratio(tmp_path):
    make_folder(tmp_path / "t" / "1_x", [(1000, 500), (500, 500), (300, 900), (640, 480)],
                {i: "" for i in range(4)})
    ds = LoRADataset(tmp_path / "t", resolution=512, enable_bucket=True)
    got = {Path(ds[i]["path"]).stem: ds[i]["bucket"] for i in range(len(ds))}
    # 2:1 -> 704x320 (2.2) beats 640x384 (1.67); 1:3 -> 256x832 (0.31); 4:3 -> 576x448 (1.29)
    assert got == {"img0": (704, 320), "img1": (512, 512), "img2": (256, 832), "img3": (576, 448)}
    for i in range(len(ds)):
        w, h = ds[i]["bucket"]
        assert ds[i]["image"].shape == (3, h, w)


def test_bucket_no_upscale(tmp_path):
    make_folder(tmp_path / "t" / "1_x", [(300, 200), (2000, 1000)], {0: "", 1: ""})
    ds = LoRADataset(tmp_path / "t", resolution=512, enable_bucket=True, bucket_no_upscale=True)
    got = {Path(ds[i]["path"]).stem: ds[i]["bucket"] for i in range(len(ds))}
    s = math.sqrt(512 * 512 / 2_000_000)
    assert got == {"img0": (256, 192), "img1": (int(2000 * s) // 64 * 64, int(1000 * s) // 64 * 64)}


@pytest.mark.parametrize("options,message", [
    ({"resolution": 500}, "resolution.*multiples of 8"),
    ({"resolution": "512,abc"}, "resolution"),
    ({"enable_bucket": True, "min_bucket_reso": 768}, "min_bucket_reso"),
    ({"bucket_reso_steps": 60}, "bucket_reso_steps"),
    ({"caption_dropout_rate": 1.5}, "caption_dropout_rate"),
    ({"keep_tokens": -1}, "keep_tokens"),
])
def test_bad_options_fail_before_scanning(options, message):
    with pytest.raises(DatasetError, match=message):
        LoRADataset("/nonexistent-folder", **options)


def test_resolution_forms(tmp_path):
    make_folder(tmp_path / "t" / "1_x", [(64, 64)], {0: ""})
    for value in ("64,128", (64, 128), [64, 128]):
        assert LoRADataset(tmp_path / "t", resolution=value)[0]["image"].shape == (3, 128, 64)


def bucketed_dataset(tmp_path, **options):
    sizes = [(64, 64)] * 5 + [(128, 64)] * 3 + [(64, 128)] * 4
    make_folder(tmp_path / "t" / "2_x", sizes, {i: f"c{i}" for i in range(len(sizes))})
    return LoRADataset(tmp_path / "t", resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                       bucket_reso_steps=32, **options)


def test_sampler_batches_come_from_one_bucket(tmp_path):
    ds = bucketed_dataset(tmp_path)
    sampler = BucketBatchSampler(ds, batch_size=4, seed=1)
    batches = list(sampler)
    per_bucket = Counter(ds[i]["bucket"] for i in range(len(ds)))
    assert len(batches) == len(sampler) == sum(math.ceil(n / 4) for n in per_bucket.values())
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for batch in batches:
        assert len({ds[i]["bucket"] for i in batch}) == 1
    dropped = BucketBatchSampler(ds, batch_size=4, seed=1, drop_last=True)
    assert len(list(dropped)) == len(dropped) == sum(n // 4 for n in per_bucket.values())
    assert all(len(b) == 4 for b in dropped)


def test_sampler_epochs_and_resume(tmp_path):
    ds = bucketed_dataset(tmp_path)
    sampler = BucketBatchSampler(ds, batch_size=3, seed=5)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    assert ds.epoch == 2
    assert list(sampler) == epoch2  # same epoch, same order
    sampler.set_epoch(3)
    assert list(sampler) != epoch2
    resumed = BucketBatchSampler(ds, batch_size=3, seed=5)
    resumed.set_epoch(2)
    resumed.skip_batches = 4
    assert len(resumed) == len(epoch2) - 4
    assert list(resumed) == epoch2[4:]
    assert list(resumed) == epoch2  # the next pass over that epoch is whole again
    unshuffled = BucketBatchSampler(ds, batch_size=3, shuffle=False, skip_batches=1)
    assert [i for b in unshuffled for i in b] == sorted(
        range(len(ds)), key=lambda i: (ds.sample_buckets[i], i))[3:]


def worker_loader(ds, *, batch_size, workers):
    """(sampler, a DataLoader with persistent worker processes) over `ds`'s bucket batches."""
    sampler = BucketBatchSampler(ds, batch_size=batch_size, seed=0)
    return sampler, torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_fn,
                                                num_workers=workers, persistent_workers=True)


def test_dataloader_with_workers_sees_the_epoch(tmp_path):
    ds = bucketed_dataset(tmp_path, shuffle_caption=True, flip_aug=True, caption_prefix="a, b, c, d")
    sampler, loader = worker_loader(ds, batch_size=4, workers=2)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for batch in loader:
            assert batch["images"].shape[0] == len(batch["captions"]) == len(batch["paths"])
            assert batch["is_reg"].dtype == torch.bool
        # compare the last batch with items made in this process at the same epoch
        last = sampler.batches()[-1]
        expected = collate_fn([ds[i] for i in last])
        assert batch["captions"] == expected["captions"]
        assert torch.equal(batch["images"], expected["images"])


def test_dataset_pickles_and_copies(tmp_path):
    import copy
    import pickle
    ds = bucketed_dataset(tmp_path, shuffle_caption=True, caption_prefix="a, b, c")
    ds.set_epoch(3)
    for clone in (pickle.loads(pickle.dumps(ds)), copy.deepcopy(ds)):
        assert clone.epoch == 3 and len(clone) == len(ds)
        assert clone[5]["caption"] == ds[5]["caption"]
        clone.set_epoch(4)
        assert ds.epoch == 3


def test_collate_rejects_mixed_buckets(tmp_path):
    ds = bucketed_dataset(tmp_path)
    wide = next(i for i in range(len(ds)) if ds[i]["bucket"][0] > ds[i]["bucket"][1])
    with pytest.raises(DatasetError, match="BucketBatchSampler"):
        collate_fn([ds[0], ds[wide]])


# ---------------------------------------------------------------------------------------------- config file

def write_config(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_precedence(tmp_path):
    make_folder(tmp_path / "a", [(64, 64)] * 2, {0: "t0, t1, t2", 1: "t0"})
    make_folder(tmp_path / "b", [(64, 64)] * 3)
    make_folder(tmp_path / "reg", [(64, 64)])
    config = write_config(tmp_path / "data.toml", """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = '.txt'

[[datasets]]
resolution = 64
batch_size = 2
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'a'
  num_repeats = 4

  [[datasets.subsets]]
  image_dir = 'b'
  class_tokens = 'sks b'
  keep_tokens = 3
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = 'reg'
  is_reg = true
  class_tokens = 'person'
""")
    with pytest.warns(DatasetWarning):
        ds = LoRADataset.from_config(config, flip_aug=True, keep_tokens=0, caption_extension=".caption")
    assert ds.batch_size == 2
    assert len(ds) == 2 * 4 + 3 * 2 + 14
    assert [s.keep_tokens for s in ds.subsets] == [2, 3, 2]
    assert all(s.shuffle_caption and s.flip_aug and s.caption_extension == ".txt" for s in ds.subsets)
    assert [s.is_reg for s in ds.subsets] == [False, False, True]
    assert ds.num_reg_images == 1 and ds.dataset_dirs["b"] == {"n_repeats": 2, "img_count": 3}
    b_item = next(ds[i] for i in range(len(ds)) if Path(ds[i]["path"]).parent.name == "b")
    assert b_item["caption"] == "sks b"


@pytest.mark.parametrize("snippet,message", [
    ("[general]\nshufle_caption = true", "unknown key 'shufle_caption'.*shuffle_caption"),
    ("[general]\nimage_dir = 'a'", "'image_dir'.*belongs in \\[\\[datasets.subsets\\]\\]"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 'ten'", "'num_repeats' must be an integer"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nflip_aug = 1", "'flip_aug' must be true or false"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 999999999999",
     "num_repeats must be an integer from 1 to 10000.*999999999999"),
    ("[[datasets]]\nresolution = 'big'\n[[datasets.subsets]]\nimage_dir = 'a'", "resolution"),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 1", "'image_dir' is required"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'missing'", "image_dir 'missing' is not a folder"),
    ("[[datasets]]\nnetwork_multiplier = 0.5\n[[datasets.subsets]]\nimage_dir = 'a'",
     "'network_multiplier'.*not support.*per-dataset LoRA strength"),
    ("[general]\nin_json = 'm.json'", "'in_json' is a command-line flag.*'metadata_file'"),
    ("[datasets]\nx = 1", "\\[\\[datasets\\]\\]"),
    ("[general\n", "cannot be parsed"),
])
def test_config_errors_name_the_key(tmp_path, snippet, message):
    make_folder(tmp_path / "a", [(64, 64)], {0: ""})
    config = write_config(tmp_path / "bad.toml", snippet)
    with pytest.raises(DatasetError, match=message) as error:
        LoRADataset.from_config(config, resolution=64)
    assert "bad.toml" in str(error.value)


@pytest.mark.parametrize("prefix", ["999999999999", "10001", "9" * 240], ids=["12 digits", "limit+1", "240 digits"])
def test_a_huge_repeat_count_is_a_clear_error(tmp_path, prefix):
    make_folder(tmp_path / "t" / f"{prefix}_x", [(64, 64)], {0: "a"})
    with pytest.raises(DatasetError, match=f"folder '.*{prefix[:20]}.*_x' asks for {prefix[:20]}.*the limit is 10000"):
        LoRADataset(tmp_path / "t", resolution=64)


def test_the_largest_repeat_count_is_accepted(tmp_path):
    make_folder(tmp_path / "t" / "10000_x", [(64, 64)], {0: "a"})
    assert len(LoRADataset(tmp_path / "t", resolution=64)) == 10000


def test_config_switched_off_kohya_options_are_accepted(tmp_path):
    make_folder(tmp_path / "a", [(64, 64)], {0: "x"})
    config = write_config(tmp_path / "ok.toml", "[general]\ncache_info = false\n[[datasets]]\nresolution = [64, 64]\n"
                                                "[[datasets.subsets]]\nimage_dir = 'a'\n")
    assert len(LoRADataset.from_config(config)) == 1


# ---------------------------------------------------------------------------------------------- latent cache

def reference_latents(vae, image):
    with torch.no_grad():
        return vae.encode(image[None]).latent_dist.mode()[0] * vae.config.scaling_factor


def test_latents_match_a_direct_encode(tmp_path, vae):
    ds = bucketed_dataset(tmp_path, flip_aug=True)
    ds.cache_latents(vae, batch_size=3)
    assert ds.latents_cached
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in (0, 6, len(ds) - 1):
            item = ds[i]
            assert item["image"] is None
            ds.clear_latent_cache()
            pixels = ds[i]["image"]  # same (seed, epoch, index): same flip decision
            ds.cache_latents(vae)
            assert torch.allclose(item["latents"], reference_latents(vae, pixels), atol=1e-5)
    batch = collate_fn([ds[i] for i in BucketBatchSampler(ds, 4).batches()[0]])
    assert "latents" in batch and batch["latents"].shape[1] == 4


def test_disk_cache_is_reused_and_never_stale(tmp_path, vae):
    folder = make_folder(tmp_path / "t" / "1_x", [(64, 64), (64, 64)], {0: "a", 1: "b"})
    ds = LoRADataset(tmp_path / "t", resolution=64)
    vae.calls = 0
    ds.cache_latents(vae, to_disk=True)
    assert vae.calls == 2
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 2 and all(f.name.startswith(("img0_", "img1_")) for f in files)

    again = LoRADataset(tmp_path / "t", resolution=64)
    vae.calls = 0
    again.cache_latents(vae, to_disk=True)
    assert vae.calls == 0  # served from disk
    assert torch.equal(again[0]["latents"], ds[0]["latents"])

    noise_image(64, 64, seed=99).save(folder / "img0.png")  # the image changes
    changed = LoRADataset(tmp_path / "t", resolution=64)
    vae.calls = 0
    changed.cache_latents(vae, to_disk=True)
    assert vae.calls == 1
    changed.clear_latent_cache()
    pixels = changed[0]["image"]
    changed.cache_latents(vae, to_disk=True)
    assert torch.allclose(changed[0]["latents"], reference_latents(vae, pixels), atol=1e-5)

    bigger = LoRADataset(tmp_path / "t", resolution=128)  # another resolution
    vae.calls = 0
    bigger.cache_latents(vae, to_disk=True)
    assert vae.calls == 2 and bigger[0]["latents"].shape == (4, 16, 16)

    vae.calls = 0
    again.cache_latents(vae, to_disk=True, vae_id="another-vae")  # another VAE identity
    assert vae.calls == 2

    flipped = LoRADataset(tmp_path / "t", resolution=64, flip_aug=True)  # flips need flipped latents
    vae.calls = 0
    flipped.cache_latents(vae, to_disk=True, cache_dir=tmp_path / "cache")
    assert vae.calls == 4 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_vae_fingerprint_changes_with_weights(tmp_path, vae):
    from dataset import vae_fingerprint
    first = vae_fingerprint(vae)
    assert vae_fingerprint(vae) == first
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    try:
        assert vae_fingerprint(vae) != first
    finally:
        with torch.no_grad():
            next(vae.parameters()).sub_(0.01)


def test_disk_cache_key_does_not_depend_on_the_hash_seed(tmp_path):
    """Two runs (processes) with different PYTHONHASHSEED must find each other's cache files."""
    import os
    import subprocess
    import sys
    make_folder(tmp_path / "t" / "1_x", [(64, 64)], {0: "a"})
    script = ("import sys, torch, diffusers\n"
              "from dataset import LoRADataset\n"
              "torch.manual_seed(0)\n"
              f"vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config({str(TINY_VAE)!r}))\n"
              "ds = LoRADataset(sys.argv[1], resolution=64)\n"
              "ds.cache_latents(vae.eval(), to_disk=True, cache_dir=sys.argv[2])\n")
    root = Path(__file__).resolve().parents[1]
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / "t"), str(tmp_path / "cache")], env=env,
                       cwd=root, check=True, capture_output=True)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("damage", ["nan", "inf", "shape", "flipped shape"])
def test_a_damaged_cache_file_is_named_and_encoded_again(tmp_path, vae, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file
    make_folder(tmp_path / "t" / "1_x", [(64, 64)], {0: "a"})
    ds = LoRADataset(tmp_path / "t", resolution=64, flip_aug=True)
    ds.cache_latents(vae, to_disk=True, cache_dir=tmp_path / "cache")
    good = ds._latents[0]
    [path] = (tmp_path / "cache").glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    plain, flipped = good[0].clone(), good[1].clone()
    if damage == "nan":
        plain[0, 0, 0] = float("nan")
    elif damage == "inf":
        flipped[1, 2, 3] = float("inf")
    elif damage == "shape":
        plain = torch.zeros(4, 16, 16)
    else:
        flipped = flipped[:, :4].contiguous()
    save_file({"latents": plain, "latents_flipped": flipped}, str(path), metadata=metadata)  # same key
    again = LoRADataset(tmp_path / "t", resolution=64, flip_aug=True)
    vae.calls = 0
    with pytest.warns(DatasetWarning, match=f"latent cache file '{path}'.*(NaN|shape).*encoding the image again"):
        again.cache_latents(vae, to_disk=True, cache_dir=tmp_path / "cache")
    assert vae.calls == 2  # plain and flipped encoded again
    assert torch.equal(again._latents[0][0], good[0]) and torch.equal(again._latents[0][1], good[1])
    with safe_open(str(path), framework="pt") as f:  # and the file is repaired
        assert torch.equal(f.get_tensor("latents"), good[0])


def test_non_finite_latents_are_never_cached(tmp_path):
    from types import SimpleNamespace

    class OverflowingVAE:  # what an fp16 VAE does on some images
        config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)

        def encode(self, x):
            z = torch.zeros(x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)
            z[-1, 0, 0, 0] = float("inf")
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: z))

    folder = make_folder(tmp_path / "t" / "1_x", [(64, 64)], {0: "a"})
    ds = LoRADataset(tmp_path / "t", resolution=64)
    with pytest.raises(DatasetError, match="img0.png.*NaN or infinite latents"):
        ds.cache_latents(OverflowingVAE(), to_disk=True, vae_id="fp16-vae")
    assert not list(folder.glob("*.safetensors")) and not ds.latents_cached


def test_truncated_jpeg_with_the_latent_cache_is_replaced_with_a_warning(tmp_path, vae):
    folder = make_folder(tmp_path / "t" / "1_x", [(64, 64)] * 3, {0: "good", 1: "broken", 2: "fine"}, ext=".jpg")
    data = (folder / "img1.jpg").read_bytes()
    (folder / "img1.jpg").write_bytes(data[: len(data) // 3])
    ds = LoRADataset(tmp_path / "t", resolution=64)
    with pytest.warns(DatasetWarning, match="img1.jpg"):
        ds.cache_latents(vae, to_disk=True)
    assert sorted(p.name.split("_")[0] for p in folder.glob("*.safetensors")) == ["img0", "img2"]
    items = {Path(ds.entries[int(ds.sample_entry[i])].path).name: ds[i] for i in range(len(ds))}
    assert items["img1.jpg"]["path"].endswith("img2.jpg") and items["img1.jpg"]["caption"] == "fine"
    pixels = torch.from_numpy(np.array(Image.open(folder / "img2.jpg").convert("RGB"), dtype=np.float32))
    expected = reference_latents(vae, pixels.permute(2, 0, 1) / 127.5 - 1)
    assert torch.allclose(items["img1.jpg"]["latents"], expected, atol=1e-5)

    for name in ("img0.jpg", "img2.jpg"):  # when no image of the bucket decodes, the error lists them all
        (folder / name).write_bytes(data[: len(data) // 3])
    with pytest.warns(DatasetWarning):
        ds = LoRADataset(tmp_path / "t", resolution=64)
        with pytest.raises(DatasetError, match="(?s)no image of bucket 64x64.*img0.jpg.*img1.jpg.*img2.jpg"):
            ds.cache_latents(vae)


def test_random_crop_with_cache_is_an_error(tmp_path, vae):
    make_folder(tmp_path / "t" / "1_x", [(64, 64)], {0: ""})
    ds = LoRADataset(tmp_path / "t", resolution=64, random_crop=True)
    with pytest.raises(DatasetError, match="random_crop"):
        ds.cache_latents(vae)
