"""Validation during training: a loss on held-out images that compares across epochs and runs, and optionally
metrics on generated images (the engine of `lora-diffusion evaluate`).

The validation loss is the plain MSE of the U-Net's prediction (no min-SNR weights, no noise offset) on the
held-out images at fixed timesteps (100, 300, 500, 700, 900 of 1,000) with fixed noise per image and timestep: the
same numbers go in at every epoch, so only the LoRA changes the result. Images are encoded with the VAE's mean
(no sampling, resized with their subset's --resize_interpolation) and their captions used as written. The model's
family gives the U-Net its added conditioning as in training (SDXL: each image's size and center crop as time ids,
and the pooled text embedding) and the pipeline that draws the prompts (SDXL: StableDiffusionXLPipeline).
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lora_diffusion.data.images import center_crop, load_image
from lora_diffusion.models.family import ModelFamily, family_named
from lora_diffusion.models.prompt_weights import apply_token_weights, parse_weights, plain_text, token_weights
from lora_diffusion.models.sampling import draw
from lora_diffusion.tools import evaluate
from lora_diffusion.tools.evaluate import score_images

from .errors import TrainingError
from .noise import training_target

TIMESTEP_SHARES = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class ValidationSet:
    latents: list  # one [1, c, h, w] tensor per image
    captions: list
    seed: int
    time_ids: list | None = None  # the family's added ids, one per image (SDXL: [1, 6], size, center crop, bucket)
    family: ModelFamily | None = None  # None: SDXL's when time_ids are given, else SD1.x/2.x (sets built by hand)

    def __post_init__(self):
        if self.family is None:
            self.family = family_named("sdxl" if self.time_ids is not None else "sd")


@torch.no_grad()
def build_validation_set(entries, vae, *, seed, device, dtype, sdxl=False, family=None,
                         interpolations=None) -> ValidationSet:
    """Encode held-out dataset entries (LoRADataset.split_validation or a validation dataset's entries) once.
    family: the model's (models.family; `sdxl=True` names SDXL's); interpolations: each entry's
    --resize_interpolation (its subset's), None for the default."""
    family = family or family_named("sdxl" if sdxl else "sd")
    interpolations = interpolations or [None] * len(entries)
    latents = []
    for entry, interpolation in zip(entries, interpolations):
        image = load_image(entry.path, entry.bucket, interpolation=interpolation)[None].to(device, vae.dtype)
        latents.append((vae.encode(image).latent_dist.mean * vae.config.scaling_factor).to("cpu", dtype))
    time_ids = [family.image_time_ids(e.size, center_crop(e.size, e.bucket), e.bucket) for e in entries]
    time_ids = None if all(ids is None for ids in time_ids) else time_ids
    return ValidationSet(latents, [e.caption for e in entries], seed, time_ids, family)


@torch.no_grad()
def validation_loss(validation: ValidationSet, *, unet, encode, noise_scheduler, v_parameterization, device,
                    dtype, max_images=None) -> float:
    """Mean MSE over images x fixed timesteps. `encode(captions)` gives the text-encoder states as the family's
    encode_prompts does (SDXL: the states and the pooled embedding). `max_images`: only the first ones (kohya's
    --max_validation_steps; one image is one validation batch here)."""
    total, count = 0.0, 0
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = [int(share * steps) for share in TIMESTEP_SHARES]
    family = validation.family
    for index, (latents, caption) in enumerate(zip(validation.latents[:max_images], validation.captions)):
        time_ids = validation.time_ids[index].to(device, dtype) if validation.time_ids is not None else None
        context, added = family.unet_conditioning(encode([caption]), time_ids, device=device, dtype=dtype)
        context = context.to(device, dtype)
        latents = latents.to(device, dtype)
        for t in timesteps:
            generator = torch.Generator().manual_seed(validation.seed * 1_000_003 + index * 1009 + t)
            noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
            timestep = torch.tensor([t], device=device)
            noisy, target = training_target(noise_scheduler, latents, noise, timestep, v_parameterization)
            prediction = family.call_unet(unet, noisy, timestep, context, added)
            total += torch.nn.functional.mse_loss(prediction.float(), target.float()).item()
            count += 1
    return total / max(1, count)


@dataclass
class Validation:
    """What a run validates: encoded held-out images (the loss) and/or prompts whose images are scored."""

    images: ValidationSet | None
    prompts: list | None = None
    metrics: tuple = ("judge",)
    seeds: int = 2
    size: int = 512
    feature_net: Any = None
    reference: list | None = None

    @classmethod
    def create(cls, images, prompts_spec, metrics, *, seeds, size):
        prompts = feature_net = reference = None
        if prompts_spec:
            try:
                prompts, scenes = evaluate.read_prompts(prompts_spec, [])
            except ValueError as e:
                raise TrainingError(str(e).replace("--prompts", "--validation_prompts")) from None
            if {"fid", "kid"} & set(metrics):
                if not scenes:
                    raise TrainingError("--validation_metrics fid/kid compare with renders of the shapes world: they "
                                        "need world prompts (--validation_prompts world:star); use `lora-diffusion "
                                        "evaluate --reference` for other images")
                feature_net = evaluate.feature_network("world")
                reference = evaluate.reference_images(None, scenes, len(prompts) * seeds, size)
        return cls(images, prompts, tuple(metrics), seeds, size, feature_net, reference)


@contextmanager
def eval_mode(*models):
    """Every submodule in eval mode (no LoRA dropout), then each given its own mode back (the frozen base stays in
    eval, the LoRA in train)."""
    modes = [(sub, sub.training) for model in models for sub in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


def text_encoders(models):
    return models.text_encoder_list


def validation_pipeline(models):
    """The family's pipeline that draws the validation prompts, with DPM-Solver++ on the model's schedule (for
    builtin:mini, its world pipeline)."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = models.family.pipeline(models, DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config,
                                                                                algorithm_type="dpmsolver++"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_for_prompts(run, prompts, seeds, size, steps=20, guidance=5.0):
    """Images of the model as it is now (LoRA applied), one per prompt and seed, prompt-major."""
    models = run.models
    pipe = validation_pipeline(models)
    devices = [(m, next(m.parameters()).device) for m in (models.vae, *text_encoders(models))]
    for model, _ in devices:
        model.to(run.device)  # each may wait on the CPU while latents or text states are cached
    try:
        images = []  # diffusers writes a multi-vector token out itself (maybe_convert_prompt)
        for seed in range(seeds):
            generators = [torch.Generator().manual_seed(seed) for _ in prompts]
            images += draw(pipe, prompt=prompts, height=size, width=size, num_inference_steps=steps,
                           guidance_scale=guidance, generator=generators)
    finally:
        for model, device in devices:
            model.to(device)
    return [images[s * len(prompts) + p] for p in range(len(prompts)) for s in range(seeds)]


def caption_encoder(models, expand_prompt, *, clip_skip=None, max_token_length=None, weighted=False):
    """captions -> the family's encoded text (SDXL: the states and the pooled embedding), new tokens expanded by
    `expand_prompt`; `weighted` (--weighted_captions): `(word:1.3)` weights on the states of those tokens."""
    family = models.family

    def encode(captions):
        fragments = [parse_weights(c) for c in captions] if weighted else None
        if fragments is None or all(weight == 1.0 for f in fragments for _, weight in f):  # nothing to weigh
            texts = captions if fragments is None else [plain_text(f) for f in fragments]
            return family.encode_prompts(models, [expand_prompt(t) for t in texts], clip_skip=clip_skip,
                                         max_token_length=max_token_length)
        fragments = [[(expand_prompt(text), weight) for text, weight in f] for f in fragments]
        encoded = family.encode_prompts(models, [plain_text(f) for f in fragments], clip_skip=clip_skip,
                                        max_token_length=max_token_length)
        states = encoded[0] if isinstance(encoded, tuple) else encoded  # SDXL: the pooled embedding stays
        weights = token_weights(models.tokenizer, fragments, states.shape[1])
        states = apply_token_weights(states, weights)
        return (states, *encoded[1:]) if isinstance(encoded, tuple) else states

    return encode


def validate(run, state, epoch):
    """The validation loss and metrics after `epoch`: printed, logged (TensorBoard `loss/validation`,
    `validation/<metric>`) and kept in state.validations."""
    args, models, validation = run.args, run.models, run.validation
    result = {"epoch": epoch, "step": state.step}
    encoders = text_encoders(models)
    with eval_mode(models.unet, *encoders):
        if validation.images is not None:
            text_device = next(models.text_encoder.parameters()).device
            encode = caption_encoder(models, run.network.expand_prompt, clip_skip=args.clip_skip,
                                     max_token_length=args.max_token_length, weighted=args.weighted_captions)
            with torch.no_grad():
                for encoder in encoders:
                    encoder.to(run.device)
                result["validation_loss"] = validation_loss(
                    validation.images, unet=models.unet, encode=encode, noise_scheduler=models.noise_scheduler,
                    v_parameterization=models.v_parameterization, device=run.device, dtype=run.weight_dtype,
                    max_images=args.max_validation_steps)
                for encoder in encoders:
                    encoder.to(text_device)
        if validation.prompts:
            images = generate_for_prompts(run, validation.prompts, validation.seeds, validation.size)
            asked = [p for p in validation.prompts for _ in range(validation.seeds)]
            result.update(score_images(asked, images, validation.metrics, validation.feature_net,
                                       validation.reference))
    state.validations.append(result)
    run.progress.write("validation", step=state.step, epoch=epoch,
                       metrics={k: float(v) for k, v in result.items()
                                if k not in ("epoch", "step") and isinstance(v, (int, float))})
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                      if k not in ("epoch", "step"))
    if run.accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"epoch {epoch} (step {state.step}): {shown}")  # a line of its own below the progress bar
    if run.log_with:
        logs = {("loss/validation" if k == "validation_loss" else f"validation/{k}"): v
                for k, v in result.items() if k not in ("epoch", "step")}
        run.accelerator.log({args.log_prefix + k: v for k, v in logs.items()}, step=state.step)


def best_epoch(validations) -> str | None:
    """A line naming the epoch with the lowest validation loss and, when judged, the most shapes right."""
    parts = []
    with_loss = [v for v in validations if "validation_loss" in v]
    if with_loss:
        best = min(with_loss, key=lambda v: v["validation_loss"])
        parts.append(f"lowest validation loss {best['validation_loss']:.5f} at epoch {best['epoch']}")
    judged = [v for v in validations if "judge_shape" in v]
    if judged:
        best = max(judged, key=lambda v: (v["judge_shape"], v.get("judge_all", 0)))
        parts.append(f"most shapes right ({best['judge_shape']:.0%}) at epoch {best['epoch']}")
    return "validation: " + "; ".join(parts) if parts else None
