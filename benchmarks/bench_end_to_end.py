"""End to end: train_lora.py against a diffusers-style loop on the same model folder (fp32 safetensors, random
weights), the same captioned images and the same number of steps. SD1.5's architecture against
diffusers_style_train.py (train_text_to_image_lora.py), or with --family sdxl SDXL base's against
diffusers_sdxl_style_train.py (train_text_to_image_lora_sdxl.py).

    python benchmarks/bench_end_to_end.py --json e2e.json                  # 256 px, rank 16, bf16, 8 images, 16 steps
    python benchmarks/bench_end_to_end.py --steps 8 --repeats 1 --runs ours diffusers
    python benchmarks/bench_end_to_end.py --family sdxl --resolution 512 --steps 6 --repeats 1
    python benchmarks/bench_end_to_end.py --quick [--family sdxl]          # tiny model folder
    python benchmarks/bench_end_to_end.py --breakdown --steps 12           # where ours' step time goes

--breakdown runs train_lora.py (the "ours+cache" flags) in one process with timers around the loop's pieces: the
U-Net forward, the rest of compute_loss (noise, timesteps, text states, the loss), the backward, the optimizer step
and after_step (logs, saving); "other" is the step's wall time less those (the loader, the loss check). Steps after
the first, median of each piece: the shares are from one process, so a busy machine slows all of them alike.

Every run is its own process (python start, imports, model loading, the loop, saving): the wall time is measured
from outside, the peak memory is that process's max RSS (os.wait4), so the runs never share memory. Runs alternate
A B C D A B C D. U-Net only, no workers (--max_data_loader_n_workers 0 and the example's dataloader_num_workers=0).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RUNS = {  # name -> (script, extra flags)
    "ours": ("train_lora.py", ["--no_cache_latents"]),
    "ours+cache": ("train_lora.py", ["--cache_latents"]),
    "diffusers": ("benchmarks/diffusers_style_train.py", []),
    "diffusers+cache": ("benchmarks/diffusers_style_train.py", ["--cache_latents"]),
}
SDXL_BASELINE = "benchmarks/diffusers_sdxl_style_train.py"  # the example has no latent cache: no diffusers+cache


def command(name, args, model, data, out_dir):
    script, extra = RUNS[name]
    if args.family == "sdxl" and script != "train_lora.py":
        script = SDXL_BASELINE
    if script == "train_lora.py":
        flags = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
                 "--resolution", str(args.resolution), "--network_dim", str(args.rank), "--network_alpha",
                 str(args.rank), "--network_train_unet_only", "--mixed_precision", args.mixed_precision,
                 "--max_train_steps", str(args.steps), "--train_batch_size", "1", "--output_dir", str(out_dir),
                 "--max_data_loader_n_workers", "0", "--overwrite"] + args.ours_flags  # repeats share out_dir
        if args.family == "sdxl":
            flags += ["--cache_text_encoder_outputs"]  # kohya's SDXL recipe; the captions are fixed
    else:
        flags = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
                 "--resolution", str(args.resolution), "--rank", str(args.rank), "--mixed_precision",
                 args.mixed_precision, "--max_train_steps", str(args.steps), "--targets", args.targets,
                 "--threads", str(args.threads)]
    return [sys.executable, str(common.ROOT / script)] + flags + extra


def run_measured(cmd, threads) -> dict:
    """Run `cmd` in its own process; wall seconds, its max RSS, and the 'done: N steps in X s' it printed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        with common.child(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT, env=env) as process:
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - start
            process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({process.returncode}):\n{text[-3000:]}")
    done = re.search(r"done: (\d+) steps in ([\d.]+)\s*s", text)
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "steps": int(done.group(1)),
            "loop_s": float(done.group(2)), "cpu_s": usage.ru_utime + usage.ru_stime}


PIECES = ["unet_forward", "compute_loss", "backward", "optimizer_step", "after_step"]


def timed_training(train_args: list[str]) -> dict:
    """train_lora.py's main(train_args) in this process with a timer around each piece of the step (the loop looks
    its functions up when it calls them); the seconds of each piece per step, the first step left out."""
    import accelerate

    from lora_diffusion.models.family import ModelFamily
    from lora_diffusion.training import loop, trainer

    seconds = {name: [] for name in PIECES}
    step_ends = []

    def wrap(owner, attribute, name):
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[name].append(time.perf_counter() - start)
                if name == "after_step":
                    step_ends.append(time.perf_counter())
        setattr(owner, attribute, timed)

    wrap(ModelFamily, "call_unet", "unet_forward")
    wrap(loop, "compute_loss", "compute_loss")
    wrap(accelerate.Accelerator, "backward", "backward")
    wrap(loop, "optimizer_step", "optimizer_step")
    wrap(loop, "after_step", "after_step")
    if trainer.main(train_args) != 0:
        raise SystemExit("train_lora.py failed")
    steps = len(step_ends)
    pieces = {name: values[1:steps] for name, values in seconds.items()}  # step 2 onwards, as the walls
    pieces["compute_loss"] = [c - u for c, u in zip(pieces["compute_loss"], pieces["unet_forward"])]  # the rest
    pieces["step"] = [b - a for a, b in zip(step_ends, step_ends[1:])]
    pieces["other"] = [wall - sum(pieces[name][i] for name in PIECES) for i, wall in enumerate(pieces["step"])]
    per_step = {name: common.median(values) for name, values in pieces.items()}
    return {"steps": steps, "per_step": per_step, "pieces": pieces}


def breakdown(args, model, data, out_dir) -> dict:
    flags = command("ours+cache", args, model, data, out_dir)[2:]
    env_threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=env_threads, MKL_NUM_THREADS=env_threads)
    common.set_threads(args.threads)
    result = timed_training(flags)
    shares = result["per_step"]
    common.print_table(
        f"Where a step of train_lora.py goes: {args.family}, {args.resolution} px, rank {args.rank}, "
        f"{args.mixed_precision}, {args.threads} threads, median of steps 2-{result['steps']} (load "
        f"{common.loadavg():.2f} at the end)",
        ["piece", "s/step", "share of the step"],
        [[name, shares[name], shares[name] / shares["step"]] for name in ["step", *PIECES, "other"]])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model folder (a smoke test)")
    parser.add_argument("--family", choices=["v1", "sdxl"], default="v1", help="SD1.5's or SDXL base's architecture")
    parser.add_argument("--runs", nargs="+", default=None, choices=list(RUNS))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--mixed_precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--targets", default="kohya", choices=["kohya", "diffusers"], help="the baseline's targets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ours_flags", nargs=argparse.REMAINDER, default=[],
                        help="more train_lora.py flags (last on the line)")
    parser.add_argument("--breakdown", action="store_true", help="ours' step, piece by piece, in this process")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.breakdown:
        if args.quick:
            args.resolution, args.steps = min(args.resolution, 64), min(args.steps, 4)
        model = (common.sdxl_diffusers_folder if args.family == "sdxl" else common.sd15_diffusers_folder)(args.quick)
        with tempfile.TemporaryDirectory() as temp:
            data = common.make_captioned_images(Path(temp) / "data", args.images, size=args.resolution)
            result = breakdown(args, model, data, Path(temp) / "out")
        common.write_json(args.json, {"benchmark": "end_to_end_breakdown", "machine": common.machine(),
                                      "family": args.family, "resolution": args.resolution, "rank": args.rank,
                                      "mixed_precision": args.mixed_precision, "steps": args.steps, **result})
        return result
    if args.runs is None:
        args.runs = ["ours", "ours+cache", "diffusers"] + (["diffusers+cache"] if args.family == "v1" else [])
    if args.family == "sdxl" and "diffusers+cache" in args.runs:
        parser.error("--runs diffusers+cache: the SDXL example has no latent cache")
    if args.quick:
        args.resolution, args.steps, args.repeats = min(args.resolution, 64), min(args.steps, 4), 1

    model = (common.sdxl_diffusers_folder if args.family == "sdxl" else common.sd15_diffusers_folder)(quick=args.quick)
    start_load, busy = common.loadavg(), common.other_busy_processes()
    with tempfile.TemporaryDirectory() as temp:
        data = common.make_captioned_images(Path(temp) / "data", args.images, size=args.resolution)
        runs = {name: (lambda n=name: run_measured(command(n, args, model, data, Path(temp) / f"out-{n}"),
                                                   args.threads)) for name in args.runs}
        results = common.alternate(runs, args.repeats, warmup=0)

    rows = {}
    for name in args.runs:
        runs_ = results[name]
        rows[name] = {"runs": runs_, "wall_s": common.median([r["wall_s"] for r in runs_]),
                      "loop_s": common.median([r["loop_s"] for r in runs_]),
                      "peak_rss": max(r["peak_rss"] for r in runs_), "steps": runs_[0]["steps"]}
        rows[name]["wall_per_step"] = rows[name]["wall_s"] / rows[name]["steps"]
        rows[name]["images_per_s"] = rows[name]["steps"] / rows[name]["wall_s"]
        rows[name]["loop_per_step"] = rows[name]["loop_s"] / rows[name]["steps"]
    ref_name = "diffusers" if "diffusers" in rows else args.runs[-1]
    ref = rows[ref_name]
    table = [[name, r["wall_s"], r["wall_per_step"], r["images_per_s"], r["loop_per_step"], common.gib(r["peak_rss"]),
              r["wall_s"] / ref["wall_s"], r["loop_s"] / ref["loop_s"], r["peak_rss"] / ref["peak_rss"]]
             for name, r in rows.items()]
    model_name = {"v1": "SD1.5", "sdxl": "SDXL-base"}[args.family] + "-architecture (fp32 safetensors folder)"
    model_name = f"tiny {args.family}" if args.quick else model_name
    common.print_table(
        f"End to end, {model_name}, {args.resolution} px, {args.images} images, {args.steps} steps, batch 1, rank "
        f"{args.rank}, {args.mixed_precision}, U-Net only, baseline targets {args.targets}; median of {args.repeats}; "
        f"load {start_load:.2f} at start, {min(results['_load']):.2f}-{max(results['_load']):.2f} during",
        ["run", "wall s", "wall s/step", "images/s", "loop s/step", "peak RSS GiB", "wall / ref", "loop / ref",
         "peak / ref"], table)
    print(f"ref = {ref_name}; wall = process start to exit (imports, loading, loop, saving); loop = the training "
          f"loop as each script reports it")
    common.write_json(args.json, {"benchmark": "end_to_end", "family": args.family, "machine": common.machine(),
                                  "quick": args.quick,
                                  "model": str(model), "resolution": args.resolution, "rank": args.rank,
                                  "mixed_precision": args.mixed_precision, "steps": args.steps,
                                  "images": args.images, "targets": args.targets, "ours_flags": args.ours_flags,
                                  "load_start": start_load, "load_during": results["_load"], "busy_processes": busy,
                                  "results": rows})
    return rows


if __name__ == "__main__":
    main()
