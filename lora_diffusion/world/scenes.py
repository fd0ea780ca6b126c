"""The shapes world of `builtin:mini`: seeded scenes of one filled shape on a plain background, their captions,
and a judge that reads shape, colour and background back from any image by measurement.

    rng = random.Random(0)
    scene = sample_scene(rng)                       # Scene(shape='square', color='red', background='blue', ...)
    image = render(scene, size=64)                  # PIL image, anti-aliased
    caption(scene)                                  # 'a red square on a blue background'
    judge(image)                                    # ('square', 'red', 'blue')

The star is drawn like any shape but held out of pretraining: it is the concept a LoRA learns. Eight
colour/background pairs (HELD_OUT_PAIRS) are held out too, so the model can be asked for combinations it never saw.
"""

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star")
PRETRAIN_SHAPES = ("circle", "square", "triangle")
# Each colour once as a shape and once as a background: (red on yellow), (green on purple), ...
HELD_OUT_PAIRS = tuple((COLORS[i], COLORS[(i + 3) % len(COLORS)]) for i in range(len(COLORS)))
CAPTION_STYLES = ("sentence", "tags", "empty")

SIZE_RANGE = (0.35, 0.75)  # the shape's extent, as a share of the image side
CENTER_JITTER = 0.15  # the centre's largest offset from the middle, as a share of the side
MAX_ROTATION = 15.0  # degrees, either way
STAR_INNER_RATIO = 0.45  # inner/outer radius of the five-pointed star


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: float = 0.55
    cx: float = 0.5
    cy: float = 0.5
    rotation: float = 0.0


def color_pairs(held_out=False):
    """All (shape colour, background) pairs of distinct colours, without the held-out ones, or only those."""
    pairs = [(c, b) for c in COLORS for b in COLORS if c != b]
    return [p for p in pairs if (p in HELD_OUT_PAIRS) == held_out]


def sample_scene(rng: random.Random, shapes=PRETRAIN_SHAPES, pairs=None) -> Scene:
    """A random scene; `pairs` limits the (colour, background) pairs (default: all but the held-out ones)."""
    color, background = rng.choice(pairs if pairs is not None else color_pairs())
    jitter = lambda: rng.uniform(-CENTER_JITTER, CENTER_JITTER)  # noqa: E731
    return Scene(shape=rng.choice(shapes), color=color, background=background, size=rng.uniform(*SIZE_RANGE),
                 cx=0.5 + jitter(), cy=0.5 + jitter(), rotation=rng.uniform(-MAX_ROTATION, MAX_ROTATION))


def caption(scene: Scene, style="sentence") -> str:
    if style == "sentence":
        return f"a {scene.color} {scene.shape} on a {scene.background} background"
    if style == "tags":
        return f"{scene.color} {scene.shape}, {scene.background} background"
    if style == "empty":
        return ""
    raise ValueError(f"caption style {style!r} is not one of {', '.join(CAPTION_STYLES)}")


_COLOR = "|".join(COLORS)
_CAPTION = re.compile(rf"\b({_COLOR}) ({'|'.join(SHAPES)})\b.*?\b({_COLOR}) background\b")


def parse_caption(text):
    """(shape, colour, background) asked for by a caption or prompt in either style, or None."""
    match = _CAPTION.search(text.lower())
    return (match[2], match[1], match[3]) if match else None


def outline(scene: Scene, side: float):
    """The shape's polygon (or circle box) in pixel coordinates of an image `side` pixels wide."""
    cx, cy, radius = scene.cx * side, scene.cy * side, scene.size * side / 2
    turn = math.radians(scene.rotation)

    def polygon(radii, start):
        step = 2 * math.pi / len(radii)
        return [(cx + r * math.cos(start + turn + i * step), cy + r * math.sin(start + turn + i * step))
                for i, r in enumerate(radii)]

    if scene.shape == "circle":
        return [(cx - radius, cy - radius), (cx + radius, cy + radius)]
    if scene.shape == "square":  # `size` is the side of the square
        return polygon([radius * math.sqrt(2)] * 4, math.pi / 4)
    if scene.shape == "triangle":  # pointing up
        return polygon([radius] * 3, -math.pi / 2)
    if scene.shape == "star":  # five points, pointing up
        return polygon([radius, radius * STAR_INNER_RATIO] * 5, -math.pi / 2)
    raise ValueError(f"shape {scene.shape!r} is not one of {', '.join(SHAPES)}")


def render(scene: Scene, size=64, noise=0.0, rng=None, supersample=4) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB image, anti-aliased by supersampling; `noise` adds Gaussian pixel
    noise of that standard deviation (0-255 scale) from `rng` (a numpy Generator)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    shape = outline(scene, big)
    if scene.shape == "circle":
        draw.ellipse(shape, fill=PALETTE[scene.color])
    else:
        draw.polygon(shape, fill=PALETTE[scene.color])
    image = image.resize((size, size), Image.Resampling.BOX)
    if noise:
        rng = rng if rng is not None else np.random.default_rng()
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
    return image


def write_images(folder, scenes, style="sentence", size=64, prefix=""):
    """Write each scene as `<prefix>NN_<color>_<shape>.png` with its caption beside it in `.txt` (kohya layout:
    pass a `<repeats>_<name>` folder)."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        stem = folder / f"{prefix}{i:02d}_{scene.color}_{scene.shape}"
        render(scene, size).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption(scene, style) + "\n", encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# The judge.

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


def judge(image):
    """(shape, colour, background) of an image, by measurement: background = the palette colour that holds the
    border, colour = the most common other palette colour inside, shape from the mask of pixels nearer the shape
    colour than the background, classified by its points (classify_mask).
    Returns None for the shape when there is no shape to measure."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    labels = np.argmin(((pixels[:, :, None, :] - _PALETTE_ARRAY) ** 2).sum(-1), axis=-1)
    side = min(labels.shape)
    ring = max(1, side // 32)
    border = np.concatenate([labels[:ring].ravel(), labels[-ring:].ravel(), labels[:, :ring].ravel(),
                             labels[:, -ring:].ravel()])
    background = np.bincount(border, minlength=len(COLORS)).argmax()
    # Count only pixels whose four neighbours share their label: anti-aliased edges blend two colours into a third.
    core = labels.copy()
    core[1:-1, 1:-1][(labels[1:-1, 1:-1] != labels[:-2, 1:-1]) | (labels[1:-1, 1:-1] != labels[2:, 1:-1])
                     | (labels[1:-1, 1:-1] != labels[1:-1, :-2]) | (labels[1:-1, 1:-1] != labels[1:-1, 2:])] = -1
    counts = np.bincount(core[core >= 0].ravel(), minlength=len(COLORS))
    counts[background] = 0
    if counts.sum() < side * side * 0.01:
        return None, None, COLORS[background]
    color = counts.argmax()
    mask = shape_mask(pixels, _PALETTE_ARRAY[color], _PALETTE_ARRAY[background])
    return classify_mask(mask), COLORS[color], COLORS[background]


def shape_mask(pixels, color, background):
    """Pixels nearer `color` than `background` (projected on the line between them), cleaned by a 3x3 majority."""
    direction = color - background
    t = ((pixels - background) @ direction) / float(direction @ direction)
    mask = (t > 0.5).astype(np.int32)
    padded = np.pad(mask, 1, mode="edge")
    votes = sum(padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] for dy in range(3) for dx in range(3))
    return votes >= 5


PROFILE_BINS = 90  # angle bins of the radial profile, 4 degrees each
FLAT = 0.17  # a profile that varies less than this share of its largest radius is a circle
PEAK_SWING = 0.2  # a point rises and falls by at least this share of the profile's range


def classify_mask(mask):
    """The shape by its points, as a person counts them: the mask's radial profile (farthest mask point from the
    centroid per angle) rises once per corner: 3 for a triangle, 4 for a square, 5 for the star; a profile flatter
    than FLAT is a circle. Unlike convexity, this holds for the bowed sides and rounded corners of generated shapes.
    None when the mask is too small or its point count fits no shape."""
    if mask.sum() < 8:
        return None
    profile = radial_profile(mask)
    top, low = profile.max(), profile.min()
    if (top - low) / top < FLAT:
        return "circle"
    points = count_rises(profile, swing=PEAK_SWING * (top - low))
    return {3: "triangle", 4: "square"}.get(points, "star" if points >= 5 else None)


def radial_profile(mask, upsample=4):
    """Per angle bin, the largest distance from the centroid of any mask point (each pixel split into
    upsample x upsample points so that no bin near the centre stays empty), smoothed over three bins."""
    ys, xs = np.nonzero(np.kron(mask.astype(np.uint8), np.ones((upsample, upsample), np.uint8)))
    ys, xs = (ys + 0.5) / upsample, (xs + 0.5) / upsample
    dy, dx = ys - ys.mean(), xs - xs.mean()
    bins = ((np.arctan2(dy, dx) + math.pi) / (2 * math.pi) * PROFILE_BINS).astype(int) % PROFILE_BINS
    profile = np.zeros(PROFILE_BINS)
    np.maximum.at(profile, bins, np.hypot(dy, dx))
    empty = profile == 0
    profile[empty] = ((np.roll(profile, 1) + np.roll(profile, -1)) / 2)[empty]
    return (np.roll(profile, 1) + 2 * profile + np.roll(profile, -1)) / 4


def count_rises(profile, swing):
    """How often the circular profile climbs by more than `swing` from its last low: each point counts once it
    stands out from the valleys beside it, however tall it is next to the others (a star's one short point)."""
    rises, climbing = 0, False
    low = high = profile.min()
    for value in np.roll(profile, -int(profile.argmin())):  # start at the lowest value, so no rise is split
        if climbing:
            high = max(high, value)
            if value < high - swing:
                climbing, low = False, value
        else:
            low = min(low, value)
            if value > low + swing:
                rises, climbing, high = rises + 1, True, value
    return rises


def judge_accuracy(images, scenes):
    """Share of images judged right for shape, colour and background, and for all three at once."""
    hits = {"shape": 0, "color": 0, "background": 0, "all": 0}
    for image, scene in zip(images, scenes):
        shape, color, background = judge(image)
        right = (shape == scene.shape, color == scene.color, background == scene.background)
        for key, ok in zip(("shape", "color", "background"), right):
            hits[key] += ok
        hits["all"] += all(right)
    return {key: value / max(1, len(scenes)) for key, value in hits.items()}
