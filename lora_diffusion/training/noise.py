"""Stable Diffusion's DDPM training objective: timesteps, noise, the target and the loss.

The loop does, per batch:
    timesteps = sample_timesteps(b, min_timestep=..., max_timestep=...)
    noise = make_noise(latents, noise_offset=..., multires_noise_iterations=...)
    noisy_latents, target = training_target(noise_scheduler, latents, noise, timesteps, v_parameterization)
    pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    loss = diffusion_loss(pred, target, timesteps=timesteps, noise_scheduler=noise_scheduler, ...)
All semantics follow kohya sd-scripts, so the same flags give the same training signal.
"""

import torch
import torch.nn.functional as F


def sample_timesteps(batch_size, *, min_timestep=0, max_timestep=1000, generator=None, device=None):
    """Uniform integer timesteps in [min_timestep, max_timestep) (max exclusive, as kohya's torch.randint)."""
    if not 0 <= min_timestep < max_timestep:
        raise ValueError(
            f"--min_timestep/--max_timestep: expected 0 <= min_timestep < max_timestep, "
            f"got min_timestep={min_timestep}, max_timestep={max_timestep}"
        )
    return torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator, device=device,
                         dtype=torch.long)


def pyramid_noise(noise, *, iterations, discount, generator=None):
    """Multi-resolution ("pyramid") noise: add upsampled low-resolution noise, then rescale to unit std.

    kohya's version: level i has size (h, w) / r**i with r drawn in [2, 4) per level, weight discount**i;
    level 0 is a second full-resolution draw. Stops once a side reaches 1 pixel.
    """
    b, c, h, w = noise.shape
    upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
    for i in range(iterations):
        # drawn on the generator's device (the CPU by default): .item() on a GPU draw would sync every level
        r = 2.0 + 2.0 * torch.rand((), generator=generator, device=generator.device if generator else "cpu").item()
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=generator, device=noise.device, dtype=torch.float32)
        noise = noise + upsample(low).to(noise.dtype) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def make_noise(latents, *, noise_offset=0.0, multires_noise_iterations=0, multires_noise_discount=0.3, generator=None):
    """Gaussian noise shaped like `latents`, with kohya's optional offset and multi-resolution noise.

    noise_offset adds noise_offset * randn(b, c, 1, 1) (a per-channel constant, lets the model learn
    very dark/bright images). Offset first, then the pyramid, as kohya does.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        offset = torch.randn((b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    if multires_noise_iterations:
        noise = pyramid_noise(
            noise, iterations=multires_noise_iterations, discount=multires_noise_discount, generator=generator
        )
    return noise


def _per_sample(values, timesteps, ndim):
    """values[timesteps] broadcastable against a (b, ...) tensor of `ndim` dims."""
    v = values[timesteps]
    return v.reshape(v.shape + (1,) * (ndim - 1))


def training_target(noise_scheduler, latents, noise, timesteps, v_parameterization):
    """(noisy_latents, target): the U-Net input and what its output is compared with.

    target = noise (epsilon prediction) or the velocity sqrt(a_t) * noise - sqrt(1 - a_t) * latents
    (v prediction, SD 2.x 768-v), a_t = alphas_cumprod[t].
    """
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if not v_parameterization:
        return noisy_latents, noise
    if hasattr(noise_scheduler, "get_velocity"):
        return noisy_latents, noise_scheduler.get_velocity(latents, noise, timesteps)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)
    a_t = _per_sample(alphas_cumprod, timesteps.to(latents.device), latents.ndim)
    return noisy_latents, a_t.sqrt() * noise - (1 - a_t).sqrt() * latents


def snr(timesteps, noise_scheduler):
    """Signal-to-noise ratio alphas_cumprod[t] / (1 - alphas_cumprod[t]) per timestep, in fp32."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    a_t = alphas_cumprod[timesteps]
    return a_t / (1 - a_t)


def min_snr_weights(timesteps, noise_scheduler, gamma, v_parameterization):
    """Min-SNR-gamma loss weights (Hang et al. 2023), per sample.

    epsilon: min(SNR, gamma) / SNR; v prediction: min(SNR, gamma) / (SNR + 1).
    """
    s = snr(timesteps, noise_scheduler)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if v_parameterization else clipped / s


def diffusion_loss(
    pred,
    target,
    *,
    timesteps,
    noise_scheduler,
    min_snr_gamma=None,
    v_parameterization=False,
    is_reg=None,
    prior_loss_weight=1.0,
):
    """The scalar training loss: per-sample MSE in fp32, reg samples x prior_loss_weight, min-SNR, mean.

    is_reg: None or a (b,) bool tensor/list marking prior-preservation (regularization) samples.
    min_snr_gamma: None or 0 = off (kohya's `if args.min_snr_gamma`).
    """
    if pred.shape != target.shape:
        raise ValueError(f"diffusion_loss: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if min_snr_gamma is not None and min_snr_gamma < 0:
        raise ValueError(f"--min_snr_gamma must be positive (5 is typical), got {min_snr_gamma}")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))  # (b,)
    if is_reg is not None:
        is_reg = torch.as_tensor(is_reg, dtype=torch.bool, device=loss.device)
        if is_reg.shape != loss.shape:
            raise ValueError(f"diffusion_loss: is_reg must have shape ({loss.shape[0]},), got {tuple(is_reg.shape)}")
        loss = loss * torch.where(is_reg, float(prior_loss_weight), 1.0)
    if min_snr_gamma:
        loss = loss * min_snr_weights(timesteps.to(loss.device), noise_scheduler, min_snr_gamma, v_parameterization)
    return loss.mean()
