"""Resize a LoRA to a lower rank by SVD, to a fixed rank or with kohya's dynamic methods.

    lora-diffusion resize my_lora.safetensors small.safetensors --rank 8
    lora-diffusion resize my_lora.safetensors dyn.safetensors --rank 32 --dynamic sv_fro --dynamic_param 0.9

Each module's update alpha/rank * up @ down is replaced by its best rank-r approximation (the truncated SVD,
optimal in the Frobenius and spectral norms). Dynamic methods choose r per module (capped at --rank), as kohya's
networks/resize_lora.py: `sv_ratio` keeps singular values above the largest / param; `sv_cumulative` the fewest
whose sum reaches param of the total; `sv_fro` the fewest whose squares reach param**2 of the total (i.e. a
retained Frobenius norm of param). The retained Frobenius fraction of each module is reported.
"""

import torch
from tqdm import tqdm

from lora_diffusion.core.kohya import network_metadata, write_lora_file

from .merge import only_plain_lora
from .model_files import (
    ModelToolError,
    bundled_embedding_tensors,
    check_output,
    factored_svd,
    is_sdxl_lora,
    lora_file_tensors,
    precision,
    read_loras,
)

METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")
MIN_SV = 1e-6  # kohya: a module whose largest singular value is below this is zero, kept at rank 1


def dynamic_rank(s, method, param):
    """kohya's index_sv_* + 1: the rank a dynamic method keeps for singular values `s` (descending)."""
    if method == "sv_ratio":
        index = int((s > s[0] / param).sum()) - 1
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(float(param))))
    elif method == "sv_fro":
        squares = s.square()
        index = int(torch.searchsorted(torch.cumsum(squares, 0) / squares.sum(), torch.tensor(float(param) ** 2)))
    else:
        raise ModelToolError(f"--dynamic {method!r} is not one of {', '.join(METHODS)}")
    return max(0, min(index, len(s) - 1)) + 1


def resize_lora(source, output, *, rank, conv_rank=None, dynamic=None, dynamic_param=None, dtype=torch.float16,
                overwrite=False):
    """Write `source` resized; returns {module: (old rank, new rank, retained Frobenius fraction)}."""
    if rank is None or rank < 1:
        raise ModelToolError(f"--rank must be a positive integer (the new rank, or the cap of --dynamic), got {rank}")
    if dynamic and (dynamic_param is None or not dynamic_param > 0):
        raise ModelToolError(f"--dynamic {dynamic} needs a positive --dynamic_param, got {dynamic_param}")
    check_output(output, [source], overwrite)
    (path, _, modules, metadata), = read_loras([source])
    only_plain_lora([(path, 1.0, modules, metadata)], "resize")
    result, shapes, report = {}, {}, {}
    for name, w in tqdm(sorted(modules.items()), desc="resizing", unit="module", leave=False):
        shape = tuple(w.up.shape[:1]) + tuple(w.down.shape[1:])
        is_kxk = len(shape) == 4 and shape[2:] != (1, 1)
        cap = (conv_rank or rank) if is_kxk else rank
        u, s, vh = factored_svd(w.up.flatten(1), w.down.flatten(1))
        new = dynamic_rank(s, dynamic, dynamic_param) if dynamic else cap
        new = 1 if s[0] <= MIN_SV else min(new, cap, w.rank)
        scale = w.alpha / w.rank
        result[name] = (u[:, :new] * s[:new], vh[:new], scale)
        shapes[name] = shape
        retained = float(s[:new].square().sum() / s.square().sum().clamp_min(1e-30)) ** 0.5
        report[name] = (w.rank, new, retained)
    tensors, alpha = lora_file_tensors(result, shapes, dtype, sdxl=is_sdxl_lora(modules, metadata))
    tensors.update(bundled_embedding_tensors([(path, 1.0, modules, metadata)], dtype))  # kept as they are
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    old = max(r for r, _, _ in report.values())
    metadata.update({k: v for k, v in network_metadata(rank=rank, alpha=alpha, output_name=str(output)).items()
                     if k in ("ss_network_dim", "ss_network_alpha", "ss_output_name") or k not in metadata})
    if dynamic:
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
        comment = f"Dynamic resize with {dynamic}: {dynamic_param} from {old}"
    else:
        comment = f"dimension is resized from {old} to {rank}"
    metadata["ss_training_comment"] = f"{comment}; {metadata.get('ss_training_comment', '')}"
    write_lora_file(str(output), tensors, metadata)
    return report


def add_arguments(parser):
    parser.add_argument("source", help="a kohya-format LoRA/LoCon .safetensors")
    parser.add_argument("output", help="the resized .safetensors")
    parser.add_argument("--rank", type=int, required=True, help="new rank (with --dynamic: the largest allowed)")
    parser.add_argument("--conv_rank", type=int, default=None, help="new rank of 3x3 conv modules (default --rank)")
    parser.add_argument("--dynamic", choices=METHODS, default=None, help="choose each module's rank (kohya's methods)")
    parser.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16", help="output precision")
    parser.add_argument("--verbose", action="store_true", help="print every module's rank and retained energy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args):
    report = resize_lora(args.source, args.output, rank=args.rank, conv_rank=args.conv_rank, dynamic=args.dynamic,
                         dynamic_param=args.dynamic_param, dtype=precision(args.precision), overwrite=args.overwrite)
    for name, (old, new, retained) in report.items():
        if args.verbose:
            print(f"{name:80s} rank {old} -> {new}, Frobenius norm retained {retained:.1%}")
    fractions = torch.tensor([r for _, _, r in report.values()])
    print(f"wrote {args.output}: {len(report)} module(s), Frobenius norm retained: mean {fractions.mean():.1%}, "
          f"min {fractions.min():.1%}")
    return 0
