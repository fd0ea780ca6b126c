"""kohya's --fused_backward_pass: each parameter is stepped by the optimizer as soon as its gradient is complete in
the backward pass, and its gradient freed at once, so the gradients of the whole network never exist together
(kohya: with Adafactor only, one micro-batch a step). A clipping --max_grad_norm then clips each tensor's gradient
by its own norm, as kohya's fused Adafactor does (there is no global norm before every gradient exists)."""

import torch

from .errors import TrainingError


def check_fused_backward(optimizer_type: str | None, gradient_accumulation_steps: int, mixed_precision: str,
                         num_processes: int = 1):
    """kohya's two conditions, and the two this trainer adds (the fp16 GradScaler unscales all gradients at once;
    DDP all-reduces a gradient after the hook that would step it)."""
    if (optimizer_type or "").lower() != "adafactor":
        raise TrainingError(f"--fused_backward_pass works with --optimizer_type Adafactor only (as kohya's), got "
                            f"{optimizer_type or 'AdamW'}")
    if gradient_accumulation_steps != 1:
        raise TrainingError(f"--fused_backward_pass steps each parameter during the backward pass, so it cannot "
                            f"accumulate: --gradient_accumulation_steps must be 1, got {gradient_accumulation_steps}")
    if mixed_precision == "fp16":
        raise TrainingError("--fused_backward_pass with --mixed_precision fp16: the GradScaler must see every "
                            "gradient before a step; use bf16 (or no mixed precision)")
    if num_processes > 1:
        raise TrainingError("--fused_backward_pass in a multi-process run: a parameter would be stepped before "
                            "its gradient is averaged over the processes; run it in one process")


def step_one(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, group_index: int):
    """optimizer.step() for one parameter: its group sees only it, the other groups nothing (the optimizer's
    per-parameter state and each group's lr and settings are its own); the groups are restored after."""
    groups = optimizer.param_groups
    kept = [g["params"] for g in groups]
    try:
        for i, group in enumerate(groups):
            group["params"] = [param] if i == group_index else []
        optimizer.step()
    finally:
        for group, params in zip(groups, kept):
            group["params"] = params


def install_fused_backward(optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> list:
    """Step each parameter of `optimizer` in a hook that runs once its gradient is accumulated, then free the
    gradient. The loop's own optimizer.step() afterwards finds no gradient and moves nothing (the schedule still
    steps). Returns the hook handles."""
    handles = []
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            def hook(p, index=index):
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
                step_one(optimizer, p, index)
                p.grad = None
            handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles
