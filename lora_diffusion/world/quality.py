"""Quality on the shapes world: generate images for world prompts and let the judge (world.judge) score them.

    pipe = world_pipeline(load_models("builtin:mini"))
    accuracy, images = judge_prompts(pipe, held_out_scenes(48, shapes=("star",)))   # {'shape': .9, ...}

Scores come from the judge on generated images, never from a training loss.
"""

import random

import torch

from lora_diffusion.formats.io import atomic_write
from lora_diffusion.models.regional import Region, encode_regions, regional_attention
from lora_diffusion.models.sampling import draw

from . import scenes as world

SIZE = 64  # builtin:mini's resolution


def world_pipeline(models, scheduler=None):
    """A diffusers StableDiffusionPipeline over loaded SDModels (or any object with the same parts); the scheduler
    defaults to the model folder's own when it has one (builtin:mini: DPM-Solver++), else DPM-Solver++ on SD's
    schedule."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    if scheduler is None:
        scheduler = DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config, algorithm_type="dpmsolver++")
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def held_out_scenes(n, shapes=world.PRETRAIN_SHAPES, pairs=world.HELD_OUT_PAIRS, seed=1234):
    """n scenes cycling through every shape x colour pair, in a seeded order (default: the held-out pairs)."""
    combos = [(s, c, b) for s in shapes for c, b in pairs]
    random.Random(seed).shuffle(combos)
    return [world.Scene(*combos[i % len(combos)]) for i in range(n)]


@torch.no_grad()
def judge_prompts(pipe, scenes, *, steps=30, guidance=5.0, seed=0, batch_size=16, size=SIZE,
                  cross_attention_kwargs=None, prompt=world.caption):
    """One image per scene, from `prompt(scene)` (its sentence caption) with seed `seed + index`, judged;
    (accuracy, images)."""
    images = []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        generator = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe([prompt(s) for s in chunk], height=size, width=size, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generator,
                       cross_attention_kwargs=cross_attention_kwargs).images
    return world.judge_accuracy(images, scenes), images


def judge_samples(prompts, images):
    """Accuracy of images generated for free-form prompts: only prompts in the world's grammar count.
    Returns None when no prompt is a world prompt."""
    pairs = [(world.parse_caption(p), image) for p, image in zip(prompts, images)]
    pairs = [(asked, image) for asked, image in pairs if asked]
    if not pairs:
        return None
    return world.judge_accuracy([image for _, image in pairs], [world.Scene(*asked) for asked, _ in pairs])


def fmt(accuracy):
    return ", ".join(f"{key} {value:.0%}" for key, value in accuracy.items())


def grid(images, columns, labels=None, row_labels=None):
    """Images pasted in rows of `columns`, optionally with a caption strip above each column and a label strip
    left of each row (an X/Y plot)."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    strip = 12 if labels else 0
    margin = 6 * max(len(label) for label in row_labels) + 4 if row_labels else 0
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (margin + columns * width, strip + rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, (margin + (i % columns) * width, strip + (i // columns) * height))
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate((labels or [])[:columns]):
        draw.text((margin + column * width + 2, 0), label, fill="black")
    for row, label in enumerate((row_labels or [])[:rows]):
        draw.text((2, strip + row * height + height // 2 - 5), label, fill="black")
    return sheet


def summarize_samples(paths, grid_path):
    """After a run: the sample PNGs (each holding its prompt) pasted into one grid at `grid_path`, and the judge's
    accuracy on those whose prompt is a world prompt (None when none is). Returns (grid_path, accuracy)."""
    from PIL import Image


    if not paths:
        return None, None
    images = [Image.open(p).convert("RGB") for p in paths]
    prompts = [Image.open(p).text.get("prompt", "") for p in paths]
    sheet = grid(images, columns=min(len(images), 8))
    atomic_write(grid_path, lambda f: sheet.save(f, format="PNG"))
    return grid_path, judge_samples(prompts, images)


def two_object_regions(scene: world.TwoObjectScene):
    """Regional prompts for a two-object scene: each half's one-object caption over that half."""
    return [Region(world.caption(scene.left), (0.0, 0.0, 0.5, 1.0)),
            Region(world.caption(scene.right), (0.5, 0.0, 1.0, 1.0))]


def two_object_scenes(n, shapes=world.PRETRAIN_SHAPES, seed=1234):
    """n centred two-object scenes over shape pairs and distinct colours in a seeded order, each background
    another colour than both shapes."""
    rng = random.Random(seed)
    scenes = []
    while len(scenes) < n:
        left, right = rng.choice(shapes), rng.choice(shapes)
        colors = rng.sample(world.COLORS, 3)
        scenes.append(world.two_object_scene(left, colors[0], right, colors[1], colors[2]))
    return scenes


@torch.no_grad()
def judge_two_object_prompts(models, scenes, *, regional=True, steps=30, guidance=5.0, seed=0, size=SIZE):
    """One image per two-object scene from its caption (world.two_object_caption), with its halves' regional
    prompts when `regional`, judged by world.judge_two_objects; (accuracy, images)."""
    pipe = world_pipeline(models)
    factor = pipe.vae_scale_factor
    images = []
    for i, scene in enumerate(scenes):
        contexts = encode_regions(models, pipe, two_object_regions(scene), "", expand=lambda text: text,
                                  device=pipe.device) if regional else []
        with regional_attention(pipe.unet, contexts, latent_size=(size // factor, size // factor),
                                guidance=guidance > 1):
            images += draw(pipe, prompt=world.two_object_caption(scene), height=size, width=size,
                           num_inference_steps=steps, guidance_scale=guidance,
                           generator=torch.Generator().manual_seed(seed + i))
    return world.judge_two_object_accuracy(images, scenes), images
