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

from lora_diffusion.core.deltas import lowrank_factors, merge_lora_files, module_delta

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
    token embeddings kept), with the checks of every LoRA + LoRA merge (core.deltas.merge_lora_files: plain LoRA
    files, all for SDXL or none, each module of one shape). Returns {module: retained Frobenius fraction of the
    merged update}."""
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    generator = torch.Generator().manual_seed(seed)

    def combine(parts, shape):
        merged = merge_task_vectors([module_delta(m) for _, m, _ in parts], [w for w, _, _ in parts], method,
                                    density, generator)
        up, down, s = lowrank_factors(merged, rank)
        return up, down, float(s[:down.shape[0]].square().sum() / s.square().sum().clamp_min(1e-30)) ** 0.5

    return merge_lora_files(paths, output, combine, what=f"a {method} merge", dtype=dtype, ratios=weights,
                            network_rank=rank, overwrite=overwrite,
                            comment=f"{method} (density {density:g}) by lora-diffusion of ")
