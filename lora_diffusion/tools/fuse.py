"""`lora-diffusion fuse`: several concept LoRAs into one model by gradient fusion (Mix-of-Show; the maths in
lora_diffusion/concepts/fusion.py), written as a full diffusers folder and as one kohya LoRA file of the fused
change (by `extract`, at --rank), which loads in diffusers, ComfyUI and A1111 like any LoRA.

    lora-diffusion fuse star.safetensors ring.safetensors --prompts star.txt --prompts ring.txt \\
        --model builtin:mini --out output/fused --rank 16
    # -> output/fused/ (diffusers folder, the concepts' tokens in its tokenizer) and output/fused.safetensors

Each --prompts file (one prompt a line, in the order of the LoRA files) holds the prompts whose layer inputs that
concept must keep, its token in them.
"""

import tempfile
from pathlib import Path

import torch

from lora_diffusion.concepts.fusion import Concept, fuse_concepts
from lora_diffusion.formats.io import build_folder_atomically
from lora_diffusion.models import BUILTIN_MINI, MINI_FOLDER, load_models

from .extract import extract_lora
from .model_files import ModelToolError, bundled_embedding_tensors, check_output, precision, read_loras


def save_diffusers_folder(models, path):
    """The models as a diffusers folder (the family's pipeline's save_pretrained, training noise scheduler),
    written all-or-nothing."""
    pipeline = models.family.pipeline(models, models.noise_scheduler)
    build_folder_atomically(Path(path), lambda staging: pipeline.save_pretrained(staging, safe_serialization=True))
    return Path(path)


def read_prompt_file(path) -> tuple[str, ...]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ModelToolError(f"--prompts {path}: cannot read it ({e.strerror})") from None
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ModelToolError(f"--prompts {path}: no prompts in it (one a line)")
    return prompts


def fuse(model, concept_files, prompt_files, out, *, lora_out=None, rank=16, conv_rank=None, method="closed_form",
         steps=4, size=None, lora_dtype=torch.float16, device="cpu", overwrite=False, say=print):
    """Fuse the concept files into `model`; write the diffusers folder `out` and the LoRA file `lora_out` (default:
    `out` + .safetensors) of fused - base at `rank`. Returns the per-module report of concepts.fusion."""
    if len(prompt_files) != len(concept_files):
        raise ModelToolError(f"fuse needs one --prompts file per concept file: {len(concept_files)} file(s), "
                             f"{len(prompt_files)} --prompts")
    for path in concept_files:
        if not Path(path).is_file():
            raise ModelToolError(f"concept file {path} not found")
    out = Path(out)
    lora_out = Path(lora_out) if lora_out else out.with_name(out.name + ".safetensors")
    check_output(out, [*concept_files, model], overwrite)
    check_output(lora_out, [*concept_files, model], overwrite)
    concepts = [Concept(str(path), read_prompt_file(prompts)) for path, prompts in zip(concept_files, prompt_files)]
    models = load_models(model, device=device)
    with tempfile.TemporaryDirectory(prefix="lora_diffusion_fuse_") as scratch:
        base = shipped_folder(model) or save_diffusers_folder(models, Path(scratch) / "base")
        report = fuse_concepts(models, concepts, method=method, steps=steps, size=size, device=device, say=say)
        save_diffusers_folder(models, out)
        embeddings = bundled_embedding_tensors(read_loras(concept_files), lora_dtype)  # the concepts' tokens
        extract_lora(str(base), str(out), str(lora_out), rank=rank, conv_rank=conv_rank, dtype=lora_dtype,
                     overwrite=True, extra_tensors=embeddings)
    return report


def shipped_folder(model) -> Path | None:
    """The model's own files when they are on disk (a folder or single file given by path; builtin:mini's shipped
    folder), so that the base need not be written out again for extract; None for a model built in memory
    (builtin:tiny's seeded random weights)."""
    if Path(model).exists():
        return Path(model)
    if model == BUILTIN_MINI and (MINI_FOLDER / "model_index.json").is_file():
        return MINI_FOLDER
    return None


def add_arguments(parser):
    parser.add_argument("concepts", nargs="+", metavar="CONCEPT_FILE", help="the concepts' LoRA files")
    parser.add_argument("--prompts", action="append", default=[], required=True, metavar="FILE",
                        help="a concept's prompts, one a line; once per concept file, in their order")
    parser.add_argument("--model", required=True, help="the base model the LoRAs were trained on (diffusers "
                        "folder, single file, builtin:*)")
    parser.add_argument("--out", required=True, help="the fused diffusers folder to write")
    parser.add_argument("--lora_out", help="the fused change as a kohya LoRA file (default: OUT.safetensors)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the fused LoRA file (extract's --rank)")
    parser.add_argument("--conv_rank", type=int, help="also the 3x3 convs in the LoRA file, at this rank")
    parser.add_argument("--method", choices=["closed_form", "lbfgs"], default="closed_form",
                        help="closed_form: the normal equations' exact solution; lbfgs: Mix-of-Show's LBFGS from "
                        "the base weights")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per prompt while recording inputs")
    parser.add_argument("--size", type=int, help="image side while recording (default: the U-Net's own)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16",
                        help="the LoRA file's precision")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args) -> int:
    report = fuse(args.model, args.concepts, args.prompts, args.out, lora_out=args.lora_out, rank=args.rank,
                  conv_rank=args.conv_rank, method=args.method, steps=args.steps, size=args.size,
                  lora_dtype=precision(args.precision), overwrite=args.overwrite)
    errors = torch.tensor([e for values in report.values() for e in values])
    print(f"fused {len(args.concepts)} concept(s) over {len(report)} layer(s): each concept's layer outputs on its "
          f"own inputs within {errors.mean():.2%} on average (worst {errors.max():.2%}); wrote {args.out}")
    return 0
