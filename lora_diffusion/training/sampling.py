"""Sample images during training (--sample_prompts, --sample_every_n_steps/epochs), kohya style.

A prompt file has one prompt a line (blank lines and # comments skipped), with inline options:
    a photo of sks dog on the beach --n blurry, lowres --w 512 --h 768 --d 42 --l 7.5 --s 30 --ss euler_a
(--n negative prompt, --w/--h size, --d seed, --l guidance scale, --s steps, --ss sampler). kohya's
.toml ([prompt] defaults + [[prompt.subset]] entries) and .json (a list of objects) files are read too.

generate_samples builds a diffusers StableDiffusionPipeline around the modules being trained, encodes
prompts with the training text path (clip_skip, max_token_length), writes PNGs, and leaves the training
RNG, the modules' train/eval modes and devices as it found them.
"""

import json
import random
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lora_diffusion.formats.io import atomic_write

from .text import encode_prompts

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

# inline option -> (prompt dict key, parser)
PROMPT_OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("scale", float),
    "s": ("steps", int),
    "ss": ("sampler", str),
}
# keys accepted in .toml/.json prompt files (kohya's names first) -> prompt dict key
FILE_KEYS = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "scale": "scale",
    "guidance_scale": "scale",
    "sample_steps": "steps",
    "steps": "steps",
    "sample_sampler": "sampler",
    "sampler": "sampler",
}


class PromptFileError(ValueError):
    """A sample prompt (file) that cannot be read."""


class PromptFileNotFoundError(PromptFileError, FileNotFoundError):
    """--sample_prompts names a file that does not exist."""


def _finish(prompt):
    """Validate and normalise a prompt dict in place (kohya: sizes down to a multiple of 8, steps 1..1000)."""
    for key in ("width", "height"):
        if prompt[key] < 64:
            raise ValueError(f"{key} must be at least 64 pixels, got {prompt[key]}")
        prompt[key] -= prompt[key] % 8
    prompt["steps"] = max(1, min(1000, prompt["steps"]))
    if prompt["sampler"] is not None and prompt["sampler"].lower() not in SAMPLERS:
        raise ValueError(f"unknown sampler {prompt['sampler']!r}; known: {', '.join(SAMPLERS)}")
    return prompt


def _defaults(width, height, scale, steps, seed, negative_prompt, sampler):
    return dict(
        prompt="", negative_prompt=negative_prompt, width=width, height=height,
        seed=seed, scale=scale, steps=steps, sampler=sampler,
    )


def parse_prompt_line(line, *, width=512, height=512, scale=7.5, steps=30, seed=None, negative_prompt="", sampler=None):
    """One prompt line -> dict(prompt, negative_prompt, width, height, seed, scale, steps, sampler).

    The keyword arguments are the defaults for options the line does not set (pass the training resolution).
    """
    prompt = _defaults(width, height, scale, steps, seed, negative_prompt, sampler)
    parts = (" " + line.strip()).split(" --")
    prompt["prompt"] = parts[0].strip()
    for part in parts[1:]:
        match = re.fullmatch(r"(\w+)(?:\s+(.*))?", part.strip(), flags=re.DOTALL)
        option = match.group(1).lower() if match else part
        if option not in PROMPT_OPTIONS:
            raise ValueError(f"unknown option --{option}; known: " + ", ".join(f"--{o}" for o in PROMPT_OPTIONS))
        key, parse = PROMPT_OPTIONS[option]
        value = (match.group(2) or "").strip()
        try:
            prompt[key] = parse(value)
        except ValueError:
            raise ValueError(f"--{option} expects {parse.__name__}, got {value!r}") from None
    return _finish(prompt)


def _apply_keys(entry, base):
    """base updated with a .toml/.json entry's keys (kohya's names)."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a table/object of prompt settings, got {entry!r}")
    prompt = dict(base)
    for key, value in entry.items():
        if key not in FILE_KEYS:
            raise ValueError(f"unknown key {key!r}; known: {', '.join(FILE_KEYS)}")
        prompt[FILE_KEYS[key]] = value
    return prompt


def _from_mapping(entry, defaults):
    prompt = _apply_keys(entry, defaults)
    if not prompt["prompt"]:
        raise ValueError(f"an entry has no 'prompt': {entry!r}")
    return _finish(prompt)


def read_prompts(path, *, width=512, height=512, scale=7.5, steps=30, seed=None, negative_prompt="", sampler=None):
    """All prompts of a .txt (one a line), .toml (kohya's [prompt] / [[prompt.subset]]) or .json (list) file."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileNotFoundError(f"--sample_prompts {path}: no such file (expected a .txt with one prompt a line)")
    defaults = _defaults(width, height, scale, steps, seed, negative_prompt, sampler)
    if path.suffix.lower() in (".toml", ".json"):
        try:
            if path.suffix.lower() == ".json":
                entries = json.loads(path.read_text(encoding="utf-8"))
            else:
                from lora_diffusion.formats.io import loads_toml

                table = loads_toml(path.read_text(encoding="utf-8")).get("prompt", {})
                entries = table.pop("subset", [])
                defaults = _apply_keys(table, defaults)  # [prompt] holds file-wide defaults
            if not isinstance(entries, list):
                raise ValueError("expected a list of prompt objects")
            return [_from_mapping(entry, defaults) for entry in entries]
        except (ValueError, TypeError, AttributeError) as e:
            raise PromptFileError(f"--sample_prompts {path}: {e}") from e
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            prompts.append(parse_prompt_line(line, **{k: v for k, v in defaults.items() if k != "prompt"}))
        except ValueError as e:
            raise PromptFileError(f"--sample_prompts {path}, line {number}: {e}") from e
    return prompts


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


def _save_png(image, path, prompt):
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


@torch.no_grad()
def generate_samples(
    *,
    tokenizer,
    text_encoder,
    vae,
    unet,
    noise_scheduler,
    prompts,
    out_dir,
    step,
    epoch=None,
    output_name="",
    device="cpu",
    dtype=torch.float32,
    sampler="ddim",
    v_parameterization=False,
    clip_skip=None,
    max_token_length=None,
    seed=None,
    expand_prompt=None,
):
    """Generate one image per prompt dict (from read_prompts) into out_dir; returns the PNG paths.

    Pass unwrapped modules (accelerator.unwrap_model). noise_scheduler: the training scheduler or its
    config. A prompt without --d uses seed + index when `seed` is given, else a random seed. `epoch`
    set (sampling at an epoch end) names files e<epoch>, else <step>. dtype: autocast dtype for
    float16/bfloat16 weights. expand_prompt: applied to the prompts before encoding (a multi-vector token
    `sks` -> `sks sks_1`, LoRANetwork.expand_prompt); the PNG records the prompt as written.
    """
    from diffusers import StableDiffusionPipeline

    device = torch.device(device)
    expand = expand_prompt or (lambda text: text)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with sampling_session([text_encoder, vae, unet], device):
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=make_sample_scheduler(sampler, noise_scheduler, v_parameterization=v_parameterization),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        for index, prompt in enumerate(prompts):
            pipeline.scheduler = make_sample_scheduler(
                prompt.get("sampler") or sampler, noise_scheduler, v_parameterization=v_parameterization
            )
            prompt = dict(prompt, seed=prompt_seed(prompt, index, seed))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
                embeds = encode_prompts(
                    tokenizer, text_encoder, [expand(prompt["prompt"]), expand(prompt["negative_prompt"])],
                    clip_skip=clip_skip, max_token_length=max_token_length,
                ).to(device=device, dtype=unet.dtype)
                generator = torch.Generator(device="cpu" if device.type == "mps" else device)
                image = draw(
                    pipeline,
                    prompt_embeds=embeds[:1],
                    negative_prompt_embeds=embeds[1:],
                    width=prompt["width"],
                    height=prompt["height"],
                    num_inference_steps=prompt["steps"],
                    guidance_scale=prompt["scale"],
                    generator=generator.manual_seed(prompt["seed"]),
                )[0]
            path = out_dir / sample_filename(output_name, step=step, epoch=epoch, index=index, seed=prompt["seed"])
            _save_png(image, path, prompt)
            paths.append(path)
        del pipeline
    return paths


def draw(pipe, **kwargs):
    """A diffusers pipeline's images, with the latents decoded in the VAE's own dtype (fp32, or bf16) and outside
    any autocast: under fp16 the U-Net's latents would meet the fp32 VAE's weights, and SD's VAEs overflow in fp16."""
    latents = pipe(output_type="latent", **kwargs).images
    vae = pipe.vae
    with torch.no_grad(), torch.autocast(device_type=latents.device.type, enabled=False):
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")
