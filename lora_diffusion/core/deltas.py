"""The LoRA file math that needs no base model file: each file module's update of its base weight (by its
algorithm, adapters.ALGORITHMS, and its DoRA variant), the checks that a module fits a weight, SVD helpers, LoRA
file tensors from up @ down factors, reading several LoRA files with ratios, and combining several LoRA files'
modules into one file (merge_lora_files: the LoRA + LoRA merge of tools/merge.py and the TIES/DARE baselines of
concepts/baselines.py).

The model tools (tools/model_files.py re-exports these names) and the concepts library both build on it; it reads
LoRA files (formats/) and never a whole model.
"""

import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from lora_diffusion.core.kohya import (
    EMBEDDING_PREFIX,
    LoRAFileError,
    LoRAModules,
    ModuleWeights,
    network_metadata,
    read_lora_file,
    write_lora_file,
)

from . import adapters
from .targets import canonical_kohya_name, written_kohya_name


class ModelToolError(ValueError):
    """Bad input to a model tool or a LoRA file operation; the message names the file or option, what was given and
    what was expected (tools.model_files.ModelToolError)."""


SGM_UNET_NAME = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")


def is_sdxl_lora(modules, metadata):
    """Whether a LoRA file is for SDXL: a second text encoder's module (lora_te2_), a U-Net module by its SGM path
    (as kohya names SDXL's only), or SDXL in the metadata (kohya's ss_base_model_version, ModelSpec's)."""
    return (any(n.startswith("lora_te2_") or SGM_UNET_NAME.match(n) for n in modules)
            or metadata.get("ss_base_model_version", "").startswith("sdxl")
            or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-xl"))


def module_delta(weights: ModuleWeights, base: torch.Tensor | None = None, multiplier: float = 1.0) -> torch.Tensor:
    """The update of one file module's base weight as an fp32 matrix [out, in * kh * kw] (reshape it to the base
    weight's shape), times `multiplier`, computed by the module's algorithm (adapters.ALGORITHMS: each knows its
    update, file_delta). iA3's and GLoRA's update is a function of the base weight, and DoRA's too (and not linear
    in the multiplier): pass `base` for them."""
    cls = adapters.ALGORITHMS[weights.algo]
    if base is None and (cls.delta_depends_on_base or weights.dora_scale is not None):
        what = f"a {adapters.DoRA.label}" if weights.dora_scale is not None else \
            f"an {cls.label}" if cls.label[0] in "iA" else f"a {cls.label}"
        raise ModelToolError(f"{what} module's update depends on the base weight; module_delta needs `base`")
    delta = cls.file_delta(weights.module_tensors, weights.scale, base)
    delta = delta.reshape(delta.shape[0], -1)
    if weights.dora_scale is None:
        return delta * multiplier
    return adapters.DoRA.file_delta(base.float(), delta, weights.dora_scale, multiplier)


def module_bias_delta(weights: ModuleWeights, multiplier: float = 1.0) -> torch.Tensor | None:
    """The update of the base module's bias (norm layers: b_norm), times `multiplier`; None for the others."""
    delta = adapters.ALGORITHMS[weights.algo].file_bias_delta(weights.module_tensors)
    return None if delta is None else delta * multiplier


def on_meta(weights: ModuleWeights) -> ModuleWeights:
    """The file module with its tensors on the meta device (shapes only): its update's shape costs no arithmetic.
    Scalars (alpha) stay real."""
    def meta(t):
        return None if t is None else t if t.dim() == 0 else t.to("meta")

    return replace(weights, down=meta(weights.down), up=meta(weights.up), dora_scale=meta(weights.dora_scale),
                   tensors={k: meta(v) for k, v in weights.tensors.items()})


def check_module_fits(weights: ModuleWeights, shape, name, source):
    """ModelToolError unless the file module's update fits a base weight of `shape` (computed on the meta device:
    no arithmetic)."""
    try:
        delta = module_delta(on_meta(weights), base=torch.empty(shape, device="meta"))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ModelToolError(f"{source}: module {name} ({weights.label}) does not fit the base weight "
                             f"{tuple(shape)} ({e}); a LoRA for another model family?") from None
    if delta.shape[0] != shape[0] or delta.numel() != math.prod(shape):
        raise ModelToolError(f"{source}: module {name} is [out {delta.shape[0]}, in {delta.shape[1]}] but the base "
                             f"weight is {tuple(shape)}; a LoRA for another model family?")


def fit(delta, shape, name, source):
    if delta.numel() != math.prod(shape) or delta.shape[0] != shape[0]:
        raise ModelToolError(f"{source}: module {name} makes a {tuple(delta.shape)} update but the base weight is "
                             f"{tuple(shape)}; a LoRA for another model family (SD1.x, SD2.x, SDXL)?")
    return delta.reshape(shape)


def canonical_modules(modules):
    return LoRAModules({canonical_kohya_name(name): weights for name, weights in modules.items()},
                       embeddings=getattr(modules, "embeddings", None))


def bundled_embedding_tensors(files, dtype, embeddings_from=None):
    """The `bundle_emb.<token>.*` tensors of the files' bundled embeddings (A1111's pivotal-tuning vectors), for a
    LoRA file made from them, floats cast to `dtype` (as network.save_weights does). A token that two files bundle
    with different vectors is refused, unless `embeddings_from` names the input whose vectors to keep."""
    if embeddings_from is not None and not any(Path(p) == Path(embeddings_from) for p, _, _, _ in files):
        raise ModelToolError(f"--embeddings_from {embeddings_from}: not one of the --lora files")
    kept = {}  # token -> (path, {key: tensor})
    for path, _, modules, _ in files:
        for token, parts in modules.embeddings.items():
            if token in kept:
                first, theirs = kept[token]
                if theirs.keys() == parts.keys() and all(torch.equal(theirs[k], parts[k]) for k in parts):
                    continue
                if embeddings_from is None:
                    raise ModelToolError(
                        f"{first} and {path} both bundle an embedding for the token {token!r}, with different "
                        f"vectors; a LoRA file holds one per token: pass --embeddings_from with the file whose "
                        f"vectors to keep")
                if Path(path) != Path(embeddings_from):
                    continue
            kept[token] = (path, parts)
    return {f"{EMBEDDING_PREFIX}{token}.{key}": (t.to(dtype) if t.is_floating_point() else t).contiguous()
            for token, (_, parts) in sorted(kept.items()) for key, t in sorted(parts.items())}


def lowrank_factors(matrix, rank):
    """The best rank-`rank` approximation of a matrix (Eckart-Young): up = U_r S_r, down = V_r^T, and the singular
    values. Full SVD in fp32."""
    u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    rank = max(1, min(rank, len(s)))
    return u[:, :rank] * s[:rank], vh[:rank], s


def factored_svd(up, down):
    """SVD of up @ down ([out, r] @ [r, n]) without forming the product: QR of both factors, then the SVD of an
    r x r core. Exact (not an approximation), and r x r work instead of out x n."""
    q1, r1 = torch.linalg.qr(up.float())
    q2, r2 = torch.linalg.qr(down.float().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    return q1 @ u, s, (q2 @ vh.T).T


def lora_file_tensors(modules, shapes, dtype=torch.float16, sdxl=False):
    """Kohya file tensors from {name: (up [out, r], down [r, n], scale)}, `shapes[name]` the base weight's shape
    (to shape conv factors), the names spelled as files have them (`sdxl`: SDXL's, see written_kohya_name). One
    alpha for the whole file (the most common rank, so most modules have scale 1): each module's own scale is
    folded into lora_up, which leaves scale * up @ down unchanged."""
    ranks = [down.shape[0] for _, down, _ in modules.values()]
    alpha = float(Counter(ranks).most_common(1)[0][0]) if ranks else 1.0
    tensors = {}
    for name, (up, down, scale) in sorted(modules.items()):
        rank, shape = down.shape[0], shapes[name]
        up = up.float() * (scale * rank / alpha)
        if len(shape) == 4:
            down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
        name = written_kohya_name(name, sdxl)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors, alpha


def read_loras(specs):
    """[(path, ratio)] from `path` or `path:ratio` strings, with each file's modules (canonical names)."""
    loaded = []
    for spec in specs:
        path, ratio = spec, 1.0
        head, sep, tail = str(spec).rpartition(":")
        if sep and head and not Path(spec).exists():
            try:
                path, ratio = head, float(tail)
            except ValueError:
                raise ModelToolError(f"--lora {spec!r}: the ratio after ':' must be a number") from None
        if not math.isfinite(ratio):
            raise ModelToolError(f"--lora {spec!r}: the ratio must be finite")
        try:
            modules, metadata = read_lora_file(path, warn_embeddings=False)
        except LoRAFileError as e:
            raise ModelToolError(str(e)) from None
        loaded.append((path, ratio, canonical_modules(modules), metadata))
    return loaded



def only_plain_lora(files, what):
    """Refuse files with modules that are no up @ down pair (adapters' lowrank_file: LoRA/LoCon; DyLoRA files are
    LoRA files): LoHa, LoKr, iA3, GLoRA, norm layers and DoRA. Their updates are no low-rank product that SVD
    or concatenating ranks could keep in a LoRA file (iA3, GLoRA and DoRA depend on the base weight itself)."""
    for path, _, modules, _ in files:
        other = sorted({w.label for w in modules.values()
                        if not adapters.ALGORITHMS[w.algo].lowrank_file or w.dora_scale is not None})
        if other:
            raise ModelToolError(f"{path} holds {', '.join(other)} modules; {what} works on plain LoRA/LoCon files "
                                 f"only (their updates are no up @ down pair; merge them into a model with --model "
                                 f"instead)")


def check_lora_output(output, inputs, overwrite=False) -> Path:
    """A LoRA file to write: not a folder, not one of the input files, and not replaced unless `overwrite`."""
    output = Path(output).expanduser()
    if output.is_dir():
        raise ModelToolError(f"output '{output}' is a folder; a LoRA file's output is a file path (.safetensors)")
    for source in inputs:
        source = Path(str(source)).expanduser()
        if source.exists() and output.exists() and source.samefile(output):
            raise ModelToolError(f"output '{output}' is the input '{source}'; choose another output (nothing was "
                                 f"changed)")
    if output.exists() and not overwrite:
        raise ModelToolError(f"output '{output}' exists; choose a new path or pass --overwrite")
    return output


def merge_lora_files(loras, output, combine, *, what, comment, dtype=torch.float16, ratios=None, network_rank=None,
                     keep_metadata=False, embeddings_from=None, overwrite=False):
    """Several plain LoRA files (`path` or `path:ratio`, see read_loras) into one kohya LoRA file, module by module:
    `combine(parts, shape)`, parts [(ratio, ModuleWeights, path)] of the files that have the module and `shape` its
    base weight's (out, in(, kh, kw)), returns the merged module's (up [out, r], down [r, in * kh * kw], report
    value). Checked first: the output (check_lora_output),
    plain LoRA/LoCon modules only (only_plain_lora; `what` names the operation), all files for SDXL or none, and
    each module of one shape in every file. `ratios` replaces the files' ratios; bundled embeddings are kept
    (bundled_embedding_tensors, `embeddings_from`); `network_rank` is the file's recorded rank (default: the
    largest module's); `keep_metadata` starts the metadata from the first file's (its hashes dropped); `comment`
    heads ss_training_comment, followed by the files and their ratios. Returns {module: report value}."""
    check_lora_output(output, [s.rpartition(":")[0] or s for s in map(str, loras)], overwrite)
    files = read_loras(loras)
    if ratios is not None:
        ratios = list(ratios)
        if len(ratios) != len(files):
            raise ModelToolError(f"{len(ratios)} weight(s) for {len(files)} LoRA file(s)")
        files = [(path, ratio, modules, metadata) for ratio, (path, _, modules, metadata) in zip(ratios, files)]
    only_plain_lora(files, what)
    embeddings = bundled_embedding_tensors(files, dtype, embeddings_from)
    sdxl = [is_sdxl_lora(modules, metadata) for _, _, modules, metadata in files]
    if len(set(sdxl)) > 1:
        raise ModelToolError(f"{files[sdxl.index(True)][0]} is an SDXL LoRA but {files[sdxl.index(False)][0]} is not; "
                             f"LoRAs for different base models cannot be merged")
    names = sorted({n for _, _, modules, _ in files for n in modules})
    result, shapes, report = {}, {}, {}
    for name in tqdm(names, desc="merging", unit="module", leave=False):
        parts = [(ratio, modules[name], path) for path, ratio, modules, _ in files if name in modules]
        shape = lora_shape(parts[0][1])
        for _, w, path in parts:
            this = lora_shape(w)
            if math.prod(this) != math.prod(shape) or this[0] != shape[0]:
                raise ModelToolError(f"{path}: module {name} has shape {this}, {parts[0][2]} has {shape}; LoRAs for "
                                     f"different base models cannot be merged")
        up, down, report[name] = combine(parts, shape)
        result[name], shapes[name] = (up, down, 1.0), (shape if len(shape) == 4 else shape[:2])
    tensors, alpha = lora_file_tensors(result, shapes, dtype, sdxl=sdxl[0])
    tensors.update(embeddings)
    first = files[0][3]
    metadata = {k: v for k, v in first.items() if not k.startswith("sshs_")} if keep_metadata else {}
    metadata.update(network_metadata(rank=network_rank or max(down.shape[0] for _, down, _ in result.values()),
                                     alpha=alpha, sdxl=sdxl[0], v2=not sdxl[0] and first.get("ss_v2") == "True",
                                     output_name=str(output)))
    metadata["ss_training_comment"] = comment + ", ".join(f"{path}:{ratio:g}" for path, ratio, _, _ in files)
    write_lora_file(str(output), tensors, metadata)
    return report


def lora_shape(weights: ModuleWeights) -> tuple[int, ...]:
    """The base weight shape a plain LoRA module's factors make: (out, in(, kh, kw))."""
    return tuple(weights.up.shape[:1]) + tuple(weights.down.shape[1:])
