"""Judge star LoRAs on builtin:mini as benchmarks/bench_quality.py does: each file loaded by diffusers'
load_lora_weights, 32 star prompts in the eight held-out colour pairs (the star rate: shape right; and all three
right) and 32 circle/square/triangle prompts in the same pairs (the prior kept), against the base model.

    python examples/three_captions/judge.py "quickstart=output/three_captions/quickstart/quickstart.safetensors" \\
        "three sets=output/three_captions/lora/three_captions.safetensors" --threads 1
"""

import argparse
from pathlib import Path

import torch

from lora_diffusion.world import quality

ROOT = Path(__file__).resolve().parents[2]


def judge(pipe, file, n):
    if file is not None:
        from safetensors.torch import load_file

        pipe.load_lora_weights(load_file(file), adapter_name="judged")
    stars, _ = quality.judge_prompts(pipe, quality.held_out_scenes(n, shapes=("star",)), seed=1000)
    prior, _ = quality.judge_prompts(pipe, quality.held_out_scenes(n), seed=2000)
    if file is not None:
        pipe.unload_lora_weights()
    return {"star rate": stars["shape"], "star, all right": stars["all"], "prior all right": prior["all"],
            "prior shape": prior["shape"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loras", nargs="+", help="NAME=FILE")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ROOT / "lora_diffusion" / "assets" / "mini", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows = [("base model, no LoRA", judge(pipe, None, args.images))]
    for spec in args.loras:
        name, _, file = spec.rpartition("=")
        rows.append((name or Path(file).stem, judge(pipe, file, args.images)))
    keys = list(rows[0][1])
    print("| LoRA | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, result in rows:
        print(f"| {name} | " + " | ".join(f"{result[k]:.0%}" for k in keys) + " |")


if __name__ == "__main__":
    main()
