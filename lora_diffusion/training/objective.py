"""What a training step trains towards: the noise added to the latents, the timesteps, the U-Net's input and target,
and the loss (kohya's noise and loss options). One object, built from the run's options (`Objective.of(args)`,
no default of its own: the options' declarations hold them); the loop asks it and nothing else, so research code
replaces a piece by subclassing it and passing `Run(objective=...)`, and a test by patching one of its methods."""

from dataclasses import dataclass, fields

from .noise import diffusion_loss, make_noise, perturbed_noise, sample_timesteps, training_target


@dataclass(frozen=True)
class Objective:
    noise_offset: float
    noise_offset_random_strength: bool
    adaptive_noise_scale: float | None
    multires_noise_iterations: int | None
    multires_noise_discount: float
    ip_noise_gamma: float | None
    ip_noise_gamma_random_strength: bool
    min_timestep: int
    max_timestep: int
    min_snr_gamma: float | None
    prior_loss_weight: float
    loss_type: str
    huber_schedule: str
    huber_c: float
    huber_scale: float
    scale_v_pred_loss_like_noise_pred: bool
    v_pred_like_loss: float | None
    debiased_estimation_loss: bool

    @classmethod
    def of(cls, args) -> "Objective":
        """The objective of a run's resolved options (train_lora.py's flags)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def noise(self, latents):
        """The noise to add: Gaussian, with kohya's offset / multires (pyramid) / adaptive options."""
        return make_noise(latents, noise_offset=self.noise_offset,
                          multires_noise_iterations=self.multires_noise_iterations,
                          multires_noise_discount=self.multires_noise_discount,
                          noise_offset_random_strength=self.noise_offset_random_strength,
                          adaptive_noise_scale=self.adaptive_noise_scale)

    def timesteps(self, batch_size, device):
        return sample_timesteps(batch_size, min_timestep=self.min_timestep, max_timestep=self.max_timestep,
                                device=device)

    def noisy_and_target(self, noise_scheduler, latents, noise, timesteps, v_parameterization):
        """The U-Net's input and what it must predict (noise or v); with --ip_noise_gamma the input is noised a
        little more than the target says."""
        noisy, target = training_target(noise_scheduler, latents, noise, timesteps, v_parameterization)
        if self.ip_noise_gamma:
            noisy = noise_scheduler.add_noise(latents, perturbed_noise(
                noise, self.ip_noise_gamma, random_strength=self.ip_noise_gamma_random_strength), timesteps)
        return noisy, target

    def loss(self, pred, target, *, timesteps, noise_scheduler, v_parameterization, is_reg, mask):
        """The batch's loss: kohya's loss type, min-SNR weighting, prior-loss weight of the regularization rows,
        the v-prediction options and the mask."""
        return diffusion_loss(pred, target, timesteps=timesteps, noise_scheduler=noise_scheduler,
                              min_snr_gamma=self.min_snr_gamma, v_parameterization=v_parameterization,
                              is_reg=is_reg, prior_loss_weight=self.prior_loss_weight, loss_type=self.loss_type,
                              huber_schedule=self.huber_schedule, huber_c_value=self.huber_c,
                              huber_scale=self.huber_scale, mask=mask,
                              scale_v_pred_loss_like_noise_pred=self.scale_v_pred_loss_like_noise_pred,
                              v_pred_like_loss=self.v_pred_like_loss,
                              debiased_estimation_loss=self.debiased_estimation_loss)
