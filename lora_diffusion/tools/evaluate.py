"""`lora-diffusion evaluate`: a base model and LoRA files (every epoch of a run, a glob) at chosen multipliers ->
images for fixed prompts and seeds, scored with torchmetrics (FID, KID, CLIP score) and, on builtin:mini's shapes
world, the world judge; results as a table, CSV and JSON, and an X/Y grid (rows: prompt and seed, columns: base
model and each file x multiplier).

    lora-diffusion evaluate --model builtin:mini --lora "output/star/star*.safetensors" --prompts world:star \\
        --seeds 4 --out output/eval-star

Metrics: `judge` (world prompts: shape, colour, background right), `fid` and `kid` against `--reference` (a folder
of images; for world prompts, renders of the asked scenes by default) in the features of `--features` (`world`: the
feature network shipped for the shapes world; `inception` or `inception:FILE`: torchmetrics' Inception, which needs
the `torch-fidelity` package and its weights file; `module:attr`: your own nn.Module factory), and `clip` (CLIP
score with the local CLIP model folder `--clip_model`).
"""

import csv
import glob
import io
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora_diffusion import world
from lora_diffusion.cli import set_cpu_threads
from lora_diffusion.core.network import load_network
from lora_diffusion.data.files import is_image_file
from lora_diffusion.formats.io import atomic_write
from lora_diffusion.models import load_models
from lora_diffusion.world import quality
from lora_diffusion.world.features import load_world_features

from .generate import check_multiplier

WORLD_PROMPTS = ("world:star", "world:held-out", "world:seen")
GRID_ROWS = 16  # prompt x seed rows in grid.png; results.csv and .json score every row
BEST_BY = (("judge_shape", 1), ("fid", -1), ("clip", 1))  # the first score the rows have names the best...
TIE_BREAKERS = (("judge_all", 1), ("judge_shape", 1), ("fid", -1), ("kid", -1), ("clip", 1))  # ...these split ties


@dataclass
class Variant:
    label: str
    path: str | None  # None: the base model alone
    multiplier: float = 1.0


def natural_key(path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def expand_loras(patterns):
    """Files for each pattern (a path or a glob), in natural order (`x-000002` before `x-000010`; the final
    `x.safetensors` after its epochs). A pattern that matches nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern), key=lambda p: (natural_key(Path(p).stem.split("-")[0]),
                                                             "-" not in Path(p).stem, natural_key(p)))
        if not matches:
            raise ValueError(f"--lora {pattern}: no file matches")
        files += [m for m in matches if m not in files]
    return files


def variants_for(files, multipliers, base=True):
    out = [Variant("base", None)] if base else []
    for path in files:
        for multiplier in multipliers:
            suffix = f" x{multiplier:g}" if len(multipliers) > 1 or multiplier != 1 else ""
            out.append(Variant(Path(path).stem + suffix, path, multiplier))
    return out


def world_scenes(spec):
    """The scenes of a `world:` prompt set: `star` (stars in the 8 held-out colour pairs), `held-out` (circles,
    squares and triangles in those pairs), `seen` (the same shapes in 8 seen pairs)."""
    kind = spec.split(":", 1)[1]
    if kind == "star":
        return quality.held_out_scenes(len(world.HELD_OUT_PAIRS), shapes=("star",))
    if kind == "held-out":
        return quality.held_out_scenes(3 * len(world.HELD_OUT_PAIRS))
    if kind == "seen":
        return quality.held_out_scenes(24, pairs=world.color_pairs()[::7])
    raise ValueError(f"--prompts {spec}: expected one of {', '.join(WORLD_PROMPTS)} or a prompts file")


def read_prompts(spec, extra):
    """(prompts, world scenes or None) from --prompts (a world set or a file, one prompt a line) and --prompt."""
    prompts = list(extra)
    scenes = None
    if spec and spec.startswith("world:"):
        scenes = world_scenes(spec)
        prompts += [world.caption(s) for s in scenes]
    elif spec:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"--prompts {spec}: no such file (expected a file with one prompt a line, or "
                             f"{', '.join(WORLD_PROMPTS)})")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError("no prompts: give --prompts FILE, --prompts world:star, or --prompt TEXT")
    return prompts, scenes


# -- features and metrics ---------------------------------------------------------------------------------------


def feature_network(name):
    """The nn.Module that FID/KID compare images in (uint8 [N, 3, H, W] -> [N, d])."""
    if name == "world":
        return load_world_features()
    if name == "inception" or name.startswith("inception:"):
        weights = name.partition(":")[2] or None
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ValueError("--features inception needs the torch-fidelity package (pip install torch-fidelity) "
                             "and its weights: pass inception:FILE with weights-inception-2015-12-05-6726825d.pth, "
                             "or put that file in ~/.cache/torch/hub/checkpoints/ (nothing is downloaded here)"
                             ) from None
        if weights and not Path(weights).is_file():
            raise ValueError(f"--features {name}: {weights} not found")
        return ("inception", weights)
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"--features {name}: expected world, inception[:FILE] or module:attr (a function that "
                         f"returns an nn.Module mapping uint8 images to features)")
    import importlib

    factory = getattr(importlib.import_module(module), attr)
    return factory()


def to_uint8(images):
    import numpy as np

    return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB")).copy()).permute(2, 0, 1) for i in images])


def fid_kid(features, reference, images, metrics=("fid", "kid")):
    """FID and KID (mean, std) of images against reference images, both lists of PIL images."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    kwargs = {"feature": features}
    if isinstance(features, tuple):  # torchmetrics' Inception (torch-fidelity), optionally from a weights file
        kwargs = {"feature": 2048, "feature_extractor_weights_path": features[1]}
    real, fake = to_uint8(reference), to_uint8(images)
    out = {}
    if "fid" in metrics:
        fid = FrechetInceptionDistance(**kwargs)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        out["fid"] = float(fid.compute())
    if "kid" in metrics:
        if isinstance(features, tuple):
            kwargs = {"feature": 2048}
        size = min(len(real), len(fake), 50)
        with warnings.catch_warnings():  # "will save all extracted features in buffer": a few hundred images here
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            kid = KernelInceptionDistance(**kwargs, subset_size=size, subsets=20)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        mean, std = kid.compute()
        out["kid"], out["kid_std"] = float(mean), float(std)
    return out


def clip_scorer(folder):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if not Path(folder, "config.json").is_file():
        raise ValueError(f"--clip_model {folder}: expected a local transformers CLIP folder (config.json, weights, "
                         f"tokenizer and preprocessor files), e.g. a saved openai/clip-vit-large-patch14")
    return CLIPScore(model_name_or_path=lambda: (TensorFeatures(CLIPModel.from_pretrained(folder)),
                                                 CLIPProcessor.from_pretrained(folder)))


class TensorFeatures(torch.nn.Module):
    """A CLIPModel whose get_*_features return the projected embeddings as tensors: transformers 5 returns an output
    object (embeddings in `pooler_output`), which torchmetrics 1.9's CLIPScore cannot divide by its norm."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return _embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return _embedding(self.model.get_text_features(*args, **kwargs))


def _embedding(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_images(folder, scenes, n, size):
    """Images of --reference, or for world prompts renders of the asked scenes (fresh sizes and places)."""
    from PIL import Image

    if folder:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))
        if not paths:
            raise ValueError(f"--reference {folder}: no images found")
        return [Image.open(p).convert("RGB").resize((size, size)) for p in paths]
    if scenes:
        import random

        rng = random.Random(99)
        out = []
        for i in range(max(n, 64)):
            base = scenes[i % len(scenes)]
            scene = world.sample_scene(rng, shapes=(base.shape,), pairs=[(base.color, base.background)])
            out.append(world.render(scene, size))
        return out
    return None


# -- the run --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_variant(models, pipe, variant, prompts, seeds, *, steps, guidance, size, progress=None):
    """One image per (prompt, seed) with the variant's LoRA applied (and removed afterwards); progress(n) after
    each batch of n images."""
    network = None
    if variant.path:
        network = load_network(variant.path, models.unet, models.text_encoder, variant.multiplier,
                               tokenizer=models.tokenizer)  # diffusers writes multi-vector tokens out itself
    try:
        images = []
        for seed in seeds:
            generators = [torch.Generator().manual_seed(seed) for _ in prompts]
            images += pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                           generator=generators).images
            if progress is not None:
                progress(len(prompts))
    finally:
        if network is not None:
            network.remove()
    # seed-major from the pipe -> prompt-major rows
    return [images[s * len(prompts) + p] for p in range(len(prompts)) for s in range(len(seeds))]


def evaluate(model, variants, prompts, *, scenes=None, seeds=(0,), steps=20, guidance=5.0, size=None,
             metrics=("judge", "fid", "kid"), features="world", reference=None, clip_model=None):
    """Scores per variant: a list of dicts (label, file, multiplier, and each metric), and the images per variant.
    A progress bar on stderr counts the images."""
    seeds = list(seeds)
    if not seeds or not prompts or not variants:
        raise ValueError(f"evaluate: nothing to draw ({len(variants)} variant(s), {len(prompts)} prompt(s), "
                         f"{len(seeds)} seed(s)); each needs at least one")
    feature_net = feature_network(features) if {"fid", "kid"} & set(metrics) else None
    models = load_models(model)
    models.unet.float(), models.text_encoder.float(), models.vae.float()
    size = size or native_size(models)
    pipe = quality.world_pipeline(models)
    reference_set = reference_images(reference, scenes, len(prompts) * len(seeds), size) if feature_net else None
    scorer = clip_scorer(clip_model) if "clip" in metrics else None
    rows, all_images = [], []
    with tqdm(total=len(variants) * len(prompts) * len(seeds), desc="evaluate", unit="image", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for variant in variants:
            bar.set_postfix_str(variant.label)
            images = generate_variant(models, pipe, variant, prompts, seeds, steps=steps, guidance=guidance,
                                      size=size, progress=bar.update)
            row = {"label": variant.label, "file": variant.path or "", "multiplier": variant.multiplier}
            row.update(score_images([p for p in prompts for _ in seeds], images, metrics, feature_net,
                                    reference_set, scorer))
            rows.append(row)
            all_images.append(images)
    return rows, all_images


def score_images(asked, images, metrics, feature_net=None, reference_set=None, scorer=None) -> dict:
    """The metrics of images generated for the prompts `asked` (one per image)."""
    scores = {}
    if "judge" in metrics:
        for key, value in (quality.judge_samples(asked, images) or {}).items():
            scores[f"judge_{key}"] = value
    if feature_net is not None and reference_set:
        scores.update(fid_kid(feature_net, reference_set, images, [m for m in ("fid", "kid") if m in metrics]))
    if scorer is not None:
        scorer.reset()
        scores["clip"] = float(scorer(to_uint8(images), asked))
    return scores


def native_size(models) -> int:
    """The image side the model was made for (diffusers' pipeline default): U-Net sample size x VAE factor."""
    return models.unet.config.sample_size * 2 ** (len(models.vae.config.block_out_channels) - 1)


@dataclass
class Best:
    row: dict  # the LoRA row named best
    key: str  # the score that named it (BEST_BY)
    tied: list  # the other rows with the same `key` score
    broken_by: str | None  # how a tie was split: scores of TIE_BREAKERS, "file order", or None without a tie

    def describe(self) -> str:
        line = f"best by {self.key}: {self.row['label']} ({self.row['file']})"
        if not self.tied:
            return line
        others = ", ".join(r["label"] for r in self.tied)
        how = ("no other score tells them apart: the first in file order" if self.broken_by == "file order"
               else f"broken by {self.broken_by}")
        return f"{line}; tied on {self.key} with {others}: {how}"


def best_row(rows) -> Best | None:
    """The LoRA row the scores favour: the most shapes right on world prompts, else the lowest FID, else the
    highest CLIP score (None with no LoRA row or no score). Rows tied on that score are split by the other scores
    of TIE_BREAKERS in turn (all shapes right, FID, KID, CLIP), and what still ties by file order: the first
    (the earliest epoch; multipliers in the order given)."""
    candidates = [r for r in rows if r["file"]]
    for key, sign in BEST_BY:
        scored = [r for r in candidates if key in r]
        if not scored:
            continue
        top = max(sign * r[key] for r in scored)
        tied = [r for r in scored if sign * r[key] == top]
        remaining, splitters = tied, []
        for other, other_sign in TIE_BREAKERS:
            if len(remaining) == 1:
                break
            if other == key or not all(other in r for r in remaining):
                continue
            best_other = max(other_sign * r[other] for r in remaining)
            narrowed = [r for r in remaining if other_sign * r[other] == best_other]
            if len(narrowed) < len(remaining):
                remaining = narrowed
                splitters.append(other)
        if len(remaining) > 1:
            splitters.append("file order")
        best = remaining[0]
        broken_by = ", then ".join(splitters) if len(tied) > 1 else None
        return Best(best, key, [r for r in tied if r is not best], broken_by)
    return None


def xy_grid(variants, images, prompts, seeds, max_rows=GRID_ROWS):
    rows = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))][:max_rows]
    cells = [images[v][p * len(seeds) + s] for (p, s) in rows for v in range(len(variants))]
    labels = [short_label(v) for v in variants]
    row_labels = [f"{prompts[p][:40]} (seed {seeds[s]})" for p, s in rows]
    return quality.grid(cells, columns=len(variants), labels=labels, row_labels=row_labels)


def short_label(variant: Variant) -> str:
    """A column label that fits a small image: `ep8` for an epoch file, `step100` for a step file, else the name."""
    if not variant.path:
        return variant.label
    stem = Path(variant.path).stem
    match = re.search(r"-(step)?0*(\d+)$", stem)
    label = (f"step{match[2]}" if match[1] else f"ep{match[2]}") if match else stem
    suffix = variant.label[len(stem):]  # " x0.5" with several multipliers
    return (label + suffix.replace(" x", "x"))[:12]


def write_results(out, rows, grid):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", lambda f: f.write(text.getvalue().encode()))
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(rows, indent=1).encode()))
    atomic_write(out / "grid.png", lambda f: grid.save(f, format="PNG"))
    return out


def table(rows):
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("file", "multiplier")]
    width = max(len(str(r["label"])) for r in rows)
    lines = ["  ".join([f"{'variant':<{width}}"] + [f"{k:>12}" for k in keys[1:]])]
    for r in rows:
        cells = [f"{r['label']:<{width}}"]
        for k in keys[1:]:
            v = r.get(k)
            cells.append(f"{'':>12}" if v is None else f"{v:>12.1%}" if k.startswith("judge") else f"{v:>12.4g}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--model", default="builtin:mini", help="base model (default builtin:mini)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE_OR_GLOB",
                        help="LoRA files; a glob takes every epoch of a run; repeat for several")
    parser.add_argument("--multipliers", default="1", help="comma-separated, e.g. 0.5,0.75,1")
    parser.add_argument("--prompts", default=None, help="a file (one prompt a line) or world:star, world:held-out, "
                        "world:seen (default on builtin:mini: world:star)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's own, 64 on "
                        "builtin:mini, 512 on SD1.5)")
    parser.add_argument("--metrics", default="judge,fid,kid", help="any of judge,fid,kid,clip")
    parser.add_argument("--features", default="world", help="FID/KID features: world, inception[:FILE], module:attr")
    parser.add_argument("--reference", default=None, help="folder of reference images for FID/KID (world prompts: "
                        "renders of the asked scenes by default)")
    parser.add_argument("--clip_model", default=None, help="local CLIP model folder for --metrics clip")
    parser.add_argument("--no_base", action="store_true", help="leave out the base model without a LoRA")
    parser.add_argument("--out", default="output/evaluate", help="folder for results.csv/.json and grid.png")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the cores not busy now, at least 1)")


def check_out_folder(out):
    """--out must be a folder that exists or can be made: checked before any image is drawn."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: is a file; expected a folder (new or existing) for results.csv, "
                         f"results.json and grid.png")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so the folder cannot be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def check_flags(args):
    for flag, value, least in (("--seeds", args.seeds, 1), ("--steps", args.steps, 1), ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: expected an integer >= {least}"
                             + (" (seeds 0..N-1 per prompt)" if flag == "--seeds" else ""))
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise ValueError(f"--size {args.size}: expected a positive multiple of 8 (the VAE's factor)")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance {args.guidance}: expected a finite number")
    check_out_folder(args.out)


def run(args) -> int:
    check_flags(args)

    set_cpu_threads(args.threads, "evaluate")

    try:
        multipliers = [check_multiplier(float(m), "--multipliers") for m in args.multipliers.split(",")]
    except ValueError as e:
        raise ValueError(f"--multipliers {args.multipliers}: expected comma-separated finite numbers ({e})") from None
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = set(metrics) - {"judge", "fid", "kid", "clip"}
    if unknown:
        raise ValueError(f"--metrics: unknown {', '.join(sorted(unknown))}; expected judge, fid, kid, clip")
    if "clip" in metrics and not args.clip_model:
        raise ValueError("--metrics clip needs --clip_model FOLDER (a local CLIP model; nothing is downloaded)")
    spec = args.prompts or (None if args.prompt else "world:star")
    prompts, scenes = read_prompts(spec, args.prompt)
    if {"fid", "kid"} & set(metrics) and not args.reference and not scenes:
        raise ValueError("--metrics fid/kid need --reference FOLDER (images to compare with) for these prompts")
    variants = variants_for(expand_loras(args.lora), multipliers, base=not args.no_base)
    if not variants:
        raise ValueError("nothing to evaluate: give --lora, or leave out --no_base")
    seeds = list(range(args.seeds))
    rows, images = evaluate(args.model, variants, prompts, scenes=scenes, seeds=seeds, steps=args.steps,
                            guidance=args.guidance, size=args.size, metrics=metrics, features=args.features,
                            reference=args.reference, clip_model=args.clip_model)
    out = write_results(args.out, rows, xy_grid(variants, images, prompts, seeds))
    print(table(rows))
    best = best_row(rows)
    if best:
        print(best.describe())
    print(f"wrote {out}/results.csv, results.json and grid.png")
    if len(prompts) * len(seeds) > GRID_ROWS:
        print(f"grid.png shows the first {GRID_ROWS} of the {len(prompts) * len(seeds)} prompt x seed rows "
              f"({len(prompts)} prompts x {len(seeds)} seeds); results.csv and results.json score all of them")
    return 0
