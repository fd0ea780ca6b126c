"""The shapes world of `builtin:mini`: seeded scenes of one filled shape on a plain background, their captions,
and a judge that reads shape, colour and background back from any image by measurement.

    rng = random.Random(0)
    scene = sample_scene(rng)                       # Scene(shape='square', color='red', background='blue', ...)
    image = render(scene, size=64)                  # PIL image, anti-aliased
    caption(scene)                                  # 'a red square on a blue background'
    judge(image)                                    # ('square', 'red', 'blue')

The star is drawn like any shape but held out of pretraining: it is the concept a LoRA learns. Eight
colour/background pairs (HELD_OUT_PAIRS) are held out too, so the model can be asked for combinations it never saw.
The ring (NEW_SHAPES) is a second held-out concept, kept out of SHAPES so that builtin:mini's VAE, its feature
network and their figures stay as they were; the judge knows it by the hole at its centre.

Two-object scenes put one shape on the left and one on the right of a shared background (TwoObjectScene):

    scene = sample_two_object_scene(rng)             # left red star, right blue ring, white background, ...
    two_object_caption(scene)    # 'a red star on the left and a blue ring on the right on a white background'
    judge_two_objects(render_two_objects(scene))     # {'left': ('star', 'red'), 'right': ('ring', 'blue'), ...}
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
NEW_SHAPES = ("ring",)  # held out of builtin:mini and outside SHAPES (see the module's docstring)
ALL_SHAPES = SHAPES + NEW_SHAPES

SIZE_RANGE = (0.35, 0.75)  # the shape's extent, as a share of the image side
CENTER_JITTER = 0.15  # the centre's largest offset from the middle, as a share of the side
MAX_ROTATION = 15.0  # degrees, either way
STAR_INNER_RATIO = 0.45  # inner/outer radius of the five-pointed star
RING_INNER_RATIO = 0.5  # hole/outer radius of the ring


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
_SHAPE = "|".join(ALL_SHAPES)
_CAPTION = re.compile(rf"\b({_COLOR}) ({_SHAPE})\b.*?\b({_COLOR}) background\b")


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

    if scene.shape in ("circle", "ring"):
        return [(cx - radius, cy - radius), (cx + radius, cy + radius)]
    if scene.shape == "square":  # `size` is the side of the square
        return polygon([radius * math.sqrt(2)] * 4, math.pi / 4)
    if scene.shape == "triangle":  # pointing up
        return polygon([radius] * 3, -math.pi / 2)
    if scene.shape == "star":  # five points, pointing up
        return polygon([radius, radius * STAR_INNER_RATIO] * 5, -math.pi / 2)
    raise ValueError(f"shape {scene.shape!r} is not one of {', '.join(ALL_SHAPES)}")


def render(scene: Scene, size=64, noise=0.0, rng=None, supersample=4) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB image, anti-aliased by supersampling; `noise` adds Gaussian pixel
    noise of that standard deviation (0-255 scale) from `rng` (a numpy Generator)."""
    big = size * supersample
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw_shape(ImageDraw.Draw(image), scene, big)
    return finish(image, size, noise, rng)


def draw_shape(draw, scene: Scene, side):
    """Fill the scene's shape on a canvas `side` pixels wide (a ring's hole shows the background)."""
    shape = outline(scene, side)
    if scene.shape in ("circle", "ring"):
        draw.ellipse(shape, fill=PALETTE[scene.color])
    else:
        draw.polygon(shape, fill=PALETTE[scene.color])
    if scene.shape == "ring":
        (x0, y0), (x1, y1) = shape
        cx, cy, inset = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * RING_INNER_RATIO
        draw.ellipse([(cx - inset, cy - inset), (cx + inset, cy + inset)], fill=PALETTE[scene.background])


def finish(image, size, noise, rng):
    """The supersampled canvas box-filtered down to `size` pixels, with Gaussian pixel noise when asked."""
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
    labels = palette_labels(pixels)
    background = border_label(labels)
    shape, color = judge_object(pixels, core_labels(labels), background)
    return shape, color, COLORS[background]


def palette_labels(pixels):
    """Each pixel's nearest palette colour, as an index into COLORS."""
    return np.argmin(((pixels[:, :, None, :] - _PALETTE_ARRAY) ** 2).sum(-1), axis=-1)


def border_label(labels):
    """The palette colour that holds the image's border: the background."""
    width = max(1, min(labels.shape) // 32)
    border = np.concatenate([labels[:width].ravel(), labels[-width:].ravel(), labels[:, :width].ravel(),
                             labels[:, -width:].ravel()])
    return np.bincount(border, minlength=len(COLORS)).argmax()


def core_labels(labels):
    """The labels with -1 where a pixel's four neighbours do not all share its label: anti-aliased edges blend two
    colours into a third."""
    core = labels.copy()
    core[1:-1, 1:-1][(labels[1:-1, 1:-1] != labels[:-2, 1:-1]) | (labels[1:-1, 1:-1] != labels[2:, 1:-1])
                     | (labels[1:-1, 1:-1] != labels[1:-1, :-2]) | (labels[1:-1, 1:-1] != labels[1:-1, 2:])] = -1
    return core


def judge_object(pixels, core, background, min_share=0.01):
    """(shape, colour) of the one object in `pixels` on palette colour `background`; (None, None) when fewer than
    `min_share` of the area's pixels (of the smaller side squared) hold another colour."""
    counts = np.bincount(core[core >= 0].ravel(), minlength=len(COLORS))
    counts[background] = 0
    side = min(core.shape)
    if counts.sum() < side * side * min_share:
        return None, None
    color = counts.argmax()
    mask = shape_mask(pixels, _PALETTE_ARRAY[color], _PALETTE_ARRAY[background])
    return classify_mask(mask), COLORS[color]


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
    than FLAT is a circle, or a ring when its centre is a hole. Unlike convexity, this holds for the bowed sides
    and rounded corners of generated shapes.
    None when the mask is too small or its point count fits no shape."""
    if mask.sum() < 8:
        return None
    profile = radial_profile(mask)
    top, low = profile.max(), profile.min()
    if (top - low) / top < FLAT:
        return "ring" if has_hole(mask) else "circle"
    points = count_rises(profile, swing=PEAK_SWING * (top - low))
    return {3: "triangle", 4: "square"}.get(points, "star" if points >= 5 else None)


def has_hole(mask):
    """Whether the 3x3 pixels around the mask's centroid are all outside it (a ring's hole, never a filled shape)."""
    ys, xs = np.nonzero(mask)
    y, x = int(ys.mean()), int(xs.mean())
    return not mask[max(0, y - 1):y + 2, max(0, x - 1):x + 2].any()


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


# ---------------------------------------------------------------------------------------------------------------
# Two objects side by side: the multi-concept world (Mix-of-Show's regional prompts).

TWO_SIZE_RANGE = (0.22, 0.34)  # each shape's extent, as a share of the image side: it stays in its half
TWO_JITTER = (0.03, 0.12)  # the largest horizontal and vertical offset from its half's centre
SIDES = ("left", "right")


@dataclass(frozen=True)
class TwoObjectScene:
    """A shape on the left and one on the right (Scenes in whole-image coordinates) of one background."""

    left: Scene
    right: Scene

    @property
    def background(self):
        return self.left.background


def two_object_scene(left_shape, left_color, right_shape, right_color, background, size=0.3, cy=0.5):
    """The scene with both shapes centred in their halves (no jitter)."""
    return TwoObjectScene(Scene(left_shape, left_color, background, size, 0.25, cy),
                          Scene(right_shape, right_color, background, size, 0.75, cy))


def sample_two_object_scene(rng: random.Random, shapes=ALL_SHAPES, colors=COLORS) -> TwoObjectScene:
    """A random two-object scene: each shape and colour drawn from `shapes` and `colors`, the background another
    palette colour than both."""
    left_color, right_color = rng.choice(colors), rng.choice(colors)
    background = rng.choice([c for c in COLORS if c not in (left_color, right_color)])
    dx, dy = TWO_JITTER

    def placed(color, middle):
        return Scene(rng.choice(shapes), color, background, size=rng.uniform(*TWO_SIZE_RANGE),
                     cx=middle + rng.uniform(-dx, dx), cy=0.5 + rng.uniform(-dy, dy),
                     rotation=rng.uniform(-MAX_ROTATION, MAX_ROTATION))

    return TwoObjectScene(placed(left_color, 0.25), placed(right_color, 0.75))


def two_object_caption(scene: TwoObjectScene) -> str:
    left, right = scene.left, scene.right
    return (f"a {left.color} {left.shape} on the left and a {right.color} {right.shape} on the right "
            f"on a {scene.background} background")


_TWO_CAPTION = re.compile(rf"\b({_COLOR}) ({_SHAPE}) on the left and an? ({_COLOR}) ({_SHAPE}) on the right\b"
                          rf".*?\b({_COLOR}) background\b")


def parse_two_object_caption(text):
    """The TwoObjectScene (centred) a two-object caption or prompt asks for, or None."""
    match = _TWO_CAPTION.search(text.lower())
    return two_object_scene(match[2], match[1], match[4], match[3], match[5]) if match else None


def render_two_objects(scene: TwoObjectScene, size=64, noise=0.0, rng=None, supersample=4) -> Image.Image:
    """Both shapes on one canvas, as render draws one."""
    big = size * supersample
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for part in (scene.left, scene.right):
        draw_shape(draw, part, big)
    return finish(image, size, noise, rng)


def judge_two_objects(image, min_share=0.01):
    """What each half of an image holds and on what: {'left': (shape, colour), 'right': (shape, colour),
    'background': colour}, by judge's measurements on each half (shape and colour None for an empty half; an
    object is placed by the half that holds it). `min_share`: the share of a half's area that another colour must
    hold to count as an object there."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    labels = palette_labels(pixels)
    background = border_label(labels)
    core = core_labels(labels)
    middle = pixels.shape[1] // 2
    halves = {"left": np.s_[:, :middle], "right": np.s_[:, middle:]}
    verdict = {side: judge_object(pixels[cut], core[cut], background, min_share) for side, cut in halves.items()}
    return dict(verdict, background=COLORS[background])


def judge_two_object_accuracy(images, scenes):
    """Shares of images judged right: each side's shape, colour and both ('left', 'right'), the background, and
    everything at once ('all')."""
    keys = [f"{side}_{what}" for side in SIDES for what in ("shape", "color")] + [*SIDES, "background", "all"]
    hits = dict.fromkeys(keys, 0)
    for image, scene in zip(images, scenes):
        verdict = judge_two_objects(image)
        right = {"background": verdict["background"] == scene.background}
        for side in SIDES:
            asked = getattr(scene, side)
            right[f"{side}_shape"] = verdict[side][0] == asked.shape
            right[f"{side}_color"] = verdict[side][1] == asked.color
            right[side] = right[f"{side}_shape"] and right[f"{side}_color"]
        right["all"] = right["left"] and right["right"] and right["background"]
        for key in keys:
            hits[key] += right[key]
    return {key: value / max(1, len(scenes)) for key, value in hits.items()}
