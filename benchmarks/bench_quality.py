"""Quality of a star LoRA on builtin:mini, judged on generated images (never the training loss).

    python benchmarks/bench_quality.py                       # every variant, about an hour on 2 CPU cores
    python benchmarks/bench_quality.py --variants ours,diffusers --steps 300 --json quality.json
    python benchmarks/bench_quality.py --quick               # seconds: a smoke run of the machinery

The data: the quickstart's 16 large, centred star images (60-75 % of the side; each colour twice as the star and
twice as the background) in the kohya layout (`10_star/`), captions in the world's grammar, colour pairs the
evaluation never asks for; 160 regularization images of circles, squares and triangles for the reg variants.
Each variant trains for --steps at batch 4 and saves a LoRA at every quarter; each file is loaded with diffusers'
own `load_lora_weights` into `StableDiffusionPipeline.from_pretrained(builtin:mini)` and judged by
lora_diffusion.world.judge on
- star prompts in the eight held-out colour pairs: the star rate (shape right) and all attributes right;
- circle/square/triangle prompts in the same pairs: the prior kept, against the base model without a LoRA.
Variants (names for --variants): ours (train_lora.py, LoRA rank 16, text encoder on), diffusers (the
diffusers-example loop of benchmarks/diffusers_style_train.py, U-Net LoRA rank 16 as the example trains), rank4,
locon (conv_dim 16, conv_alpha 8), reg (locon with the regularization images, kohya's noise targets), reg_base
(locon with the regularization images learning the base model's prediction: --reg_target base_model), unet_only
(no text-encoder LoRA), pivotal (captions say `sks` for the star: a new token whose 2 vectors train with the
LoRA, textual inversion + LoRA), block_lr (ours with kohya's down/mid/up_lr_weight), loraplus (ours with
loraplus_lr_ratio=4), one_background (locon on sixteen stars all on a white background, captioned by the subject
alone: `a red star`) and masked_loss (the same with --masked_loss, each star's shape its mask in kohya's
--conditioning_data_dir layout): star prompts are also judged for their background (the "star bg" column), which a
LoRA trained on one backdrop makes that colour.
Configs (names for --variants, not in the default set): quickstart (examples/quickstart/config.toml, the README's
main job, trained exactly as the README runs it: only the output folder moves; its files are judged at the epochs
it saves, and --steps, --lr and --lr_scheduler do not apply), keep_prior (examples/quickstart/keep_prior.toml);
--config PATH [PATH ...] trains other TOMLs of flags in their place, one run each, named after the file:
    python benchmarks/bench_quality.py --variants quickstart --images 32 --threads 1
    python benchmarks/bench_quality.py --variants quickstart --config a.toml b.toml --images 32 --threads 1
Each training run's wall and CPU seconds are printed (on a busy machine the CPU seconds are the comparable figure).
Equal wall-clock: each file's training time is recorded, so ours and diffusers are compared at equal steps and at
the file closest to equal seconds.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from lora_diffusion import world  # noqa: E402
from lora_diffusion.world import quality  # noqa: E402

TOKEN = "sks"  # pivotal tuning: a new token in the captions, in place of the word "star"
LOCON = ["--network_args", "conv_dim=16", "conv_alpha=8"]
VARIANTS = {
    "ours": [],
    "rank4": ["--network_dim", "4", "--network_alpha", "2"],
    "locon": LOCON,
    "reg": LOCON + ["REG"],
    "reg_base": LOCON + ["REG", "--reg_target", "base_model"],
    "unet_only": ["--network_train_unet_only"],
    "pivotal": ["PIVOTAL", "--token_string", TOKEN, "--init_word", "star", "--num_vectors_per_token", "2",
                "--embedding_lr", "5e-3"],
    "diffusers": None,
    # kohya's block-wise learning rates against `ours`: the deep, low-resolution blocks (where the outline is
    # decided) at up to 1.5x the lr, the outer ones at 0.5x
    "block_lr": ["--network_args", "down_lr_weight=sine+.5", "mid_lr_weight=1.5", "up_lr_weight=cosine+.5"],
    "loraplus": ["--network_args", "loraplus_lr_ratio=4"],  # LoRA+ against `ours`: lora_up at 4x the lr
    # masked loss: stars on one background colour (ONE_BACKGROUND), without and with the shape as the loss mask
    "one_background": LOCON + ["ONE_BACKGROUND"],
    "masked_loss": LOCON + ["ONE_BACKGROUND", "MASKED", "--masked_loss"],
}
ONE_BACKGROUND = "white"  # every training star of the masked-loss variants lies on it
# The examples' configs, trained exactly as a user runs them (only the output folder moves): their files are judged
# at the epochs the config saves; --steps, --lr and --lr_scheduler do not apply. --config replaces the TOML.
CONFIGS = {"quickstart": ROOT / "examples" / "quickstart" / "config.toml",
           "keep_prior": ROOT / "examples" / "quickstart" / "keep_prior.toml"}


def make_data(root: Path, seed=0):
    stars = quickstart_stars(seed)
    world.write_images(root / "train" / "10_star", stars)
    world.write_images(root / "pivotal" / "10_star", stars)
    for caption in (root / "pivotal" / "10_star").glob("*.txt"):
        caption.write_text(caption.read_text().replace(" star ", f" {TOKEN} "))
    world.write_images(root / "reg" / "1_shapes", quickstart_reg(seed + 1))
    one_background = one_background_stars(seed)
    world.write_images(root / "one_background" / "10_star", one_background)
    for scene, caption in zip(one_background, sorted((root / "one_background" / "10_star").glob("*.txt"))):
        caption.write_text(f"a {scene.color} {scene.shape}\n")  # the subject only, as a product shot is captioned
    write_masks(root / "masks" / "10_star", one_background)
    return root / "train", root / "reg"


def one_background_stars(seed=0):
    """Sixteen stars as the quickstart's (large, centred, upright) in the seven other colours, all on
    ONE_BACKGROUND: what a masked loss is for (product shots on one backdrop, captioned by their subject)."""
    rng = random.Random(seed)
    colors = [c for c in world.COLORS if c != ONE_BACKGROUND]
    return [world.Scene("star", colors[i % len(colors)], ONE_BACKGROUND, size=rng.uniform(0.6, 0.75))
            for i in range(16)]


def write_masks(folder: Path, scenes, size=64, supersample=4):
    """kohya's --conditioning_data_dir masks: per image, a picture of the same stem whose red channel is 255 on
    the shape and 0 on the background (anti-aliased as world.render draws the shape)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        big = Image.new("RGB", (size * supersample, size * supersample), "black")
        outline = world.outline(scene, size * supersample)
        draw = ImageDraw.Draw(big)
        (draw.ellipse if scene.shape == "circle" else draw.polygon)(outline, fill="white")
        big.resize((size, size), Image.Resampling.BOX).save(folder / f"{i:02d}_{scene.color}_{scene.shape}.png")


def quickstart_stars(seed=0):
    """The sixteen stars of examples/quickstart: large, centred and upright (at 64 px a small star's points fall
    inside one 8x8-pixel latent cell), each colour twice as the star and twice as the background (pairs c -> c+1
    and c -> c+2 round the palette; the held-out pairs are c -> c+3), so that no colour is rare in the data."""
    rng = random.Random(seed)
    colors = world.COLORS
    pairs = [(colors[i], colors[(i + k) % len(colors)]) for k in (1, 2) for i in range(len(colors))]
    return [world.Scene("star", color, background, size=rng.uniform(0.6, 0.75)) for color, background in pairs]


def quickstart_reg(seed=1):
    """The 160 regularization images of examples/quickstart/reg/1_shapes: circles, squares and triangles in the
    colour pairs builtin:mini was pretrained on, as the world samples them."""
    rng = random.Random(seed)
    return [world.sample_scene(rng) for _ in range(160)]


def train_ours(name, extra, train_dir, reg_dir, out, steps, lr, threads, lr_scheduler="constant", checkpoints=4):
    save_every = max(1, steps // checkpoints)
    cmd = [sys.executable, str(ROOT / "train_lora.py"), "--pretrained_model_name_or_path", "builtin:mini",
           "--train_data_dir", str(train_dir), "--resolution", "64", "--train_batch_size", "4",
           "--network_dim", "16", "--network_alpha", "8", "--unet_lr", str(lr), "--text_encoder_lr", str(lr / 2),
           "--lr_scheduler", lr_scheduler, "--max_train_steps", str(steps), "--save_every_n_steps", str(save_every),
           "--output_dir", str(out), "--output_name", name, "--seed", "42", "--save_precision", "fp16"]
    for flag in extra:
        if flag in ("PIVOTAL", "ONE_BACKGROUND"):
            cmd[cmd.index("--train_data_dir") + 1] = str(train_dir.parent / flag.lower())
        elif flag == "MASKED":
            cmd += ["--conditioning_data_dir", str(train_dir.parent / "masks")]
        else:
            cmd += ["--reg_data_dir", str(reg_dir)] if flag == "REG" else [flag]
    return run_timed(cmd, out, threads)


def train_config(name, config, out, threads):
    """train_lora.py --config_file CONFIG as the README runs it, from the repository root, writing into `out`."""
    cmd = [sys.executable, str(ROOT / "train_lora.py"), "--config_file", str(config), "--output_dir", str(out),
           "--output_name", name, "--logging_dir", str(out / "logs"), "--overwrite"]
    return run_timed(cmd, out, threads)


def train_diffusers(train_dir, out, steps, lr, threads):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "diffusers_style_train.py"), "--pretrained_model_name_or_path",
           str(ROOT / "lora_diffusion" / "assets" / "mini"), "--train_data_dir", str(train_dir), "--resolution", "64",
           "--rank", "16", "--mixed_precision", "no", "--learning_rate", str(lr), "--train_batch_size", "4",
           "--max_train_steps", str(steps), "--save_every_n_steps", str(max(1, steps // 4)), "--output_dir", str(out),
           "--threads", str(threads)]
    return run_timed(cmd, out, threads)


def run_timed(cmd, out, threads):
    """Run a trainer; return [(file, steps, seconds since start)] for the LoRA files it wrote, in order. The run's
    wall and CPU seconds (user + system of the trainer and its children) are printed: on a busy machine the CPU
    seconds are the comparable figure."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), LORA_DIFFUSION_THREADS=str(threads))
    start, cpu_start = time.time(), cpu_of_children()
    seen, files = {p for p in out.glob("*_emb.safetensors")}, []
    # the log is a file, not a pipe: an unread pipe fills up and stalls the trainer
    with open(out / "train.log", "w+") as log, common.child(cmd, cwd=ROOT, env=env, stdout=log,
                                                              stderr=subprocess.STDOUT, text=True) as process:
        while process.poll() is None:
            time.sleep(0.2)
            for path in sorted(out.glob("*.safetensors")):
                if path.name.endswith("_emb.safetensors"):
                    continue
                if path not in seen:
                    seen.add(path)
                    files.append([path, time.time() - start])
        log.seek(0)
        output = log.read()
    if process.returncode:
        raise SystemExit(f"{cmd[1]} failed:\n{output[-3000:]}")
    RUN_TIMES[str(out)] = {"wall_s": round(time.time() - start, 1), "cpu_s": round(cpu_of_children() - cpu_start, 1)}
    print(f"{out.name}: trained in {RUN_TIMES[str(out)]['wall_s']:.0f} s wall, "
          f"{RUN_TIMES[str(out)]['cpu_s']:.0f} s CPU ({threads} thread(s))", flush=True)
    for path in sorted(out.glob("*.safetensors")):
        if path not in seen and not path.name.endswith("_emb.safetensors"):
            files.append([path, time.time() - start])
    rows = [(path, step_of(path), seconds) for path, seconds in files]
    last_step = max((step for _, step, _ in rows if step is not None), default=None)
    # the final file repeats the last step's file when --steps is a multiple of the saving interval (ours say
    # their step in the metadata: a later file of the same step is the same weights)
    rows = [row for i, row in enumerate(rows) if row[1] is None or all(r[1] != row[1] for r in rows[:i])]
    return [row for row in rows if not (row[1] is None and last_step is not None and len(rows) > 1
                                        and any(r[1] == last_step for r in rows))] or rows


RUN_TIMES = {}  # output folder -> the training run's wall and CPU seconds


def cpu_of_children():
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def step_of(path):
    """The step in `<name>-step00000225` (ours) or `diffusers-000225` (the diffusers loop); None for a final file."""
    import re

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # ours write the step they were saved at (epoch files too)
        steps = (f.metadata() or {}).get("ss_steps")
    if steps is not None:
        return int(steps)
    match = re.search(r"-(?:step)?0*(\d+)$", path.stem)
    return int(match[1]) if match else None


def evaluate(pipe, file, n):
    """Judge star prompts and prior prompts with a LoRA file loaded by diffusers (its bundled embedding, if any,
    through load_textual_inversion: diffusers' LoRA loader takes only the LoRA keys)."""
    prompt = world.caption
    if file is not None:
        from safetensors.torch import load_file

        tensors = load_file(file)
        bundled = [v for k, v in tensors.items() if k.startswith("bundle_emb.")]
        if bundled:
            pipe.load_textual_inversion({"emb_params": bundled[0]}, token=TOKEN)
            prompt = lambda scene: world.caption(scene).replace(" star ", f" {TOKEN} ")  # noqa: E731
        pipe.load_lora_weights({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")},
                               adapter_name="judged")
    star_scenes = quality.held_out_scenes(n, shapes=("star",))
    stars, star_images = quality.judge_prompts(pipe, star_scenes, seed=1000, prompt=prompt)
    prior, _ = quality.judge_prompts(pipe, quality.held_out_scenes(n), seed=2000)
    if file is not None:
        pipe.unload_lora_weights()
        if prompt is not world.caption:
            pipe.unload_textual_inversion()
    return {"star_rate": stars["shape"], "star_all": stars["all"], "star_background": stars["background"],
            "star_on_one_background": on_one_background(star_images, star_scenes), "prior_all": prior["all"],
            "prior_shape": prior["shape"]}


def on_one_background(images, scenes):
    """Share of the images whose prompt asks for another background that the judge finds on ONE_BACKGROUND: the
    masked-loss variants' training backdrop leaking into what is drawn."""
    asked_other = [(image, scene) for image, scene in zip(images, scenes) if scene.background != ONE_BACKGROUND]
    return sum(world.judge(image)[2] == ONE_BACKGROUND for image, _ in asked_other) / max(1, len(asked_other))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"of {', '.join(VARIANTS)} (default: all of these), and the configs {', '.join(CONFIGS)}")
    p.add_argument("--config", type=Path, nargs="+",
                   help="TOMLs of train_lora.py flags that a config variant trains in its place, one run each, named "
                        "after the file")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--lr", type=float, default=2e-3, help="U-Net lr (the text encoder's is half)")
    p.add_argument("--images", type=int, default=24, help="images per prompt set and file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr_scheduler", default="constant", help="for train_lora.py's variants")
    p.add_argument("--checkpoints", type=int, default=4,
                   help="LoRA files saved and judged per run of train_lora.py's variants, evenly spaced")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 steps, 2 variants, 4 images")
    p.add_argument("--json", type=Path)
    p.add_argument("--grid", type=Path, help="write a base-vs-LoRA picture grid (prompts x seeds) here")
    p.add_argument("--grid_variant", default="locon", help="the variant whose last file the grid shows")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.images, args.variants = 8, 4, "ours,diffusers"
    common.set_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    mini = ROOT / "lora_diffusion" / "assets" / "mini"
    pipe = StableDiffusionPipeline.from_pretrained(mini, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    results = {"base": {"steps": 0, "seconds": 0.0, **evaluate(pipe, None, args.images)}}
    print("base:", results["base"], flush=True)
    runs = planned_runs(args.variants.split(","), args.config)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, reg_dir = make_data(Path(tmp))
        for name, config in runs:
            out = Path(tmp) / name
            if config is not None:
                files = train_config(name, config, out, args.threads)
            elif VARIANTS[name] is None:
                files = train_diffusers(train_dir, out, args.steps, args.lr, args.threads)
            else:
                files = train_ours(name, VARIANTS[name], train_dir, reg_dir, out, args.steps, args.lr, args.threads,
                                   args.lr_scheduler, args.checkpoints)
            rows = []
            for path, step, seconds in files:
                step = step if step is not None else args.steps
                rows.append({"steps": step, "seconds": round(seconds, 1), **evaluate(pipe, path, args.images)})
                print(f"{name} step {step} ({seconds:.0f}s):", rows[-1], flush=True)
            results[name] = rows
            results.setdefault("run_times", {})[name] = RUN_TIMES.get(str(out))
            if args.grid and name == args.grid_variant:
                write_grid(pipe, files[-1][0], args.grid)
    table = [["base", 0, 0, *fmt_row(results["base"])]]
    for name, _ in runs:
        table += [[name, r["steps"], r["seconds"], *fmt_row(r)] for r in results[name]]
    common.print_table("star LoRA on builtin:mini, judged (held-out colour pairs)",
                       ["variant", "steps", "train s", "star rate", "star all", "star bg", "star on white", "prior all",
                        "prior shape"],
                       table)
    for name, times in results.get("run_times", {}).items():
        if times:
            print(f"{name}: training run {times['wall_s']:.0f} s wall, {times['cpu_s']:.0f} s CPU")
    if args.json:
        common.write_json(args.json, {"results": results, "settings": vars(args) | {"json": str(args.json)}})


def planned_runs(variants, configs=None):
    """[(run name, its TOML or None)] for --variants: a config variant with --config is one run per file, named
    after it."""
    runs = []
    for name in variants:
        if name not in VARIANTS and name not in CONFIGS:
            raise SystemExit(f"--variants: unknown {name!r}; choose from {', '.join([*VARIANTS, *CONFIGS])}")
        if name in CONFIGS:
            runs += [(path.stem, path) for path in configs] if configs else [(name, CONFIGS[name])]
        else:
            runs.append((name, None))
    names = [name for name, _ in runs]
    if len(set(names)) < len(names):
        raise SystemExit(f"--variants/--config: two runs named alike in {', '.join(names)}; rename a --config file")
    return runs


def fmt_row(r):
    return [f"{r[k]:.0%}" for k in ("star_rate", "star_all", "star_background", "star_on_one_background",
                                            "prior_all", "prior_shape")]


def write_grid(pipe, file, path, seeds=(1, 2, 3, 4)):
    """Rows: star prompts in held-out colour pairs; columns: the base model's seeds, then the LoRA's."""
    scenes = quality.held_out_scenes(4, shapes=("star",))
    rows = {}
    for lora in (None, file):
        if lora is not None:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="pictured")
        for scene in scenes:
            rows.setdefault(scene, [])
            rows[scene] += [quality.judge_prompts(pipe, [scene], seed=seed)[1][0] for seed in seeds]
        if lora is not None:
            pipe.unload_lora_weights()
    images = [image for scene in scenes for image in rows[scene]]
    labels = [f"base s{s}" for s in seeds] + [f"LoRA s{s}" for s in seeds]
    quality.grid(images, columns=2 * len(seeds), labels=labels).save(path)


if __name__ == "__main__":
    main()
