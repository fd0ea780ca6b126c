"""Sample images during training (--sample_prompts, --sample_every_n_steps/epochs), kohya style.

The prompt files (one prompt a line with inline --n/--w/--h/--d/--l/--s/--ss options, or kohya's .toml/.json) are
read by lora_diffusion.models.prompts. The images are drawn by the one sampling loop,
lora_diffusion.models.sampling.sample_images, which asks the model's family for its pipeline and prompt inputs;
generate_samples is that loop for SD1.x/2.x modules passed one by one.
"""


import torch

from lora_diffusion.models.family import SDModels, family_named
from lora_diffusion.models.prompts import (  # noqa: F401  read here before they moved down to models
    FILE_KEYS,
    PROMPT_OPTIONS,
    PromptFileError,
    PromptFileNotFoundError,
    parse_prompt_line,
    read_prompts,
)
from lora_diffusion.models.sampling import (  # noqa: F401  the names of this module before sampling moved down
    SAMPLERS,
    draw,
    make_sample_scheduler,
    prompt_seed,
    sample_filename,
    sample_images,
    sampling_session,
)
from lora_diffusion.models.sampling import save_png as _save_png  # noqa: F401


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
    models = SDModels(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                      noise_scheduler=noise_scheduler, v2=False, v_parameterization=v_parameterization, name="",
                      family=family_named("sd"))
    return sample_images(models, prompts=prompts, out_dir=out_dir, step=step, epoch=epoch, output_name=output_name,
                         device=device, dtype=dtype, sampler=sampler, clip_skip=clip_skip,
                         max_token_length=max_token_length, seed=seed, expand_prompt=expand_prompt)
