"""Optimizers and learning-rate schedules by kohya's names (--optimizer_type, --lr_scheduler).

    optimizer = create_optimizer("AdamW8bit", network.param_groups(...), learning_rate=1e-4,
                                 optimizer_args=["weight_decay=0.01", "betas=0.9,0.99"])
    lr_scheduler = create_lr_scheduler("cosine", optimizer, num_training_steps=1000, lr_warmup_steps=0.05)

Learning-rate semantics that differ from plain Adam:
- Prodigy estimates the step size itself; `lr` is a multiplier on its estimate: use 1.0 (kohya warns below 0.1).
- Adafactor with relative_step=True (the default, as in kohya) computes its own step size from the step
  count; the learning rate and per-group lrs are ignored, and the schedule must be "adafactor" (a proxy
  that reports Adafactor's internal lr for logging). Pass relative_step=False scale_parameter=False
  warmup_init=False to use --learning_rate with an ordinary schedule (constant_with_warmup suits it).
- Lion wants a 3-10x smaller lr than AdamW and a larger weight decay.
"""

import ast
import importlib
import logging
import math

import torch

logger = logging.getLogger(__name__)


class MissingPackageError(ImportError, ValueError):
    """An optional package an option needs is not installed (the message says how to install it)."""


def parse_optimizer_args(optimizer_args, flag="--optimizer_args"):
    """kohya's --optimizer_args: ["k=v", ...] (or one "k=v k=v" string, or a dict) -> dict.

    Values are Python literals (0.01, True, (0.9, 0.99); "0.9,0.99" reads as a tuple as in kohya);
    anything else is kept as a string.
    """
    if optimizer_args is None:
        return {}
    if isinstance(optimizer_args, dict):
        return dict(optimizer_args)
    if isinstance(optimizer_args, str):
        optimizer_args = optimizer_args.split()
    kwargs = {}
    for item in optimizer_args:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag}: expected key=value items such as weight_decay=0.01, got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            kwargs[key.strip()] = value.strip()
        numbers = kwargs[key.strip()] if isinstance(kwargs[key.strip()], tuple) else (kwargs[key.strip()],)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{flag} {item!r}: expected a finite number")
    return kwargs


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated momentum.

    update = sign(beta1 * m + (1 - beta1) * g);  p -= lr * (update + weight_decay * p);
    m = beta2 * m + (1 - beta2) * g
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be positive, got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - lr * weight_decay)
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def _bitsandbytes_class(name):
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingPackageError(
            f"--optimizer_type {name} needs bitsandbytes, which is not installed (or failed to load: {e}). "
            f'Install it with: pip install "lora-diffusion[bnb]"  (or: pip install bitsandbytes), '
            f"or use --optimizer_type AdamW."
        ) from e
    return getattr(bitsandbytes.optim, name)


def _prodigy_class(name):
    try:
        import prodigyopt
    except ImportError as e:
        raise MissingPackageError(
            "--optimizer_type Prodigy needs the prodigyopt package. Install it with: pip install prodigyopt"
        ) from e
    return prodigyopt.Prodigy


def _package_class(package, attribute, pip_name):
    def get(name):
        try:
            module = importlib.import_module(package)
        except ImportError as e:
            raise MissingPackageError(f"--optimizer_type {name} needs the {pip_name} package. Install it with: "
                                      f"pip install {pip_name}") from e
        return getattr(module, attribute)
    return get


def _adafactor_class(name):
    from transformers.optimization import Adafactor

    return Adafactor


# lower-case kohya name -> (display name, function returning the class)
OPTIMIZERS = {
    "adamw": ("AdamW", lambda name: torch.optim.AdamW),
    "adamw8bit": ("AdamW8bit", _bitsandbytes_class),
    "pagedadamw8bit": ("PagedAdamW8bit", _bitsandbytes_class),
    "lion": ("Lion", lambda name: Lion),
    "lion8bit": ("Lion8bit", _bitsandbytes_class),
    "pagedlion8bit": ("PagedLion8bit", _bitsandbytes_class),
    "sgdnesterov": ("SGDNesterov", lambda name: torch.optim.SGD),
    "prodigy": ("Prodigy", _prodigy_class),
    "adafactor": ("Adafactor", _adafactor_class),
    # D-Adaptation (Defazio & Mishchenko 2023): like Prodigy, lr is a multiplier on its own estimate
    "dadaptation": ("DAdaptAdam", _package_class("dadaptation", "DAdaptAdam", "dadaptation")),
    "dadaptadam": ("DAdaptAdam", _package_class("dadaptation", "DAdaptAdam", "dadaptation")),
    "dadaptadagrad": ("DAdaptAdaGrad", _package_class("dadaptation", "DAdaptAdaGrad", "dadaptation")),
    "dadaptadan": ("DAdaptAdan", _package_class("dadaptation", "DAdaptAdan", "dadaptation")),
    "dadaptadanip": ("DAdaptAdanIP", _package_class("dadaptation.experimental", "DAdaptAdanIP", "dadaptation")),
    "dadaptlion": ("DAdaptLion", _package_class("dadaptation", "DAdaptLion", "dadaptation")),
    "dadaptsgd": ("DAdaptSGD", _package_class("dadaptation", "DAdaptSGD", "dadaptation")),
    # schedule-free (Defazio et al. 2024): no lr schedule; eval() weights are the ones to save and sample
    "adamwschedulefree": ("AdamWScheduleFree", _package_class("schedulefree", "AdamWScheduleFree", "schedulefree")),
    "radamschedulefree": ("RAdamScheduleFree", _package_class("schedulefree", "RAdamScheduleFree", "schedulefree")),
    "sgdschedulefree": ("SGDScheduleFree", _package_class("schedulefree", "SGDScheduleFree", "schedulefree")),
}
ADAPTIVE = {"prodigy", "dadaptation", "dadaptadam", "dadaptadagrad", "dadaptadan", "dadaptadanip", "dadaptlion",
            "dadaptsgd"}


def _import_class(path):
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--optimizer_type {path!r}: cannot import {class_name} from {module_name} ({e})") from e


def _drop_group_lrs(param_groups):
    had_group_lr = False
    for group in param_groups:
        if isinstance(group, dict) and group.pop("lr", None) is not None:
            had_group_lr = True
    if had_group_lr:
        logger.warning("Adafactor with relative_step=True ignores --unet_lr/--text_encoder_lr (per-group lrs)")


def create_optimizer(optimizer_type, param_groups, *, learning_rate, optimizer_args=None, schedulefree_wrapper=False):
    """An optimizer by kohya name (AdamW, AdamW8bit, Lion, Prodigy, Adafactor, SGDNesterov, ...) or `module.Class`.

    param_groups: parameters or a list of {"params": [...], "lr": ...} dicts (per-group lrs win over
    learning_rate). optimizer_args: see parse_optimizer_args.
    """
    kwargs = parse_optimizer_args(optimizer_args)
    if "lr" in kwargs:
        raise ValueError("--optimizer_args: set the learning rate with --learning_rate/--unet_lr, not lr=")
    param_groups = [dict(g) if isinstance(g, dict) else g for g in param_groups]  # never edit the caller's dicts
    if not param_groups:
        raise ValueError("create_optimizer: no parameters to train (is the network empty, or both halves disabled?)")
    name = optimizer_type or "AdamW"
    key = name.lower()
    if key in OPTIMIZERS:
        display_name, get_class = OPTIMIZERS[key]
        optimizer_class = get_class(display_name)
    elif "." in name:
        optimizer_class = _import_class(name)
        key = None
    else:
        known = ", ".join(display for display, _ in OPTIMIZERS.values())
        raise ValueError(f"--optimizer_type {name!r} is not known. Use one of {known}, or a module.Class path")

    lr = learning_rate
    if key == "sgdnesterov":
        kwargs.setdefault("momentum", 0.9)
        kwargs["nesterov"] = True
    elif key in ADAPTIVE and lr is not None and lr <= 0.1:
        logger.warning(f"{name}: learning_rate={lr} is a multiplier on its own estimate of the step; 1.0 is usual")
    elif key == "adafactor":
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True  # Adafactor's warmup_init only exists with relative steps
        if kwargs["relative_step"]:
            _drop_group_lrs(param_groups)
            lr = None  # Adafactor refuses an explicit lr with relative_step=True
    try:
        if schedulefree_wrapper:  # schedule-free around any base optimizer (its momentum moves to the wrapper)
            import schedulefree

            wrapper_keys = {"momentum", "weight_decay_at_y", "r", "weight_lr_power"}
            wrapped = {k: kwargs.pop(k) for k in list(kwargs) if k in wrapper_keys}
            return schedulefree.ScheduleFreeWrapper(optimizer_class(param_groups, lr=lr, **kwargs), **wrapped)
        return optimizer_class(param_groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as e:  # betas="abc", an unknown keyword, a negative eps ...
        given = " ".join(f"{k}={v!r}" for k, v in kwargs.items() if k not in ("nesterov", "relative_step"))
        raise ValueError(f"--optimizer_type {name} refuses --optimizer_args {given or '(none)'} with "
                         f"--learning_rate {learning_rate}: {e}") from None


def is_schedule_free(optimizer) -> bool:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return "ScheduleFree" in type(optimizer).__name__


def set_schedule_free_mode(optimizer, train: bool):
    """Schedule-free optimizers keep two points: train() before steps, eval() before the weights are saved,
    sampled or validated (kohya calls these around its sampling and saving too). Others: nothing."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if is_schedule_free(inner):
        inner.train() if train else inner.eval()


def describe_optimizer(optimizer, optimizer_args=None):
    """kohya's ss_optimizer string: "module.Class(k=v,k=v)" (or "module.Class" without args)."""
    cls = type(optimizer)
    args = ",".join(f"{k}={v}" for k, v in parse_optimizer_args(optimizer_args).items())
    return f"{cls.__module__}.{cls.__name__}" + (f"({args})" if args else "")


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "cosine_with_min_lr", "inverse_sqrt", "warmup_stable_decay", "adafactor")


def warmup_steps(lr_warmup_steps, num_training_steps):
    """--lr_warmup_steps: an int, or a float < 1 meaning that fraction of the training steps."""
    try:
        value = float(lr_warmup_steps)
    except (TypeError, ValueError):
        value = -1.0
    if 0 <= value < 1 and isinstance(lr_warmup_steps, float):
        steps = int(value * num_training_steps)
    else:
        steps = int(value) if value.is_integer() else -1
    if steps < 0:
        raise ValueError(
            f"--lr_warmup_steps: expected a step count or a fraction < 1 of the total, got {lr_warmup_steps!r}"
        )
    if steps > num_training_steps:
        raise ValueError(f"--lr_warmup_steps {steps} is more than the {num_training_steps} training steps")
    return steps


def _uses_relative_step(optimizer):
    return type(optimizer).__name__ == "Adafactor" and optimizer.defaults.get("relative_step", False)


def _scheduler_class(path):
    if "." not in path:
        cls = getattr(torch.optim.lr_scheduler, path, None)
        if cls is None:
            raise ValueError(f"--lr_scheduler_type {path!r} is not a class of torch.optim.lr_scheduler; give one "
                             f"(CosineAnnealingLR, OneCycleLR, ...) or a module.Class path")
        return cls
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--lr_scheduler_type {path!r}: cannot import {class_name} from {module_name} ({e})") from e


def create_lr_scheduler(
    name,
    optimizer,
    *,
    num_training_steps,
    lr_warmup_steps=0,
    lr_scheduler_num_cycles=1,
    lr_scheduler_power=1.0,
    lr_scheduler_type=None,
    lr_scheduler_args=None,
    lr_decay_steps=0,
    lr_scheduler_timescale=None,
    lr_scheduler_min_lr_ratio=None,
):
    """A per-step LambdaLR by kohya/diffusers name; call .step() after every optimizer step.

    num_training_steps is the number of scheduler steps: under `accelerate` with N processes a prepared
    scheduler steps N times per optimizer step, so pass max_train_steps * N there (as kohya does).
    "constant" ignores warmup; "cosine_with_restarts" restarts lr_scheduler_num_cycles times;
    "polynomial" decays to 1e-7 with exponent lr_scheduler_power; "cosine_with_min_lr" ends at
    lr_scheduler_min_lr_ratio x lr; "warmup_stable_decay" decays over lr_decay_steps (a count, or a fraction < 1)
    at the end; "inverse_sqrt" decays as 1/sqrt(step / lr_scheduler_timescale); "adafactor[:initial_lr]" only
    reports Adafactor's own step size. lr_scheduler_type: a class (torch.optim.lr_scheduler's, or module.Class)
    built with lr_scheduler_args instead. Schedule-free optimizers get a constant schedule.
    """
    from diffusers.optimization import get_scheduler
    from transformers import optimization

    name = (name or "constant").lower()
    base_name = name.split(":")[0]
    if base_name not in LR_SCHEDULERS:
        raise ValueError(f"--lr_scheduler {name!r} is not known. Use one of {', '.join(LR_SCHEDULERS)}")
    if not isinstance(num_training_steps, int) or num_training_steps < 1:
        raise ValueError(f"create_lr_scheduler: num_training_steps must be a positive int, got {num_training_steps!r}")
    extra = parse_optimizer_args(lr_scheduler_args or [], flag="--lr_scheduler_args")
    if lr_scheduler_type:
        if warmup_steps(lr_warmup_steps, num_training_steps):
            raise ValueError(f"--lr_scheduler_type {lr_scheduler_type} takes no --lr_warmup_steps (give its own "
                             f"arguments with --lr_scheduler_args)")
        try:
            return _scheduler_class(lr_scheduler_type)(optimizer, **extra)
        except TypeError as e:
            raise ValueError(f"--lr_scheduler_type {lr_scheduler_type} refuses --lr_scheduler_args "
                             f"{' '.join(lr_scheduler_args or []) or '(none)'}: {e}") from None
    if is_schedule_free(optimizer):
        if base_name != "constant":
            logger.warning(f"{type(optimizer).__name__} is schedule-free: --lr_scheduler {name} replaced by constant")
        return get_scheduler("constant", optimizer)
    if base_name != "adafactor" and _uses_relative_step(optimizer):
        logger.warning(f"Adafactor with relative_step=True sets its own lr: --lr_scheduler {name} replaced by "
                       f"adafactor")
        base_name = "adafactor"
    if base_name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        if type(optimizer).__name__ != "Adafactor":
            raise ValueError(f"--lr_scheduler adafactor needs --optimizer_type Adafactor, "
                             f"not {type(optimizer).__name__}")

        initial_lr = float(name.split(":")[1]) if ":" in name else 0.0
        return AdafactorSchedule(optimizer, initial_lr=initial_lr)

    num_warmup_steps = warmup_steps(lr_warmup_steps, num_training_steps)
    if base_name == "constant" and num_warmup_steps > 0:
        logger.warning("--lr_scheduler constant ignores --lr_warmup_steps; use constant_with_warmup for a warmup")
    if base_name == "cosine_with_min_lr":
        return optimization.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps, num_training_steps, num_cycles=lr_scheduler_num_cycles / 2,
            min_lr_rate=lr_scheduler_min_lr_ratio or 0.0, **extra)
    if base_name == "inverse_sqrt":
        return optimization.get_inverse_sqrt_schedule(optimizer, num_warmup_steps, timescale=lr_scheduler_timescale,
                                                      **extra)
    if base_name == "warmup_stable_decay":
        decay = int(lr_decay_steps * num_training_steps) if isinstance(lr_decay_steps, float) else lr_decay_steps
        if not 0 < decay <= num_training_steps - num_warmup_steps:
            raise ValueError(f"--lr_scheduler warmup_stable_decay needs --lr_decay_steps between 1 and the steps "
                             f"after the warmup ({num_training_steps - num_warmup_steps}), got {lr_decay_steps}")
        return optimization.get_wsd_schedule(
            optimizer, num_warmup_steps, decay, num_stable_steps=num_training_steps - num_warmup_steps - decay,
            num_cycles=lr_scheduler_num_cycles / 2, min_lr_ratio=lr_scheduler_min_lr_ratio or 0.0, **extra)
    return get_scheduler(
        base_name,
        optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
        num_cycles=lr_scheduler_num_cycles,
        power=lr_scheduler_power,
        **extra,
    )
