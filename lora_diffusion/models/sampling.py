"""Drawing images with a loaded model, whatever its family: one loop over prompt dicts (training/sampling.py reads
them from kohya's prompt files) that asks the family for its diffusers pipeline and for each prompt's inputs, writes
one PNG per prompt with kohya's file name and the prompt in its text chunks, and leaves the modules' train/eval modes
and devices and the random states as it found them."""

import random
import secrets
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lora_diffusion.formats.io import atomic_write

from .regional import encode_regions, regional_attention

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def make_sample_scheduler(sampler, noise_scheduler, *, v_parameterization=False):
    """An inference scheduler (kohya --sample_sampler name) with the training scheduler's betas."""
    import diffusers

    if sampler.lower() not in SAMPLERS:
        raise ValueError(f"--sample_sampler {sampler!r} is not known; use one of {', '.join(SAMPLERS)}")
    class_name, extra = SAMPLERS[sampler.lower()]
    config = dict(getattr(noise_scheduler, "config", noise_scheduler))
    if v_parameterization:
        config["prediction_type"] = "v_prediction"
    return getattr(diffusers, class_name).from_config(config, **extra)


def sample_filename(output_name, *, step, epoch, index, seed):
    """kohya's name: <output_name>_<step:06d | e<epoch:06d>>_<index:02d>_<YYYYmmddHHMMSS>_<seed>.png."""
    position = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{position}_{index:02d}_{stamp}_{seed}.png"


def save_png(image, path, prompt):
    """The image as a PNG, atomically, with the prompt's settings in its text chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key in ("prompt", "negative_prompt", "seed", "scale", "steps", "sampler"):
        info.add_text(key, str(prompt[key]))
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


@contextmanager
def sampling_session(modules, device):
    """Every module in eval mode on `device` while sampling; afterwards each submodule's own mode (a LoRA inside the
    model trains while its frozen base is in eval mode, and `m.train(flag)` would set both alike), each module's
    device, and the python, numpy and CUDA random states as they were."""
    was_training = [[(sub, sub.training) for sub in m.modules()] for m in modules]
    devices = [next(m.parameters()).device for m in modules]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
            for m in modules:
                m.eval().to(device)
            yield
    finally:
        for m, flags, original_device in zip(modules, was_training, devices):
            m.to(original_device)
            for sub, training in flags:
                sub.training = training
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def prompt_seed(prompt, index, seed):
    """A prompt's --d, else seed + index when a run seed is given, else a random seed."""
    if prompt.get("seed") is not None:
        return prompt["seed"]
    return seed + index if seed is not None else secrets.randbelow(2**32)


def draw(pipe, **kwargs):
    """A diffusers pipeline's images, with the latents decoded in the VAE's own dtype (fp32, or bf16) and outside
    any autocast: under fp16 the U-Net's latents would meet the fp32 VAE's weights, and SD's VAEs overflow in fp16."""
    latents = pipe(output_type="latent", **kwargs).images
    vae = pipe.vae
    with torch.no_grad(), torch.autocast(device_type=latents.device.type, enabled=False):
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


@torch.no_grad()
def sample_images(models, *, prompts, out_dir, step=0, epoch=None, output_name="", device="cpu", dtype=torch.float32,
                  sampler="ddim", clip_skip=None, max_token_length=None, seed=None, expand_prompt=None, regions=()):
    """One PNG per prompt dict (training.read_prompts) into out_dir, with the model as it is now (a LoRA applied);
    returns the paths. The pipeline and each prompt's inputs are the family's (models.family): SD1.x/2.x encodes
    with the training text path (clip_skip, max_token_length, `expand_prompt` writing out a multi-vector token),
    SDXL with diffusers' own. A prompt without --d uses seed + index when `seed` is given, else a random seed;
    `epoch` set names the files e<epoch>, else <step>. dtype: the autocast dtype for float16/bfloat16 weights.
    `regions` (models.regional.Region list): each region's prompt controls its box in every image, the prompt
    the rest."""
    family = models.family
    if family.clip_skip_note and clip_skip not in (None, 1, 2):  # kohya: a warning, and the family's own layers
        warnings.warn(f"clip_skip={clip_skip} is ignored for {family.title}, {family.clip_skip_note}")
    device = torch.device(device)
    expand = expand_prompt or (lambda text: text)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with sampling_session([*models.text_encoder_list, models.vae, models.unet], device):
        pipeline = family.pipeline(models, make_sample_scheduler(sampler, models.noise_scheduler,
                                                                 v_parameterization=models.v_parameterization))
        pipeline.set_progress_bar_config(disable=True)
        for index, prompt in enumerate(prompts):
            pipeline.scheduler = make_sample_scheduler(prompt.get("sampler") or sampler, models.noise_scheduler,
                                                       v_parameterization=models.v_parameterization)
            prompt = dict(prompt, seed=prompt_seed(prompt, index, seed))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
                inputs = family.prompt_inputs(models, prompt["prompt"], prompt["negative_prompt"], expand=expand,
                                              clip_skip=clip_skip, max_token_length=max_token_length, device=device)
                contexts = encode_regions(models, pipeline, regions, prompt["negative_prompt"], expand=expand,
                                          clip_skip=clip_skip, max_token_length=max_token_length, device=device)
                latent_size = (prompt["height"] // pipeline.vae_scale_factor,
                               prompt["width"] // pipeline.vae_scale_factor)
                generator = torch.Generator(device="cpu" if device.type == "mps" else device)
                with regional_attention(pipeline.unet, contexts, latent_size=latent_size,
                                        guidance=prompt["scale"] > 1):
                    image = draw(pipeline, **inputs, width=prompt["width"], height=prompt["height"],
                                 num_inference_steps=prompt["steps"], guidance_scale=prompt["scale"],
                                 generator=generator.manual_seed(prompt["seed"]))[0]
            path = out_dir / sample_filename(output_name, step=step, epoch=epoch, index=index, seed=prompt["seed"])
            save_png(image, path, prompt)
            paths.append(path)
        del pipeline
    return paths
