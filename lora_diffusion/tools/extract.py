"""Extract a LoRA from the difference of a fine-tuned model and its base (kohya's extract_lora_from_models).

    lora-diffusion extract --base sd15.safetensors --tuned dreambooth.safetensors --output extracted.safetensors \\
        --rank 32 --conv_rank 16            # or --threshold 0.95: per module, the rank keeping 95% of the norm

For every weight a LoRA can target (kohya's U-Net transformer modules and the CLIP q/k/v/out/fc layers, SDXL's
both encoders; with --conv_rank also the ResNet and sampler convs), the difference tuned - base is replaced by its
truncated SVD, named as kohya names it (SDXL: SGM U-Net paths, lora_te1 / lora_te2).
The relative error |D - D_r| / |D| of each module is printed. Both models are read one weight at a time.
"""

import re

import torch
from tqdm import tqdm

from lora_diffusion.core.kohya import network_metadata, write_lora_file
from lora_diffusion.core.targets import _TEXT_ENCODER, _UNET_CONV_PARENT, _UNET_TRANSFORMER

from .model_files import (
    TEXT_ENCODERS,
    ModelToolError,
    check_output,
    lora_file_tensors,
    lowrank_factors,
    module_key_name,
    open_model,
    precision,
)
from .resize import dynamic_rank


def targeted(part, key, shape, conv):
    """Whether kohya's LoRA (LoCon with `conv`) targets the weight `key` of shape `shape`."""
    path = key.removesuffix(".weight")
    if part in TEXT_ENCODERS:
        return bool(_TEXT_ENCODER.match(path))
    if part != "unet" or len(shape) not in (2, 4):
        return False
    if _UNET_TRANSFORMER.match(path) and (len(shape) == 2 or shape[2:] == (1, 1)):
        return True
    return bool(conv and _UNET_CONV_PARENT.match(path) and not re.search(r"norm", path))


def extract_lora(base, tuned, output, *, rank=None, conv_rank=None, threshold=None, min_diff=1e-8,
                 dtype=torch.float16, config_dir=None, overwrite=False, extra_tensors=None):
    """Write the LoRA of `tuned` - `base`; returns {module: (rank, relative error)} (modules whose difference is
    below `min_diff` everywhere are left out). `extra_tensors` are written in the same file beside the modules (the
    `bundle_emb.*` token embeddings of a fused model's concepts, see tools/fuse.py)."""
    if not rank and not threshold:
        raise ModelToolError("extract needs --rank or --threshold (a retained Frobenius fraction in (0, 1])")
    if threshold is not None and not 0 < threshold <= 1:
        raise ModelToolError(f"--threshold must be in (0, 1], got {threshold}")
    check_output(output, [base, tuned], overwrite)
    a, b = open_model(base, config_dir=config_dir), open_model(tuned, config_dir=config_dir)
    if a.sdxl != b.sdxl:
        raise ModelToolError(f"{tuned} does not have the architecture of {base}: {b.describe()}, {a.describe()}")
    keys = [k for k, (shape, _) in a.entries.items() if targeted(*k, shape, conv_rank)]
    mismatch = [f"{p}.{k}" for p, k in keys if b.entries.get((p, k), (None,))[0] != a.entries[(p, k)][0]]
    if mismatch:
        raise ModelToolError(f"{tuned} does not have the architecture of {base}: {len(mismatch)} weight(s) differ "
                             f"in shape or are missing (e.g. {', '.join(mismatch[:3])})")
    result, shapes, report = {}, {}, {}
    for part, key in tqdm(keys, desc="extracting", unit="weight"):
        diff = (b.read(part, key).float() - a.read(part, key).float())
        shape = tuple(diff.shape)
        if diff.abs().max() <= min_diff:
            continue
        is_kxk = len(shape) == 4 and shape[2:] != (1, 1)
        cap = (conv_rank if is_kxk else rank) or min(shape[0], diff[0].numel())
        matrix = diff.reshape(shape[0], -1)
        up, down, s = lowrank_factors(matrix, cap)
        if threshold:
            keep = min(dynamic_rank(s, "sv_fro", threshold), cap)
            up, down = up[:, :keep], down[:keep]
        approx = up @ down
        error = float((matrix - approx).norm() / matrix.norm())
        name = module_key_name(a, part, key)
        result[name], shapes[name] = (up, down, 1.0), shape
        report[name] = (down.shape[0], error)
    if not result:
        raise ModelToolError(f"{tuned} and {base} do not differ in any LoRA-targetable weight (above {min_diff})")
    tensors, alpha = lora_file_tensors(result, shapes, dtype)
    tensors.update(extra_tensors or {})
    args = {"conv_dim": conv_rank, "conv_alpha": alpha} if conv_rank else {}
    metadata = network_metadata(rank=rank or max(r for r, _ in report.values()), alpha=alpha, network_args=args,
                                v2=a.v2, sdxl=a.sdxl, output_name=str(output))
    metadata["ss_training_comment"] = f"extracted by lora-diffusion from {tuned} - {base}"
    write_lora_file(str(output), tensors, metadata)
    return report


def add_arguments(parser):
    parser.add_argument("--base", required=True, help="the base model (diffusers folder or single file)")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model, same architecture")
    parser.add_argument("--output", required=True, help="the LoRA .safetensors to write")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of Linear / 1x1 modules (the cap with --threshold)")
    parser.add_argument("--conv_rank", type=int, default=None, help="also extract the 3x3 convs (LoCon), at this rank")
    parser.add_argument("--threshold", type=float, default=None,
                        help="per module, the smallest rank keeping this fraction of the difference's Frobenius norm")
    parser.add_argument("--min_diff", type=float, default=1e-8, help="skip weights whose difference is below this")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16", help="output precision")
    parser.add_argument("--config", default=None, help="configs for single-file models (see `convert --config`)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args):
    report = extract_lora(args.base, args.tuned, args.output, rank=args.rank, conv_rank=args.conv_rank,
                          threshold=args.threshold, min_diff=args.min_diff, dtype=precision(args.precision),
                          config_dir=args.config, overwrite=args.overwrite)
    for name, (rank, error) in report.items():
        print(f"{name:80s} rank {rank:4d}  relative error {error:.2%}")
    errors = torch.tensor([e for _, e in report.values()])
    print(f"wrote {args.output}: {len(report)} module(s), relative error mean {errors.mean():.2%}, "
          f"max {errors.max():.2%}")
    return 0
