"""Merge LoRA files into a base model, or several LoRA files into one.

    lora-diffusion merge --model sd15.safetensors --lora style.safetensors:0.8 --lora face.safetensors:0.5 \\
        --output merged.safetensors --precision fp16          # single file, original layout (or a folder path)
    lora-diffusion merge --lora a.safetensors:1 --lora b.safetensors:0.5 --output ab.safetensors   # one LoRA
    lora-diffusion merge --lora a.safetensors --lora b.safetensors --rank 16 --output ab16.safetensors

SD1.x, SD2.x and SDXL (a U-Net named by kohya's SGM paths or by diffusers', both text encoders lora_te1/lora_te2).

Into a model: W' = W + sum(ratio * alpha/rank * up @ down), each module's update computed by its algorithm
(adapters.ALGORITHMS: LoHa/LoKr their products, iA3 W * w, GLoRA W @ a1 @ a2 + b1 @ b2 on the weight merged so far,
norm layers w_norm and b_norm into the weight and bias; DoRA: LyCORIS' formula on the weight merged so far, with
the ratio as its multiplier), computed in fp32 one weight at a time and cast to
--precision; only one tensor of the model is in memory at once. LoRA + LoRA: the ranks are concatenated (exact:
the result's update is the sum of the updates), or with --rank the sum is reduced by SVD to its best rank-r
approximation per module. LoRA + LoRA and --rank take plain LoRA/LoCon files only: the other algorithms' updates
are no up @ down pair (iA3, GLoRA and DoRA depend on the base weight), so they are refused with that reason.
"""

import warnings
from dataclasses import replace

import torch
from safetensors import safe_open

from lora_diffusion.core.deltas import merge_lora_files, only_plain_lora  # noqa: F401 (only_plain_lora: 0.1's place)
from lora_diffusion.core.kohya import EMBEDDING_PREFIX, LoRAFileWarning

from .model_files import (
    ModelToolError,
    addressable_weights,
    check_module_fits,
    check_output,
    factored_svd,
    fit,
    module_bias_delta,
    module_delta,
    on_meta,
    open_model,
    precision,
    read_loras,
    write_model,
)


def merge_into_model(model_path, loras, output, *, dtype=None, config_dir=None, v2=None, overwrite=False):
    """loras: ["file.safetensors:ratio" or "file.safetensors"]. Writes `output` (a .safetensors single file or a
    diffusers folder); returns {module name: number of LoRAs merged into it}."""
    check_output(output, [model_path] + [s.rpartition(":")[0] or s for s in map(str, loras)], overwrite)
    model = open_model(model_path, config_dir=config_dir, v2=v2)
    files = read_loras(loras)
    weights = addressable_weights(model)
    updates = {}
    for path, ratio, modules, _ in files:
        if modules.embeddings:
            tokens = ", ".join(repr(t) for t in sorted(modules.embeddings))
            warnings.warn(f"{path} bundles embeddings for {tokens}, which a model's weights cannot hold (they are "
                          f"new tokens of the tokenizer): {output} does not have them; keep using {path} for them, "
                          f"or merge the LoRA files into one without --model, which keeps them",
                          LoRAFileWarning, stacklevel=2)
        unplaced = sorted(n for n in modules if n not in weights)
        if unplaced:
            raise ModelToolError(f"{path}: {len(unplaced)} module(s) match no weight of {model.describe()} "
                                 f"(e.g. {', '.join(unplaced[:3])}); a LoRA for another model family?")
        for name, w in modules.items():
            part, key = weights[name]
            check_module_fits(w, model.entries[(part, key)][0], name, path)
            updates.setdefault((part, key), []).append((name, ratio, w, path, module_delta))
            bias = (part, key.removesuffix(".weight") + ".bias")
            if module_bias_delta(w) is not None:  # norm layers: b_norm goes into the bias
                if bias not in model.entries:
                    raise ModelToolError(f"{path}: module {name} has b_norm but {model.describe()} has no {bias[1]}")
                updates.setdefault(bias, []).append((name, ratio, w, path, bias_delta))

    def get(part, key):
        tensor = model.read(part, key)
        if (part, key) not in updates:
            return tensor
        merged = tensor.float()
        for name, ratio, w, path, delta in updates[(part, key)]:
            merged += fit(delta(w, base=merged, multiplier=ratio), merged.shape, name, path)
        return merged

    write_model(output, model, get, dtype, keep_extras=True)
    return {updates_list[0][0]: len(updates_list) for updates_list in updates.values()}


def bias_delta(w, base, multiplier):
    return module_bias_delta(w, multiplier)


def update_shape(w):
    """(out, in * kh * kw) of a file module's update from its tensors' shapes, for the algorithms whose update needs
    no base weight (0.1.0's helper; merging checks a module against its base with model_files.check_module_fits)."""
    if w.algo == "lora":
        return w.up.shape[0], w.down.flatten(1).shape[1]
    delta = module_delta(replace(on_meta(w), dora_scale=None))
    return delta.shape[0], delta.shape[1]


def merge_loras(loras, output, *, rank=None, conv_rank=None, dtype=torch.float16, overwrite=False,
                embeddings_from=None):
    """Several LoRA files with ratios into one: concatenated ranks (exact), or with `rank` (and `conv_rank` for kxk
    convs) the best approximation of the summed update. Bundled embeddings (`bundle_emb.*`) are kept as they are
    (no ratio applies to them); a token two files bundle with different vectors is refused unless
    `embeddings_from` names the file whose vectors to keep. Returns {module: (rank, retained Frobenius fraction)}."""
    def combine(parts, shape):
        up = torch.cat([w.up.float().flatten(1) * (ratio * w.alpha / w.rank) for ratio, w, _ in parts], 1)
        down = torch.cat([w.down.float().flatten(1) for _, w, _ in parts], 0)
        target = conv_rank if (conv_rank and len(shape) == 4 and shape[2:] != (1, 1)) else rank
        if target and target < down.shape[0]:
            u, s, vh = factored_svd(up, down)
            up, down = u[:, :target] * s[:target], vh[:target]
            retained = float(s[:target].square().sum() / s.square().sum().clamp_min(1e-30)) ** 0.5
        else:
            retained = 1.0
        return up, down, (down.shape[0], retained)

    return merge_lora_files(loras, output, combine, what="merging LoRA files into one", dtype=dtype,
                            keep_metadata=True, embeddings_from=embeddings_from, overwrite=overwrite,
                            comment="merged by lora-diffusion from ")


def add_arguments(parser):
    parser.add_argument("--model", default=None,
                        help="base model (diffusers folder or single file); without it the LoRAs are merged into one")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO]",
                        help="a LoRA file and its ratio (default 1.0); repeat for several")
    parser.add_argument("--output", required=True,
                        help="with --model: a .safetensors single file or a folder path; else a LoRA .safetensors")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                        help="output precision (default: the model's own dtypes; fp16 for a merged LoRA)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA + LoRA: reduce to this rank by SVD")
    parser.add_argument("--conv_rank", type=int, default=None, help="LoRA + LoRA: rank for kxk convs (default --rank)")
    parser.add_argument("--embeddings_from", default=None, metavar="FILE",
                        help="LoRA + LoRA: for a token several --lora files bundle with different vectors, keep "
                             "this file's (default: refuse)")
    parser.add_argument("--config", default=None, help="configs for a single-file model (see `convert --config`)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def run(args):
    if args.model:
        if args.rank or args.conv_rank or args.embeddings_from:
            raise ModelToolError("--rank, --conv_rank and --embeddings_from apply to LoRA + LoRA merges, not to "
                                 "merging into a --model")
        merged = merge_into_model(args.model, args.lora, args.output, dtype=precision(args.precision),
                                  config_dir=args.config, overwrite=args.overwrite)
        print(f"merged {len(merged)} module(s) from {len(args.lora)} LoRA file(s) into {args.output}")
        return 0
    report = merge_loras(args.lora, args.output, rank=args.rank, conv_rank=args.conv_rank or args.rank,
                         dtype=precision(args.precision) or torch.float16, overwrite=args.overwrite,
                         embeddings_from=args.embeddings_from)
    low = min(report.values(), key=lambda r: r[1])
    with safe_open(args.output, "pt") as f:
        tokens = sorted({k[len(EMBEDDING_PREFIX):].partition(".")[0] for k in f.keys()
                         if k.startswith(EMBEDDING_PREFIX)})
    kept = f", bundled embeddings kept: {', '.join(tokens)}" if tokens else ""
    print(f"wrote {args.output}: {len(report)} module(s), ranks {min(r for r, _ in report.values())}-"
          f"{max(r for r, _ in report.values())}, lowest retained Frobenius norm {low[1]:.1%}{kept}")
    return 0
