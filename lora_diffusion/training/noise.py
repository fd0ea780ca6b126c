"""Stable Diffusion's DDPM training objective: timesteps, noise, the target and the loss.

The loop does, per batch:
    timesteps = sample_timesteps(b, min_timestep=..., max_timestep=...)
    noise = make_noise(latents, noise_offset=..., multires_noise_iterations=...)
    noisy_latents, target = training_target(noise_scheduler, latents, noise, timesteps, v_parameterization)
    pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    loss = diffusion_loss(pred, target, timesteps=timesteps, noise_scheduler=noise_scheduler, ...)
All semantics follow kohya sd-scripts, so the same flags give the same training signal.
"""

import math

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


def make_noise(latents, *, noise_offset=0.0, multires_noise_iterations=0, multires_noise_discount=0.3, generator=None,
               noise_offset_random_strength=False, adaptive_noise_scale=None):
    """Gaussian noise shaped like `latents`, with kohya's optional offset and multi-resolution noise.

    noise_offset adds offset * randn(b, c, 1, 1) (a per-channel constant, lets the model learn very dark/bright
    images); offset = noise_offset, or a uniform draw in [0, noise_offset) with noise_offset_random_strength, plus
    adaptive_noise_scale * |each latent channel's mean| (clamped at 0). Offset first, then the pyramid, as kohya.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        offset = noise_offset
        if noise_offset_random_strength:
            offset = torch.rand(1, generator=generator, device=latents.device, dtype=latents.dtype) * noise_offset
        if adaptive_noise_scale is not None:
            offset = (offset + adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
        direction = torch.randn((b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + offset * direction
    if multires_noise_iterations:
        noise = pyramid_noise(
            noise, iterations=multires_noise_iterations, discount=multires_noise_discount, generator=generator
        )
    return noise


def perturbed_noise(noise, ip_noise_gamma=None, *, random_strength=False, generator=None):
    """Input perturbation (Ning et al. 2023, kohya's --ip_noise_gamma): the latents are noised with
    noise + gamma * another draw, while the target stays `noise`; gamma uniform in [0, ip_noise_gamma) per batch
    with random_strength."""
    if not ip_noise_gamma:
        return noise
    gamma = ip_noise_gamma
    if random_strength:
        gamma = torch.rand(1, generator=generator, device=noise.device, dtype=noise.dtype) * ip_noise_gamma
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


def with_zero_terminal_snr(noise_scheduler):
    """The scheduler with its betas rescaled so that the last timestep has zero SNR (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"; kohya's --zero_terminal_snr)."""
    import copy

    alphas_bar_sqrt = noise_scheduler.alphas_cumprod.double().sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)  # shift to 0 at the end, keep the start
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    rescaled = copy.deepcopy(noise_scheduler)
    rescaled.betas = (1 - alphas).float()
    rescaled.alphas = alphas.float()
    rescaled.alphas_cumprod = alphas_bar.float()
    return rescaled


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


def huber_c(timesteps, noise_scheduler, *, loss_type, huber_schedule="snr", huber_c=0.1, huber_scale=1.0):
    """kohya's per-sample c of the Huber / smooth L1 loss: constant (c x scale), exponential in the timestep
    (c**(t / T) x scale), or snr: (1 - c) / (1 + sigma_t)**2 + c with sigma_t = sqrt((1 - a_t) / a_t), which
    kohya does not scale."""
    if loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.to(torch.float32)
    if huber_schedule == "constant":
        return torch.full_like(t, huber_c * huber_scale)
    if huber_schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / noise_scheduler.config.num_train_timesteps) * huber_scale
    if huber_schedule == "snr":
        a_t = noise_scheduler.alphas_cumprod.to(torch.float32)[timesteps.cpu()].to(timesteps.device)
        sigmas = ((1 - a_t) / a_t).sqrt()
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"--huber_schedule {huber_schedule!r}: expected constant, exponential or snr")


def elementwise_loss(pred, target, loss_type="l2", c=None):
    """The loss of each element: (pred - target)**2 (l2), |pred - target| (l1), the pseudo-Huber
    2c(sqrt(d**2 + c**2) - c) (huber) or 2(sqrt(d**2 + c**2) - c) (smooth_l1), c per sample."""
    d = pred.float() - target.float()
    if loss_type == "l2":
        return d**2
    if loss_type == "l1":
        return d.abs()
    if loss_type in ("huber", "smooth_l1"):
        c = c.to(d.device).view(-1, *([1] * (d.ndim - 1)))
        root = (d**2 + c**2).sqrt() - c
        return 2 * c * root if loss_type == "huber" else 2 * root
    raise ValueError(f"--loss_type {loss_type!r}: expected l1, l2, huber or smooth_l1")


def masked(loss, mask):
    """kohya's masked loss: each element's loss times the mask (b, H, W in [0, 1]) shrunk to the latent size by
    area averaging; the mean is then taken over every element, masked ones counting as 0."""
    mask = F.interpolate(mask.to(loss.device, loss.dtype)[:, None], size=loss.shape[2:], mode="area")
    return loss * mask


def _clipped_snr(timesteps, noise_scheduler):
    return torch.clamp(snr(timesteps, noise_scheduler), max=1000)  # t = 0 has an infinite SNR


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
    loss_type="l2",
    huber_schedule="snr",
    huber_c_value=0.1,
    huber_scale=1.0,
    mask=None,
    scale_v_pred_loss_like_noise_pred=False,
    v_pred_like_loss=None,
    debiased_estimation_loss=False,
):
    """The scalar training loss, in kohya's order: the element loss in fp32 (--loss_type), the mask, the mean per
    sample, reg samples x prior_loss_weight, then min-SNR, the v-prediction scalings and debiased estimation, and
    the mean.

    is_reg: None or a (b,) bool tensor/list marking prior-preservation (regularization) samples.
    min_snr_gamma: None or 0 = off (kohya's `if args.min_snr_gamma`).
    """
    if pred.shape != target.shape:
        raise ValueError(f"diffusion_loss: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if min_snr_gamma is not None and min_snr_gamma < 0:
        raise ValueError(f"--min_snr_gamma must be positive (5 is typical), got {min_snr_gamma}")
    c = huber_c(timesteps, noise_scheduler, loss_type=loss_type, huber_schedule=huber_schedule, huber_c=huber_c_value,
                huber_scale=huber_scale)
    loss = elementwise_loss(pred, target, loss_type, c)
    if mask is not None:
        loss = masked(loss, mask)
    loss = loss.mean(dim=list(range(1, loss.ndim)))  # (b,)
    if is_reg is not None:
        is_reg = torch.as_tensor(is_reg, dtype=torch.bool, device=loss.device)
        if is_reg.shape != loss.shape:
            raise ValueError(f"diffusion_loss: is_reg must have shape ({loss.shape[0]},), got {tuple(is_reg.shape)}")
        loss = loss * torch.where(is_reg, float(prior_loss_weight), 1.0)
    t = timesteps.to(loss.device)
    if min_snr_gamma:
        loss = loss * min_snr_weights(t, noise_scheduler, min_snr_gamma, v_parameterization)
    if scale_v_pred_loss_like_noise_pred or v_pred_like_loss:
        s = _clipped_snr(t, noise_scheduler)
        scale = s / (s + 1)
        if scale_v_pred_loss_like_noise_pred:
            loss = loss * scale
        if v_pred_like_loss:
            loss = loss + loss / scale * v_pred_like_loss
    if debiased_estimation_loss:
        s = _clipped_snr(t, noise_scheduler)
        loss = loss * (1 / (s + 1) if v_parameterization else 1 / s.sqrt())
    return loss.mean()
