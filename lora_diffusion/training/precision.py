"""Precision of a run: TF32 on CUDA, the fp16 GradScaler (on the CPU too, so that the path runs in the tests) and
kohya's --full_fp16 (the LoRA's weights and gradients in fp16, unscaled by a GradScaler that accepts fp16)."""

import torch


def allow_tf32(device: torch.device, allowed: bool = True):
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later; ignored by older GPUs): about 8x the fp32
    matmul rate for a 10-bit mantissa, which fp32 runs and the fp32 parts of mixed-precision runs do not notice in a
    diffusion loss. PyTorch's own defaults (matmul off, cuDNN on) are kept with --no_tf32 and off CUDA."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


class FP16GradScaler(torch.amp.GradScaler):
    """--full_fp16: torch's GradScaler refuses to unscale fp16 gradients (they can underflow once divided); kohya's
    full fp16 training trains fp16 weights anyway, so their gradients are unscaled in place."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def install_grad_scaler(accelerator, *, full_fp16: bool):
    """Give an fp16 run the GradScaler it trains with; call before accelerator.prepare(optimizer). accelerate makes
    one on GPUs only: on the CPU fp16 runs here as on a GPU (autocast to fp16, scaled loss, skipped steps on
    inf/NaN gradients) instead of as fp16 weights without a scaler. With --full_fp16 the scaler also unscales the
    fp16 gradients of the LoRA."""
    if accelerator.mixed_precision != "fp16":
        return
    if accelerator.scaler is not None and not full_fp16:
        return
    accelerator.scaler = (FP16GradScaler if full_fp16 else torch.amp.GradScaler)(accelerator.device.type)
    accelerator.native_amp = True  # accelerator.autocast() and the unscale before clipping look at this


def loss_scale(accelerator) -> float | None:
    """The fp16 GradScaler's current scale (None without one)."""
    scaler = getattr(accelerator, "scaler", None)
    return None if scaler is None else float(scaler.get_scale())


def step_was_skipped(optimizer) -> bool:
    """Did the GradScaler skip the last optimizer.step() (inf/NaN gradients)? Then the LR schedule must not move."""
    return bool(getattr(optimizer, "step_was_skipped", False))
