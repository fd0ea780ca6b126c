"""The wd14 captioner against an independent reimplementation of kohya's tag_images_by_wd14_tagger.py (its --onnx
path for SmilingWolf's models): a small ONNX tagger built here with its selected_tags.csv; the expected tags come
from numpy (the tagger's own weights, not onnxruntime) after kohya's preprocessing rewritten here."""

import csv
import math
import sys

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lora_diffusion import cli  # noqa: E402
from lora_diffusion.captioning import wd14  # noqa: E402

SIZE = 448
POOL = 56  # 448 / 56 = 8x8 cells per channel: 192 features
RATINGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL = ["1girl", "solo", "long_hair", "^_^", "red_eyes", "outdoors", "sky", "no_humans", "animal_focus", "tree",
           "short_hair", "smile", "open_mouth", "grass", "day", "simple_background", "white_background", "horse",
           "fence", "running"]
CHARACTERS = ["hatsune_miku_(vocaloid)", "kizuna_ai", "rem_(maid)_(re:zero)", "saber"]


def build_tagger(folder, seed=0, batch=None):
    """model.onnx: NHWC BGR 0-255 -> NCHW -> 56x56 average pool -> 192 features / 255 - 0.5 -> linear -> sigmoid;
    and its selected_tags.csv. Returns (W, b) for the numpy reference."""
    rng = np.random.default_rng(seed)
    n = len(RATINGS) + len(GENERAL) + len(CHARACTERS)
    weight = rng.normal(0, 3.0, (3 * 8 * 8, n)).astype(np.float32)
    bias = rng.normal(-0.3, 0.8, n).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[POOL, POOL], strides=[POOL, POOL]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Div", ["flat", "c255"], ["unit"]),
        helper.make_node("Sub", ["unit", "half"], ["centred"]),
        helper.make_node("MatMul", ["centred", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array(255, np.float32), "c255"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    inputs = [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch or "N", SIZE, SIZE, 3])]
    outputs = [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch or "N", n])]
    graph = helper.make_graph(nodes, "tiny_wd14", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate([(t, 9) for t in RATINGS] + [(t, 0) for t in GENERAL]
                                        + [(t, 4) for t in CHARACTERS]):
            out.writerow([1000 + i, name, cat, 10 * i])
    return weight, bias


# --- kohya's preprocessing, rewritten (finetune/tag_images_by_wd14_tagger.py preprocess_image and
# --- library/utils.py resize_image: INTER_AREA when shrinking, PIL Lanczos when growing)

def area_by_integral(a, n_out, axis):
    """Area average along `axis` from the cumulative sum sampled at fractional edges (cv2's INTER_AREA)."""
    a = np.moveaxis(a.astype(np.float64), axis, 0)
    n_in = a.shape[0]
    cum = np.concatenate([np.zeros_like(a[:1]), np.cumsum(a, axis=0)])

    def integral(x):  # sum of a over [0, x)
        k = min(int(math.floor(x)), n_in - 1)
        return cum[k] + (x - k) * a[k]

    edges = [i * n_in / n_out for i in range(n_out + 1)]
    out = np.stack([(integral(edges[i + 1]) - integral(edges[i])) / (n_in / n_out) for i in range(n_out)])
    return np.moveaxis(out, 0, axis)


def kohya_preprocess(image):
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    a = np.array(image)[:, :, ::-1]
    size = max(a.shape[0:2])
    pad_x, pad_y = size - a.shape[1], size - a.shape[0]
    a = np.pad(a, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)), mode="constant",
               constant_values=255)
    if size >= SIZE:
        try:
            import cv2

            a = cv2.resize(np.ascontiguousarray(a), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        except ImportError:
            a = area_by_integral(area_by_integral(a, SIZE, 0), SIZE, 1)
            a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    else:
        a = np.array(Image.fromarray(np.ascontiguousarray(a)).resize((SIZE, SIZE), Image.LANCZOS))
    return a.astype(np.float32)


def reference_probs(pixels, weight, bias):
    pooled = pixels.reshape(8, POOL, 8, POOL, 3).mean(axis=(1, 3))  # (8, 8, 3) HWC
    features = pooled.transpose(2, 0, 1).reshape(-1) / 255.0 - 0.5  # NCHW flatten order
    return 1 / (1 + np.exp(-(features.astype(np.float64) @ weight + bias)))


def kohya_tags(prob, o):
    """kohya's run_batch for the default (SmilingWolf) format, with its tag-name preparation."""
    sep = o.get("caption_separator", ", ")
    rating_tags, general_tags, character_tags = list(RATINGS), list(GENERAL), list(CHARACTERS)
    if o.get("character_tag_expand"):
        for i, tag in enumerate(character_tags):
            if tag.endswith(")"):
                parts = tag.split("(")
                name = "(".join(parts[:-1])
                character_tags[i] = (name[:-1] if name.endswith("_") else name) + sep + parts[-1].replace(")", "")
    if o.get("remove_underscore"):
        rating_tags, general_tags, character_tags = ([t.replace("_", " ") if len(t) > 3 else t for t in g]
                                                     for g in (rating_tags, general_tags, character_tags))
    for pair in (o.get("tag_replacement") or "").split(";"):  # kohya's intent (its own call changes nothing)
        if pair:
            source, target = pair.split(",")
            for g in (rating_tags, general_tags, character_tags):
                if source in g:
                    g[g.index(source)] = target
    thresh = o.get("thresh", 0.35)
    general_threshold = o.get("general_threshold", thresh)
    character_threshold = o.get("character_threshold", thresh)
    undesired = {t.strip() for t in o.get("undesired_tags", "").split(sep.strip()) if t.strip()}
    combined = []
    for i, p in enumerate(prob[4:]):
        if i < len(general_tags) and p >= general_threshold:
            if general_tags[i] not in undesired:
                combined.append(general_tags[i])
        elif i >= len(general_tags) and p >= character_threshold:
            name = character_tags[i - len(general_tags)]
            if name not in undesired:
                combined.insert(0, name) if o.get("character_tags_first") else combined.append(name)
    if o.get("use_rating_tags") or o.get("use_rating_tags_as_last_tag"):
        found = rating_tags[prob[:4].argmax()]
        if found not in undesired:
            combined.insert(0, found) if o.get("use_rating_tags") else combined.append(found)
    if o.get("always_first_tags") is not None:
        for tag in [t for t in o["always_first_tags"].split(sep.strip()) if t.strip() != ""]:
            if tag in combined:
                combined.remove(tag)
                combined.insert(0, tag)
    return sep.join(combined)


def make_images(folder, seed=1, count=None):
    """Blocky random images in several sizes and modes: padding, shrinking by non-integer and integer factors,
    growing (Lanczos), transparency, grey and palette images."""
    rng = np.random.default_rng(seed)
    specs = [("wide.png", (500, 380), "RGB"), ("big.jpg", (896, 896), "RGB"), ("tall.png", (300, 460), "RGB"),
             ("alpha.png", (200, 150), "RGBA"), ("grey.png", (120, 200), "L"), ("pal.png", (160, 160), "P"),
             ("exact.png", (448, 448), "RGB")][:count]
    for name, (w, h), mode in specs:
        cells = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 4), dtype=np.uint8)
        image = Image.fromarray(cells, "RGBA").resize((w, h), Image.NEAREST)
        image = Image.fromarray(np.clip(np.asarray(image, np.int16) + rng.integers(-20, 20, (h, w, 4)), 0, 255)
                                .astype(np.uint8), "RGBA")
        if mode == "P":
            image = image.convert("RGB").quantize(16)
            image.info["transparency"] = 0
        else:
            image = image.convert(mode)
        image.save(folder / name)
    return [folder / name for name, _, _ in specs]


OPTION_SETS = [
    {},
    {"thresh": 0.5, "remove_underscore": True, "use_rating_tags": True},
    {"general_threshold": 0.3, "character_threshold": 0.2, "character_tags_first": True, "character_tag_expand": True,
     "always_first_tags": "solo,1girl", "use_rating_tags_as_last_tag": True},
    {"caption_separator": "|", "undesired_tags": "solo|sky", "remove_underscore": True,
     "tag_replacement": "long hair,longhair;red eyes,crimson eyes"},
]


def flags(options):
    out = []
    for key, value in options.items():
        out += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return out


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    root = tmp_path_factory.mktemp("wd14")
    weight, bias = build_tagger(root / "tagger")
    images = make_images(root)
    probs = {p.name: reference_probs(kohya_preprocess(Image.open(p)), weight, bias) for p in images}
    return root, images, probs


def test_preprocessing_matches_kohya(tagger):
    root, images, _ = tagger
    for path in images:
        ours, theirs = wd14.preprocess(Image.open(path).copy()), kohya_preprocess(Image.open(path))
        assert ours.shape == theirs.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() <= 1, path.name  # area sums in another order: a rounding tie at most
        assert (ours != theirs).mean() < 1e-3, path.name


@pytest.mark.parametrize("index", range(len(OPTION_SETS)))
def test_tags_match_kohya(tagger, tmp_path, index, capsys):
    root, images, probs = tagger
    options = OPTION_SETS[index]
    out = tmp_path / "captions"
    rc = cli.main(["caption", str(root), "--captioner", "wd14", "--model", str(root / "tagger"), "--output_dir",
                   str(out), "--out_ext", ".wd14", "--batch_size", "3", "--device", "cpu", "--no_progress",
                   "--threads", "1", *flags(options)])
    assert rc == 0, capsys.readouterr().err
    spread = set()
    for path in images:
        expected = kohya_tags(probs[path.name], options)
        got = (out / (path.stem + ".wd14")).read_text(encoding="utf-8")
        assert got == expected + "\n", path.name
        spread.add(expected)
    assert len(spread) >= 4  # the images get different tags: the comparison can fail


def test_tagger_sees_the_options(tagger):
    """The reference and the captioner differ where they should (a guard on the comparison itself)."""
    root, images, probs = tagger
    prob = probs[images[0].name]
    assert kohya_tags(prob, {"thresh": 0.0}).split(", ")[:2] == ["1girl", "solo"]
    assert "hatsune_miku, vocaloid" in kohya_tags(prob, {"thresh": 0.0, "character_tag_expand": True})
    tagger_obj = wd14.WD14Tagger(root / "tagger", thresh=0.0, remove_underscore=True, character_tags_first=True,
                                 use_rating_tags=True, device="cpu")
    tags = tagger_obj.tags_of(np.asarray(prob))
    assert tags[0] in RATINGS and tags[1] == "saber" and "^_^" in tags and "long hair" in tags


def test_fixed_batch_model_and_frequencies(tmp_path):
    weight, bias = build_tagger(tmp_path / "fixed", seed=3, batch=2)
    images = make_images(tmp_path, seed=5, count=3)
    tagger = wd14.WD14Tagger(tmp_path / "fixed", device="cpu")
    assert tagger.model_batch == 2
    got = tagger.caption_batch([Image.open(p) for p in images])
    expected = [kohya_tags(reference_probs(kohya_preprocess(Image.open(p)), weight, bias), {}) for p in images]
    assert got == expected
    assert sum(tagger.tag_frequencies.values()) == sum(len(e.split(", ")) for e in expected if e)


def test_missing_files_and_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "empty_model").mkdir()
    rc = cli.main(["caption", str(tmp_path / "img"), "--captioner", "wd14", "--model", str(tmp_path / "empty_model"),
                   "--no_progress", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.onnx" in err and "wd14" in err and len(err.splitlines()) == 1
    build_tagger(tmp_path / "tagger")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    rc = cli.main(["caption", str(tmp_path / "img"), "--captioner", "wd14", "--model", str(tmp_path / "tagger"),
                   "--no_progress", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "onnxruntime" in err and "lora-diffusion[caption]" in err and len(err.splitlines()) == 1


def test_replacement_parsing():
    assert wd14.parse_replacements("a,b;c\\,d,e\\;f") == [("a", "b"), ("c,d", "e;f")]
    assert wd14.expand_character_tag("rem_(maid)_(re:zero)", ", ") == "rem_(maid), re:zero"
    with pytest.raises(ValueError, match="source,target"):
        wd14.parse_replacements("a,b,c")
