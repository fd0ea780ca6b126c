"""kohya's image options: color_aug, resize_interpolation and face_crop_aug_range. Expectations come from colorsys,
Pillow's own resize and crop, and kohya's face-crop arithmetic worked out by hand here."""

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import DatasetError, LoRADataset
from lora_diffusion.data.images import hue_shift


def to_tensor(img):
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def one_image(tmp_path, image, name="img.png", **options):
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    image.save(folder / name)
    (folder / (name.rsplit(".", 1)[0] + ".txt")).write_text("c")
    return LoRADataset(tmp_path / "t", **{"resolution": 64, **options})


def colourful(width=64, height=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_hue_shift_matches_colorsys():
    pixels = np.asarray(colourful(16, 16))
    for degrees in (-16.0, 7.5, 16.0):
        got = hue_shift(pixels, degrees)
        for (y, x) in [(0, 0), (3, 5), (8, 8), (15, 2), (11, 14)]:
            h, s, v = colorsys.rgb_to_hsv(*(pixels[y, x] / 255.0))
            expected = np.array(colorsys.hsv_to_rgb((h + degrees / 360.0) % 1.0, s, v)) * 255
            assert np.abs(got[y, x] - expected).max() <= 0.51


def test_color_aug_changes_a_third_of_the_samples_by_hue_or_gamma(tmp_path):
    image = colourful(seed=1)
    ds = one_image(tmp_path, image, color_aug=True)
    original = np.asarray(image, dtype=np.float64)
    kinds = {"same": 0, "hue": 0, "gamma": 0}
    for epoch in range(300):
        ds.set_epoch(epoch)
        got = ((ds[0]["image"].permute(1, 2, 0).numpy() + 1) * 127.5).round()
        if np.array_equal(got, original):
            kinds["same"] += 1
            continue
        # a hue rotation keeps each pixel's largest and smallest channel (value and saturation)
        if (np.abs(got.max(2) - original.max(2)).max() <= 1 and np.abs(got.min(2) - original.min(2)).max() <= 1):
            kinds["hue"] += 1
            continue
        # a gamma: one exponent in [0.95, 1.05] for every pixel
        errors = [np.abs(255 * (original / 255) ** gamma - got).max() for gamma in np.linspace(0.95, 1.05, 201)]
        assert min(errors) <= 0.75  # rounding, and the grid of exponents
        kinds["gamma"] += 1
    # binomial(300, 0.33): mean 99, sd 8.1; +-5 sd; hue and gamma about half each
    assert 58 < kinds["hue"] + kinds["gamma"] < 140
    assert kinds["hue"] > 20 and kinds["gamma"] > 20


def test_color_aug_with_cached_latents_is_an_error(tmp_path):
    ds = one_image(tmp_path, colourful(), color_aug=True)
    assert ds.uncacheable_options == ["color_aug"]
    with pytest.raises(DatasetError, match="color_aug cannot be combined with cached latents"):
        ds.cache_latents(vae=None)
    assert one_image(tmp_path / "b", colourful(), random_crop=True, color_aug=True).uncacheable_options == \
        ["random_crop", "color_aug"]
    assert one_image(tmp_path / "c", colourful(), flip_aug=True).uncacheable_options == []


# kohya's names -> the Pillow filter of the same kind (area: a box average when shrinking, as OpenCV's INTER_AREA)
FILTERS = {"lanczos": Image.LANCZOS, "nearest": Image.NEAREST, "bilinear": Image.BILINEAR,
           "linear": Image.BILINEAR, "bicubic": Image.BICUBIC, "cubic": Image.BICUBIC, "area": Image.BOX,
           "box": Image.BOX}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_resize_interpolation_is_that_filter(tmp_path, name):
    image = colourful(150, 100, seed=2)
    ds = one_image(tmp_path, image, resize_interpolation=name)
    expected = to_tensor(image.resize((96, 64), FILTERS[name]).crop((16, 0, 80, 64)))
    assert torch.allclose(ds[0]["image"], expected, atol=1.01 / 127.5)


def test_resize_interpolation_unset_is_lanczos_and_a_wrong_name_is_refused(tmp_path):
    image = colourful(150, 100, seed=2)
    ds = one_image(tmp_path, image)
    assert torch.allclose(ds[0]["image"], to_tensor(image.resize((96, 64), Image.LANCZOS).crop((16, 0, 80, 64))),
                          atol=1e-6)
    with pytest.raises(DatasetError, match="resize_interpolation must be one of lanczos, nearest.*got 'cubc'"):
        LoRADataset("/nonexistent-folder", resize_interpolation="cubc")


def face_image(face_box, size=(200, 150)):
    """A black image with a white square face at (left, top, right, bottom)."""
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), face_box)
    return image


def test_face_crop_with_a_fixed_range_centres_the_face(tmp_path):
    # face centre (60, 40), 20 px: with range 4,4 the face is 64/4 = 16 px, so the image shrinks by 0.8 to
    # 160x120, the face centre goes to (48, 32), and the 64x64 window starts at (48-32, 32-32) = (16, 0)
    image = face_image((50, 30, 70, 50))
    ds = one_image(tmp_path, image, name="img_60_40_20_20.png", face_crop_aug_range="4.0,4.0")
    expected = to_tensor(image.resize((160, 120), Image.LANCZOS).crop((16, 0, 80, 64)))
    assert torch.allclose(ds[0]["image"], expected, atol=2.01 / 127.5)
    # range 2,2 asks for a 32 px face, more than the image has: never enlarged, the window centred on the face
    same = one_image(tmp_path / "b", image, name="img_60_40_20_20.png", face_crop_aug_range=[2.0, 2.0])
    assert torch.allclose(same[0]["image"], to_tensor(image.crop((28, 8, 92, 72))), atol=1e-6)


def test_face_crop_range_sets_the_face_size(tmp_path):
    image = face_image((50, 30, 70, 50))
    ds = one_image(tmp_path, image, name="img_60_40_20_20.png", face_crop_aug_range=(2.0, 4.0))
    widths = set()
    for epoch in range(30):
        ds.set_epoch(epoch)
        white = (ds[0]["image"].mean(0) > 0).numpy()
        columns, rows = white.any(0).sum(), white.any(1).sum()
        # the face is 64/4 = 16 px at the smallest scale and 20 px (scale 1, never enlarged) at the largest
        assert 16 <= columns <= 21 and 16 <= rows <= 21
        widths.add(int(columns))
    assert len(widths) > 1
    plain = one_image(tmp_path / "p", image, name="img.png", face_crop_aug_range=(2.0, 4.0))
    assert torch.allclose(plain[0]["image"], to_tensor(image.resize((85, 64), Image.LANCZOS).crop((10, 0, 74, 64))),
                          atol=1e-6)  # no face box in the name: the usual resize and centre crop


def test_face_crop_errors(tmp_path):
    with pytest.raises(DatasetError, match="face_crop_aug_range must be 'LOW,HIGH'"):
        LoRADataset("/nonexistent-folder", face_crop_aug_range="2")
    with pytest.raises(DatasetError, match="0 < LOW <= HIGH"):
        LoRADataset("/nonexistent-folder", face_crop_aug_range="4,2")
    with pytest.raises(DatasetError, match="face_crop_aug_range works with buckets off"):
        LoRADataset("/nonexistent-folder", face_crop_aug_range="2,4", enable_bucket=True)
    ds = one_image(tmp_path, face_image((50, 30, 70, 50)), name="img_60_40_20_20.png", face_crop_aug_range="2,4")
    with pytest.raises(DatasetError, match="face_crop_aug_range cannot be combined with cached latents"):
        ds.cache_latents(vae=None)


def test_random_choices_do_not_repeat_across_purposes(tmp_path):
    # the colour draw has its own generator: turning color_aug on leaves flips and crops as they were
    image = colourful(96, 64, seed=4)
    a = one_image(tmp_path / "a", image, flip_aug=True, random_crop=True)
    b = one_image(tmp_path / "b", image, flip_aug=True, random_crop=True, color_aug=True)
    for epoch in range(10):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert a[0]["crop"] == b[0]["crop"]


def test_a_large_jpeg_face_crop_is_decoded_sharp_enough(tmp_path):
    # the face's region (400 px) is what is resized to 64 px: a JPEG decoded at a reduced size must still have
    # that region at 64 px or more (scale 0.16 -> 1/4), not only the whole image (which 1/8 would)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    ds = one_image(tmp_path, image, name="p_800_600_100_100.jpg", face_crop_aug_range="4,4")
    # face 100 px at range 4: scale 64 / 400; the 256x192 image's window starts at (128-32, 96-32) = (96, 64),
    # i.e. the region (600, 400)-(1000, 800) of the full image
    decoded = Image.open(tmp_path / "t" / "1_x" / "p_800_600_100_100.jpg").convert("RGB")
    expected = to_tensor(decoded.crop((600, 400, 1000, 800)).resize((64, 64), Image.LANCZOS))
    assert (ds[0]["image"] - expected).abs().mean() * 127.5 < 4  # 1/8 decoding: about 18


def test_face_crop_images_share_the_caption_of_their_name(tmp_path):
    # kohya's face tool writes several crops of one photo, '<name>_<cx>_<cy>_<w>_<h>', all captioned '<name>.txt'
    folder = tmp_path / "t" / "1_x"
    folder.mkdir(parents=True)
    for name in ("photo_60_40_20_20.png", "photo_10_10_5_5.png", "own_1_2_3_4.png"):
        face_image((50, 30, 70, 50)).save(folder / name)
    (folder / "photo.txt").write_text("shared caption", encoding="utf-8")
    (folder / "own_1_2_3_4.txt").write_text("own caption", encoding="utf-8")
    ds = LoRADataset(tmp_path / "t", resolution=64)
    captions = {ds[i]["path"].rsplit("/", 1)[-1]: ds[i]["caption"] for i in range(len(ds))}
    assert captions == {"photo_60_40_20_20.png": "shared caption", "photo_10_10_5_5.png": "shared caption",
                        "own_1_2_3_4.png": "own caption"}
