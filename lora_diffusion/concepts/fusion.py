"""Gradient fusion (Mix-of-Show): several concept LoRAs made one model that keeps each concept's layer outputs on
that concept's own inputs.

For every module any of the LoRAs touches (text encoder and U-Net, Linear and Conv2d), each concept i's layer inputs
X_i are recorded while its own model (base + its LoRA, its tokens) encodes its prompts and denoises them for a few
sampling steps; the fused weight is

    W = argmin_W  sum_i  ||X_i W^T - X_i W_i^T||^2 / n_i,      W_i = W0 + dW_i (the concept's merged weight)

(n_i: the rows of X_i, so each concept counts alike). Only the Gram matrices C_i = X_i^T X_i / n_i are kept.
The closed form solves the normal equations W sum C_i = sum W_i C_i; where they leave W open (directions none of the
inputs reach) it takes the solution nearest an anchor, by default the mean of the W_i (so one concept gives back
its own weights exactly). Mix-of-Show itself minimises the same loss by LBFGS from W0 (method "lbfgs"), which
converges to the solution nearest W0.

    models = load_models("builtin:mini")
    report = fuse_concepts(models, [Concept("star.safetensors", ("a <star> on a white background", ...)),
                                    Concept("ring.safetensors", (...))])
    save_diffusers_folder(models, "output/fused")          # then tools.extract for a kohya LoRA of the change

Differences from Mix-of-Show's code, on purpose: every layer's inputs come from the concept's own model (Mix-of-Show
fuses the text encoder first and records the U-Net's inputs through it); the U-Net inputs come from a few sampling
steps of the concept's prompts rather than its training images.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.core.deltas import canonical_modules, check_module_fits, module_bias_delta, module_delta
from lora_diffusion.core.kohya import read_lora_file
from lora_diffusion.core.network import load_network
from lora_diffusion.core.targets import all_named_modules
from lora_diffusion.models.sampling import make_sample_scheduler

METHODS = ("closed_form", "lbfgs")
RCOND = 1e-10  # relative cut-off of the Gram's singular values in the closed form (float64)


@dataclass(frozen=True)
class Concept:
    """A concept's LoRA file and the prompts whose layer inputs it must keep (its token in them)."""

    path: str
    prompts: tuple[str, ...]


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows a module's weight multiplies, [n, in] (Linear: one per token; Conv2d: one per output pixel, its
    patch unfolded as the weight [out, in * kh * kw] is flattened)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and module.groups == 1:
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise ValueError(f"fusion handles Linear and plain Conv2d layers, not {type(module).__name__} {module}")


class InputGrams:
    """Forward pre-hooks summing X^T X (float64) of each named module's inputs while open; `means()` divides each by
    its row count."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.sums, self.rows = {}, dict.fromkeys(modules, 0)
        self._hooks = [module.register_forward_pre_hook(functools.partial(self._add, name))
                       for name, module in modules.items()]

    def _add(self, name, module, args):
        rows = input_rows(module, args[0].detach()).double()
        gram = rows.T @ rows
        self.sums[name] = self.sums[name] + gram if name in self.sums else gram
        self.rows[name] += rows.shape[0]

    def close(self):
        while self._hooks:
            self._hooks.pop().remove()

    def means(self) -> dict[str, torch.Tensor]:
        missing = [name for name, n in self.rows.items() if n == 0]
        if missing:
            raise ValueError(f"fusion: {len(missing)} module(s) saw no input while recording (e.g. {missing[0]})")
        return {name: total / self.rows[name] for name, total in self.sums.items()}


def quadratic_loss(weight, weights, grams):
    """sum_i tr((W - W_i) C_i (W - W_i)^T): the fusion loss written with the Grams."""
    return sum(((weight - w) @ c * (weight - w)).sum() for w, c in zip(weights, grams))


def fuse_closed_form(weights, grams, anchor=None) -> torch.Tensor:
    """The W [out, in] minimising quadratic_loss, nearest `anchor` (default: the mean of `weights`) where the
    minimiser is not unique: W = A + D with D the least-norm solution of D sum C_i = sum (W_i - A) C_i."""
    weights = [w.double() for w in weights]
    anchor = torch.stack(weights).mean(0) if anchor is None else anchor.double()
    gram = sum(c.double() for c in grams)
    rhs = sum((w - anchor) @ c.double() for w, c in zip(weights, grams))
    change = torch.linalg.lstsq(gram, rhs.T, rcond=RCOND, driver="gelsd").solution.T  # gram is symmetric
    return anchor + change


def fuse_lbfgs(base, weights, grams, *, max_iter=500) -> torch.Tensor:
    """Mix-of-Show's solver: LBFGS on quadratic_loss from the base weight W0."""
    weights, grams = [w.double() for w in weights], [c.double() for c in grams]
    scale = sum(float((w @ c * w).sum()) for w, c in zip(weights, grams)) or 1.0  # a loss of order 1
    fused = base.double().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([fused], lr=1.0, max_iter=max_iter, history_size=50, tolerance_grad=1e-14,
                                  tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = quadratic_loss(fused, weights, grams) / scale
        loss.backward()
        return loss

    optimizer.step(closure)
    return fused.detach()


def relative_error(fused, weight, gram) -> float:
    """How far the fused layer's outputs are from a concept's on its inputs: ||X (W - W_i)^T|| / ||X W_i^T||."""
    fused, weight, gram = fused.double(), weight.double(), gram.double()
    return float((((fused - weight) @ gram * (fused - weight)).sum() / ((weight @ gram * weight).sum())).sqrt())


def concept_modules(models, paths):
    """{kohya name: (module, {path: ModuleWeights})} of every module any file touches, checked against the model."""
    targets = all_named_modules(models.unet, models.text_encoders)
    found, tokens = {}, {}
    for path in paths:
        modules, _ = read_lora_file(path, warn_embeddings=False)
        modules = canonical_modules(modules)
        for token in modules.embeddings:
            if token in tokens:
                raise ValueError(f"{path} and {tokens[token]} both bundle the token {token!r}; fused concepts need "
                                 f"tokens of their own")
            tokens[token] = path
        for name, weights in modules.items():
            target = targets.get(name)
            if target is None:
                raise ValueError(f"{path}: module {name} matches no layer of the model; a LoRA for another family?")
            if module_bias_delta(weights) is not None:
                raise ValueError(f"{path}: module {name} changes a bias ({weights.label}); fusion solves weights only")
            check_module_fits(weights, target.module.weight.shape, name, path)
            found.setdefault(target.name, (target.module, {}))[1][path] = weights
    return found


@torch.no_grad()
def record_concept(models, concept: Concept, modules, *, steps=4, guidance=5.0, size=None, seed=0,
                   device="cpu") -> dict[str, torch.Tensor]:
    """The mean input Grams of `modules` while the concept's own model (its LoRA and tokens loaded) encodes each of
    its prompts and denoises it for `steps` sampling steps (classifier-free guidance: the empty prompt's inputs are
    recorded too). `size`: the images' side (default: the U-Net's own, as diffusers' pipelines choose)."""
    network = load_network(concept.path, models.unet, models.text_encoders, tokenizer=models.tokenizers)
    pipeline = models.family.pipeline(models, make_sample_scheduler("ddim", models.noise_scheduler,
                                                                    v_parameterization=models.v_parameterization))
    pipeline.set_progress_bar_config(disable=True)
    grams = InputGrams(modules)
    try:
        for index, prompt in enumerate(concept.prompts):
            inputs = models.family.prompt_inputs(models, prompt, "", expand=network.expand_prompt, device=device)
            pipeline(**inputs, width=size, height=size, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator(device).manual_seed(seed + index), output_type="latent")
    finally:
        grams.close()
        network.remove()  # its tokens stay in the tokenizer and the embedding table: the fused model keeps them
    return grams.means()


def fuse_concepts(models, concepts, *, method="closed_form", steps=4, guidance=5.0, size=None, seed=0,
                  device="cpu", say=print) -> dict[str, list[float]]:
    """Fuse the concepts' LoRAs into `models`' weights, in place (their tokens added); returns {module: each
    concept's relative output error on its own inputs}."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not concepts:
        raise ValueError("fusion needs at least one concept file")
    for concept in concepts:
        if not concept.prompts:
            raise ValueError(f"{concept.path}: no prompts to record its layer inputs with")
    found = concept_modules(models, [c.path for c in concepts])
    modules = {name: module for name, (module, _) in found.items()}
    base = {name: module.weight.detach().float().reshape(module.weight.shape[0], -1).clone()
            for name, module in modules.items()}
    grams = []
    for concept in concepts:
        say(f"recording {concept.path}: {len(concept.prompts)} prompt(s), {len(modules)} layer(s)")
        grams.append(record_concept(models, concept, modules, steps=steps, guidance=guidance, size=size, seed=seed,
                                    device=device))
    report = {}
    for name, (module, files) in found.items():
        weights = [base[name] + module_delta(files[c.path], base=module.weight.detach().float())
                   if c.path in files else base[name] for c in concepts]
        layer_grams = [g[name] for g in grams]
        if method == "lbfgs":
            fused = fuse_lbfgs(base[name], weights, layer_grams)
        else:
            fused = fuse_closed_form(weights, layer_grams)
        report[name] = [relative_error(fused, w, c) for w, c in zip(weights, layer_grams)]
        module.weight.data.copy_(fused.reshape(module.weight.shape).to(module.weight.dtype))
    return report
