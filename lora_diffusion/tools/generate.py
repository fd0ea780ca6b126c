"""`lora-diffusion generate`: a base model plus LoRA files with multipliers -> images, to check a result by eye.

    lora-diffusion generate --model builtin:tiny --lora output/quickstart/quickstart.safetensors:0.8 \\
        --prompt "toy, a red circle on a blue background" --width 128 --height 128 --out output/generate

Regional prompts (models/regional.py): `--region "a red star on a white background@0,0,0.5,1"` makes that prompt
the one the cross-attention reads inside the box (fractions x0,y0,x1,y1 of the image); repeat for several.
"""

import math
from pathlib import Path

import torch

from lora_diffusion.core.network import load_network
from lora_diffusion.models import load_models
from lora_diffusion.models.checkpoint import PRECISION_DTYPES  # --dtype's names
from lora_diffusion.models.prompts import parse_prompt_line, read_prompts
from lora_diffusion.models.regional import parse_region
from lora_diffusion.models.sampling import sample_images


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`path` or `path:multiplier` (a Windows drive letter is not mistaken for a multiplier, nor is the end of an
    existing file's name). Raises ValueError for a multiplier that is not a finite number."""
    path, sep, multiplier = spec.rpartition(":")
    if not sep or not path or (len(path) == 1 and path.isalpha()) or Path(spec).is_file():
        return spec, 1.0
    try:
        value = float(multiplier)
    except ValueError:
        raise ValueError(f"--lora {spec!r}: the multiplier {multiplier!r} is not a number; expected FILE or "
                         f"FILE:MULTIPLIER, e.g. {path}:0.8") from None
    return path, check_multiplier(value, path)


def check_multiplier(multiplier, path) -> float:
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise ValueError(f"--lora {path}: the multiplier must be a finite number, got {multiplier!r} "
                         f"(nan or inf would make every image black)")
    return float(multiplier)


def generate(model: str, loras: list[tuple[str, float]], prompts: list[dict], out_dir: str, *, merge: bool = False,
             v2: bool | None = None, v_parameterization: bool | None = None, dtype: torch.dtype = torch.float32,
             device: str | None = None, sampler: str = "ddim", clip_skip: int | None = None, seed: int | None = None,
             name: str = "generate", regions=()) -> list[Path]:
    """Images for prompt dicts (see lora_diffusion.training.read_prompts) with the LoRAs applied or merged, and the
    textual-inversion embeddings bundled in their files (A1111's `bundle_emb.*`) added to the tokenizer;
    `regions` (models.regional.Region list) apply to every prompt."""
    for path, multiplier in loras:
        check_multiplier(multiplier, path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = load_models(model, v2=v2, v_parameterization=v_parameterization, dtype=dtype, device=device)
    networks = []
    for path, multiplier in loras:  # embeddings bundled in a file are added to the tokenizer and text encoder
        network = load_network(path, models.unet, models.text_encoders, multiplier=multiplier,
                               tokenizer=models.tokenizers).to(device)
        if merge:
            network.merge()
        networks.append(network)

    def expand_prompt(text):
        for network in networks:
            text = network.expand_prompt(text)
        return text

    return sample_images(models, prompts=prompts, out_dir=out_dir, step=0, output_name=name, device=device,
                         dtype=dtype, sampler=sampler, clip_skip=clip_skip, seed=seed, expand_prompt=expand_prompt,
                         regions=regions)


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="diffusers folder, SD1.x/2.x/SDXL checkpoint, builtin:tiny, "
                        "builtin:tiny-xl or builtin:mini")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:MULTIPLIER]",
                        help="a kohya-format LoRA; repeat for several")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt, with kohya's inline options "
                        "(--n --w --h --d --l --s); repeat for several")
    parser.add_argument("--prompts", help="a prompts file, one prompt a line (as --sample_prompts)")
    parser.add_argument("--region", action="append", default=[], metavar="PROMPT@x0,y0,x1,y1",
                        help="a regional prompt: the cross-attention reads it inside the box (fractions of the "
                        "image from the top left), every prompt the rest; repeat for several")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--negative", default="")
    parser.add_argument("--seed", type=int, default=0, help="prompt i without --d uses seed + i")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--merge", action="store_true", help="bake the LoRAs into the weights (faster)")
    parser.add_argument("--v2", action="store_true")
    parser.add_argument("--v_parameterization", action="store_true")
    parser.add_argument("--clip_skip", type=int)
    parser.add_argument("--dtype", choices=sorted(PRECISION_DTYPES), default="fp32")
    parser.add_argument("--out", default="output/generate")


def run(args) -> int:

    defaults = dict(width=args.width, height=args.height, steps=args.steps, scale=args.scale,
                    negative_prompt=args.negative)
    prompts = [parse_prompt_line(p, **defaults) for p in args.prompt]
    if args.prompts:
        prompts += read_prompts(args.prompts, **defaults)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts file")
    regions = [parse_region(spec) for spec in args.region]
    paths = generate(args.model, [parse_lora_spec(s) for s in args.lora], prompts, args.out, merge=args.merge,
                     v2=args.v2 or None, v_parameterization=args.v_parameterization or None,
                     dtype=PRECISION_DTYPES[args.dtype], sampler=args.sampler, clip_skip=args.clip_skip,
                     seed=args.seed, regions=regions)
    for path in paths:
        print(path)
    return 0
