"""The simple multi-concept baselines that gradient fusion is compared with (docs/research.md):

- stacking: every concept's LoRA loaded at once (`generate --lora a --lora b`, or load_network twice);
- a weighted merge: the updates summed with ratios (`lora-diffusion merge --lora a:0.5 --lora b:0.5`,
  tools/merge.py);
- TIES and DARE (merge_task_vectors here): each concept's full update dW_i per module, trimmed (TIES: the top
  `density` share by magnitude; DARE: a random `density` share kept and rescaled by 1 / density), for TIES-merging a
  sign elected per entry (the sign of the trimmed updates' sum) and the weighted updates that agree with it averaged,
  else summed; then the best rank-`rank` approximation, written as a kohya LoRA file. This is peft's
  add_weighted_adapter with combination_type ties_svd / dare_linear_svd / dare_ties_svd (the tests' oracle).
"""

import torch

MERGE_METHODS = ("ties", "dare_linear", "dare_ties")


def trim_by_magnitude(delta, density):
    """The `density` share of entries largest in magnitude kept, the others zero."""
    keep = int(density * delta.numel())
    flat = torch.zeros(delta.numel(), dtype=delta.dtype)
    flat[delta.abs().reshape(-1).topk(keep).indices] = 1
    return delta * flat.reshape(delta.shape)


def drop_at_random(delta, density, generator):
    """Each entry kept with probability `density` and rescaled by 1 / density (DARE)."""
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def sign_agreeing_mean(deltas, weights):
    """Per entry, the mean of the weighted deltas whose sign is the elected one: that of the deltas' sum."""
    stacked = torch.stack(deltas)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    weighted = stacked * torch.as_tensor(weights, dtype=stacked.dtype).reshape(-1, *[1] * (stacked.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_task_vectors(deltas, weights, method="ties", density=0.5, generator=None):
    """One update from several concepts' updates of the same module (see the module's docstring)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r} is not one of {', '.join(MERGE_METHODS)}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density < 1:
        trim = trim_by_magnitude if method == "ties" else lambda d, p: drop_at_random(d, p, generator)
        deltas = [trim(d, density) for d in deltas]
    if method == "dare_linear":
        return sum(w * d for w, d in zip(weights, deltas))
    return sign_agreeing_mean(deltas, weights)


def merge_concept_files(paths, output, *, method="ties", weights=None, density=0.5, rank=16, seed=0,
                        dtype=torch.float16, overwrite=False):
    """TIES / DARE of the LoRA files' updates, module by module, written as one kohya LoRA file at `rank` (bundled
    token embeddings kept). Returns {module: retained Frobenius fraction of the merged update}."""
    from lora_diffusion.formats.kohya import network_metadata, write_lora_file
    from lora_diffusion.tools.merge import only_plain_lora
    from lora_diffusion.tools.model_files import (
        bundled_embedding_tensors,
        check_output,
        is_sdxl_lora,
        lora_file_tensors,
        lowrank_factors,
        module_delta,
        read_loras,
    )

    check_output(output, paths, overwrite)
    files = read_loras(paths)
    only_plain_lora(files, f"a {method} merge")
    weights = list(weights) if weights is not None else [1.0] * len(files)
    if len(weights) != len(files):
        raise ValueError(f"{len(weights)} weight(s) for {len(files)} LoRA file(s)")
    generator = torch.Generator().manual_seed(seed)
    names = sorted({name for _, _, modules, _ in files for name in modules})
    result, shapes, report = {}, {}, {}
    for name in names:
        parts = [(w, modules[name]) for w, (_, _, modules, _) in zip(weights, files) if name in modules]
        first = parts[0][1]
        shape = tuple(first.up.shape[:1]) + tuple(first.down.shape[1:])
        merged = merge_task_vectors([module_delta(m) for _, m in parts], [w for w, _ in parts], method, density,
                                    generator)
        up, down, s = lowrank_factors(merged, rank)
        result[name], shapes[name] = (up, down, 1.0), (shape if len(shape) == 4 else shape[:2])
        report[name] = float(s[:down.shape[0]].square().sum() / s.square().sum().clamp_min(1e-30)) ** 0.5
    sdxl = is_sdxl_lora(files[0][2], files[0][3])
    tensors, alpha = lora_file_tensors(result, shapes, dtype, sdxl=sdxl)
    tensors.update(bundled_embedding_tensors(files, dtype))
    metadata = network_metadata(rank=rank, alpha=alpha, sdxl=sdxl, output_name=str(output),
                                v2=not sdxl and files[0][3].get("ss_v2") == "True")
    metadata["ss_training_comment"] = f"{method} (density {density:g}) by lora-diffusion of " + ", ".join(
        f"{path}:{w:g}" for w, (path, _, _, _) in zip(weights, files))
    write_lora_file(str(output), tensors, metadata)
    return report
