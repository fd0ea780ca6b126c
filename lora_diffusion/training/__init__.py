"""The pieces a training loop calls, each taking plain arguments (see docs/training.md)."""

from .errors import TrainingError
from .metadata import TRAINING_KEYS, run_metadata, training_metadata
from .noise import (
    diffusion_loss,
    elementwise_loss,
    huber_c,
    make_noise,
    min_snr_weights,
    perturbed_noise,
    pyramid_noise,
    sample_timesteps,
    snr,
    training_target,
    with_zero_terminal_snr,
)
from .optim import (
    Lion,
    MissingPackageError,
    create_lr_scheduler,
    create_optimizer,
    describe_optimizer,
    parse_optimizer_args,
    warmup_steps,
)
from .sampling import PromptFileError, generate_samples, make_sample_scheduler, parse_prompt_line, read_prompts
from .sdxl import cache_text_encoder_outputs_sdxl, encode_prompts_sdxl, sdxl_time_ids
from .state import (
    StateError,
    StateNotFoundError,
    atomic_write,
    load_state,
    non_finite,
    read_train_state,
    rotate,
    save_state,
)
from .text import cache_text_encoder_outputs, encode_prompts, encode_token_ids, tokenize_captions

__all__ = [
    "TrainingError", "TRAINING_KEYS", "run_metadata", "training_metadata",
    "diffusion_loss", "elementwise_loss", "huber_c", "perturbed_noise", "with_zero_terminal_snr",
    "make_noise", "min_snr_weights", "pyramid_noise", "sample_timesteps", "snr", "training_target",
    "Lion", "MissingPackageError", "create_lr_scheduler", "create_optimizer", "describe_optimizer",
    "parse_optimizer_args", "warmup_steps",
    "PromptFileError", "generate_samples", "make_sample_scheduler", "parse_prompt_line", "read_prompts",
    "StateError", "StateNotFoundError", "atomic_write", "load_state", "non_finite", "read_train_state", "rotate",
    "save_state",
    "cache_text_encoder_outputs", "encode_prompts", "encode_token_ids", "tokenize_captions",
    "cache_text_encoder_outputs_sdxl", "encode_prompts_sdxl", "sdxl_time_ids",
]
