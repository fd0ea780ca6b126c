"""Train a LoRA for Stable Diffusion: `python train_lora.py --flags` (kohya sd-scripts' flag names).

    python train_lora.py --config_file examples/quickstart/config.toml

Reads top to bottom: flags -> accelerator -> models -> data -> network -> optimizer -> the loop -> files.
The pieces live in the package (lora_diffusion.training, lora_diffusion.core.network,
lora_diffusion.data.dataset); this file wires them. `python train_lora.py` (the repository root) and
`lora-diffusion train` both run main().
"""

import argparse
import importlib.util
import logging
import math
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

import lora_diffusion.models as base_models  # load_models through the package: tests replace it there
from lora_diffusion.cli import set_cpu_threads
from lora_diffusion.concepts.edlora import (
    RANDOM_FIRST_STD,
    LayerwiseTokenEmbeddings,
    attention_term,
    concept_attention,
    mean_norm,
    norm_freeze,
)
from lora_diffusion.concepts.layerwise import LayerwiseEmbeddings
from lora_diffusion.core.network import (
    ALGOS,
    TokenEmbeddings,
    check_token_name,
    create_network,
    dim_from_weights,
    merge_base_weights,
)
from lora_diffusion.data import dataset as image_data  # collate_fn through the module: tests replace it there
from lora_diffusion.data.debug import debug_dataset
from lora_diffusion.data.latents import cache_latents_in_shares
from lora_diffusion.data.subset import FLAG_DEFAULTS
from lora_diffusion.formats.io import loads_toml
from lora_diffusion.models import DIFFUSERS_DTYPE_KWARG, detect_family
from lora_diffusion.models.checkpoint import CheckpointReader
from lora_diffusion.models.convert import VAE_PREFIX, vae_name
from lora_diffusion.models.family import fallback_family
from lora_diffusion.models.float8 import store_in_float8
from lora_diffusion.models.offload import offload_saved_tensors
from lora_diffusion.options import build_parser as parser_of
from lora_diffusion.options import trainer_options
from lora_diffusion.options.flag_file import read_config_file, write_config_file
from lora_diffusion.options.network_args import NetworkArgsError, network_keywords

from .errors import TrainingError
from .fused_backward import check_fused_backward, install_fused_backward
from .loop import NetworkForward, Run, RunState, ShardedBatches, save_final_files, train_epochs
from .metadata import run_metadata
from .noise import with_zero_terminal_snr
from .optim import create_lr_scheduler, create_optimizer, describe_optimizer
from .outputs import check_free_space, outputs_of_other_runs, prepare_output_dir
from .precision import allow_tf32, install_grad_scaler
from .progress import ProgressFile, progress_path
from .sampling import SAMPLERS, read_prompts
from .state import load_state, read_train_state
from .text_cache import cache_text_outputs_on_disk, encoders_fingerprint
from .validation import Validation, best_epoch, build_validation_set

MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed_precision


# ---------------------------------------------------------------------------------------------------------------
# Flags


def build_parser(prog=None) -> argparse.ArgumentParser:

    return parser_of(trainer_options(), prog=prog, description=__doc__)


def parse_args(argv=None, prog=None) -> argparse.Namespace:

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.config_file:  # file values are defaults; flags given on the command line win
        parser.set_defaults(**read_config_file(args.config_file, parser))
        args = parser.parse_args(argv)
    args = resolve(args)
    args.parser = parser
    return args


def resolve(given: argparse.Namespace) -> argparse.Namespace:
    """The run's settings from the flags as given: checked (every error names its flag, before any work) and with
    the values that follow from others filled in. `given` is left as it was."""


    def bad(message):
        raise TrainingError(message)

    args = argparse.Namespace(**vars(given))
    for option in trainer_options():
        if option.refused and not option.dest and getattr(args, option.name) not in (option.default, None, False, []):
            bad(f"--{option.name}: {option.refused}")
    if not args.output_config and not args.pretrained_model_name_or_path:
        bad("--pretrained_model_name_or_path is required (a diffusers folder, an SD checkpoint, or builtin:tiny)")
    check_model_path(args.pretrained_model_name_or_path, bad)
    if args.seed is not None and not 0 <= args.seed < 2**32:
        bad(f"--seed {args.seed}: expected a whole number from 0 to 2**32 - 1 ({2**32 - 1})")
    if args.log_with in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        bad(f"--log_with {args.log_with}: wandb is not installed (pip install wandb); or use --log_with tensorboard")
    if args.log_tracker_config and not Path(args.log_tracker_config).is_file():
        bad(f"--log_tracker_config {args.log_tracker_config}: no such file (a TOML of tracker settings)")
    if args.base_weights_multiplier and len(args.base_weights_multiplier) > len(args.base_weights or []):
        bad(f"--base_weights_multiplier: {len(args.base_weights_multiplier)} values for "
            f"{len(args.base_weights or [])} --base_weights files")
    for path in args.base_weights or []:
        if not Path(path).is_file():
            bad(f"--base_weights {path}: not found (a LoRA .safetensors to merge into the model)")
    if args.dim_from_weights and not args.network_weights:
        bad("--dim_from_weights takes the ranks from --network_weights: give that file")
    if args.full_bf16 and args.mixed_precision != "bf16":
        bad("--full_bf16 needs --mixed_precision bf16")
    if args.full_fp16 and args.mixed_precision != "fp16":
        bad("--full_fp16 needs --mixed_precision fp16")
    if args.use_lion_optimizer:
        args.optimizer_type = "Lion"
    if args.fused_backward_pass:  # kohya's conditions and ours (one process is checked once it is known)
        check_fused_backward(args.optimizer_type, args.gradient_accumulation_steps, args.mixed_precision)
    if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
        warnings.warn("--cpu_offload_checkpointing does nothing without --gradient_checkpointing (as in kohya's "
                      "train_network.py): add it, or leave the offload out")
    if args.bucket_reso_steps % 8:
        steps = max(8, args.bucket_reso_steps + 7 - (args.bucket_reso_steps + 7) % 8)
        warnings.warn(f"--bucket_reso_steps {args.bucket_reso_steps} is not a multiple of 8 (the VAE's factor); "
                      f"using {steps}")
        args.bucket_reso_steps = steps
    if args.xformers and importlib.util.find_spec("xformers") is None:
        warnings.warn("--xformers: xformers is not installed; using PyTorch's SDPA attention, which does the same "
                      "work (pip install xformers to use it)")
        args.xformers, args.sdpa = False, True
    args.text_encoder_lr = one_or_pair(args.text_encoder_lr, "--text_encoder_lr", bad)
    if not args.output_config and not (args.train_data_dir or args.dataset_config):
        bad("--train_data_dir (the parent of <repeats>_<name> folders) or --dataset_config is required")
    if args.network_module not in ("networks.lora", "lora_diffusion", "lycoris.kohya", "networks.dylora"):
        bad(f"--network_module {args.network_module}: use networks.lora (LoRA / LoCon), networks.dylora (kohya's "
            f"DyLoRA) or lycoris.kohya (LoRA, LoCon, LoHa, LoKr, iA3, GLoRA, DyLoRA, DoRA)")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        bad("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    if args.cache_text_encoder_outputs:
        if args.token_string:  # first: the advice below would not help here
            bad("--cache_text_encoder_outputs and --token_string exclude each other (the new token's embedding "
                "trains inside the text encoder); drop --cache_text_encoder_outputs")
        if args.weighted_captions:
            bad("--cache_text_encoder_outputs and --weighted_captions exclude each other (the cache holds "
                "unweighted states); drop one")
        if not args.network_train_unet_only and args.text_encoder_lr != 0:
            bad("--cache_text_encoder_outputs needs frozen text encoders: add --network_train_unet_only (kohya's "
                "recommendation for SDXL)")
        random_captions = [f"--{name}" for name in ("shuffle_caption", "caption_dropout_rate",
                                                     "caption_tag_dropout_rate") if getattr(args, name)]
        if random_captions:
            bad(f"--cache_text_encoder_outputs needs captions that never change; drop {', '.join(random_captions)}")
    if not args.output_config:
        resolve_model_defaults(args)
    if args.cache_latents_to_disk:
        if args.cache_latents is False:
            bad("--cache_latents_to_disk and --no_cache_latents exclude each other")
        args.cache_latents = True
    args.cache_latents_defaulted = args.cache_latents is None
    if args.cache_latents is None:  # cached latents have one fixed crop, so random crops need the VAE every step
        args.cache_latents = not (args.random_crop or args.color_aug or args.face_crop_aug_range)
    elif args.cache_latents and args.random_crop:
        bad("--cache_latents and --random_crop exclude each other (a cached latent has one fixed crop)")
    if args.use_8bit_adam:
        args.optimizer_type = "AdamW8bit"
    for name in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
                 "sample_every_n_epochs", "sample_every_n_steps", "vae_batch_size", "validation_every_n_epochs",
                 "validation_seeds", "save_n_epoch_ratio", "save_last_n_epochs_state", "save_last_n_steps",
                 "save_last_n_steps_state", "ddp_timeout", "lr_scheduler_timescale", "threads",
                 "validate_every_n_steps", "max_validation_steps", "initial_epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            bad(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.min_timestep < args.max_timestep <= 1000:
        bad(f"--min_timestep/--max_timestep must satisfy 0 <= min < max <= 1000, got {args.min_timestep}, "
            f"{args.max_timestep}")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):  # a NaN lr trains NaN weights without a word
            bad(f"--{name} {value}: expected a finite number")
    name = args.output_name
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        bad(f"--output_name {name!r}: expected a plain file name without folders, such as my_lora")
    if args.sample_sampler.lower() not in SAMPLERS:
        bad(f"--sample_sampler {args.sample_sampler!r} is not known; use one of {', '.join(SAMPLERS)}")
    if args.clip_skip is not None and args.clip_skip < 1:
        bad(f"--clip_skip must be >= 1 (2 = the penultimate layer), got {args.clip_skip}")
    if args.token_string is None:
        for name, default in (("init_word", None), ("num_vectors_per_token", 1), ("embedding_lr", None),
                              ("train_text_encoder_ti_frac", 1.0), ("layerwise_embeddings", False),
                              ("attn_reg_weight", 0.0), ("embedding_norm_threshold", None)):
            if getattr(args, name) != default:
                bad(f"--{name} needs --token_string (the new word whose embedding trains)")
    else:

        try:
            check_token_name(args.token_string)
        except ValueError as e:
            bad(f"--token_string {args.token_string!r}: {e}")
        if args.init_word is not None and not args.init_word.strip():
            bad("--init_word '': expected a word whose embedding starts the new vectors (or leave it out: the "
                "vocabulary's mean)")
        if not 1 <= args.num_vectors_per_token <= 75:
            bad(f"--num_vectors_per_token must be 1 to 75, got {args.num_vectors_per_token}")
        if not 0 < args.train_text_encoder_ti_frac <= 1:
            bad(f"--train_text_encoder_ti_frac must be in (0, 1], got {args.train_text_encoder_ti_frac}")
        if args.embedding_lr is not None and args.embedding_lr < 0:
            bad(f"--embedding_lr must be >= 0, got {args.embedding_lr}")
        check_edlora(args, bad)
    if args.validation_split is not None and args.validation_data_dir:
        bad("--validation_split and --validation_data_dir exclude each other")
    if args.validation_split is not None and not 0 < args.validation_split < 1:
        bad(f"--validation_split must be a share between 0 and 1 (e.g. 0.1), got {args.validation_split}")
    unknown = set(args.validation_metrics.split(",")) - {"judge", "fid", "kid"}
    if unknown:
        bad(f"--validation_metrics: unknown {', '.join(sorted(unknown))}; expected judge, fid, kid")
    network_options(args)  # a bad --network_args before any work
    return args


def check_edlora(args, bad):
    """--layerwise_embeddings, --attn_reg_weight, --embedding_norm_threshold (with a --token_string)."""
    if args.attn_reg_weight < 0:
        bad(f"--attn_reg_weight must be >= 0 (0: off), got {args.attn_reg_weight}")
    if args.attn_reg_weight and not args.layerwise_embeddings:
        bad("--attn_reg_weight needs --layerwise_embeddings (the attention maps are recorded by its processors)")
    if args.embedding_norm_threshold is not None and not args.embedding_norm_threshold > 0:
        bad(f"--embedding_norm_threshold must be > 0, got {args.embedding_norm_threshold}")
    if args.layerwise_embeddings:
        for flag in ("torch_compile", "weighted_captions"):
            if getattr(args, flag):
                bad(f"--layerwise_embeddings and --{flag} exclude each other (the per-layer text states reach "
                    f"the U-Net by matching the states it is given)")


def edlora_pieces(args, run, dataset, stack, say=print):
    """The ED-LoRA pieces on the run's seams: the norm freeze (a step hook), and with --layerwise_embeddings the
    per-layer encodings for the whole run (entered into `stack`) and the attention loss (a loss term)."""
    if args.embedding_norm_threshold is not None:
        if args.resume and mean_norm(run.embedding) >= args.embedding_norm_threshold:
            run.embedding.freeze()  # frozen before the state was saved: a resumed run goes on as the whole one
        run.step_hooks.append(norm_freeze(run.embedding, args.embedding_norm_threshold, say=say))
    if not args.layerwise_embeddings:
        return
    if args.attn_reg_weight and not dataset.has_masks:
        raise TrainingError("--attn_reg_weight: no image folder has masks (the subject's); set --alpha_mask (the "
                            "images' alpha) or a conditioning_data_dir of mask images per subset in --dataset_config")
    concept = stack.enter_context(concept_attention(run.models, run.embedding.layerwise,
                                                    record=bool(args.attn_reg_weight)))
    if args.attn_reg_weight:
        run.loss_terms.append(attention_term(concept, args.attn_reg_weight))


def check_model_path(name, bad):
    """A model that cannot be found is named before minutes of scanning the data."""
    if not name or str(name).startswith("builtin:"):
        return
    path = Path(str(name)).expanduser()
    if not path.exists():
        bad(f"--pretrained_model_name_or_path {name}: not found (expected a diffusers folder, an SD "
            f".safetensors/.ckpt file, or builtin:mini)")
    if path.is_dir() and not (path / "unet").is_dir() and not (path / "model_index.json").is_file():
        bad(f"--pretrained_model_name_or_path {name}: the folder is no diffusers model (no unet/ or "
            f"model_index.json in it)")
    if path.is_file() and path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".bin", ".pth"):
        bad(f"--pretrained_model_name_or_path {name}: expected a .safetensors or .ckpt checkpoint, got a "
            f"{path.suffix or 'file without extension'}")


def one_or_pair(values, flag, bad):
    """A flag of one or two numbers as one number (one value, or two equal) or a [first, second] pair."""
    if values is None or isinstance(values, (int, float)):
        return values
    if len(values) > 2:
        bad(f"{flag} takes one value, or two on SDXL (TE1, TE2); got {len(values)}: {' '.join(map(str, values))}")
    return values[0] if len(set(values)) == 1 else list(values)


def looks_like_sdxl(name) -> bool:
    """Is the model SDXL? From its name, folder or safetensors header only (no weights read); a .ckpt says False.
    (Kept for code that asks; the trainer asks the family: detect_family.)"""
    return detect_family(name).name == "sdxl"


def resolve_model_defaults(args):
    """The flags whose defaults depend on the model's family (detected from its name, folder or file header):
    --resolution (SD 512; SDXL 1024, kohya's SDXL recommendation), and when --resolution is not given either, the
    family's bucket range unless --min/--max_bucket_reso are given (SD 256 to 1024 px, SDXL 512 to 2048 px)."""
    name = args.pretrained_model_name_or_path
    family = detect_family(name) if args.resolution is None and name else fallback_family()
    args.resolution_defaulted = args.resolution is None
    if args.resolution is None:
        args.resolution = str(family.default_resolution)
    if args.min_bucket_reso is None:
        args.min_bucket_reso = family.bucket_range[0]
    if args.max_bucket_reso is None:
        args.max_bucket_reso = family.bucket_range[1]


def network_options(args) -> dict:
    """--network_args k=v pairs as create_network keywords (options.network_args declares each key)."""
    try:
        options = network_keywords(args.network_module, args.network_args)
    except NetworkArgsError as e:
        raise TrainingError(str(e)) from None
    if options.get("algo", "lora") not in ALGOS:
        raise TrainingError(f"--network_args algo={options['algo']}: supported are {', '.join(ALGOS)} (LyCORIS' "
                            f"others are not implemented yet)")
    if args.network_module == "networks.dylora":
        options.setdefault("dylora_unit", 1)  # kohya's default unit
    return options


# ---------------------------------------------------------------------------------------------------------------
# Setting up the run, in the order train() calls these


def build_dataset(args):

    options = {name: getattr(args, name) for name in FLAG_DEFAULTS}  # the dataset options are flags of one name
    if args.dataset_config:
        return image_data.LoRADataset.from_config(args.dataset_config, **options, seed=args.seed)
    return image_data.LoRADataset(args.train_data_dir, args.reg_data_dir, **options, seed=args.seed)


def held_out_entries(args, dataset) -> list:
    """The images of the validation loss: --validation_split of the training images (taken out of training), or
    those of --validation_data_dir (same layout and options as --train_data_dir)."""
    return held_out_images(args, dataset)[0]


def held_out_images(args, dataset) -> tuple[list, list]:
    """held_out_entries and each one's --resize_interpolation (its subset's, in the dataset it comes from)."""
    if args.validation_split is not None:
        entries = dataset.split_validation(args.validation_split, args.validation_seed)
    elif args.validation_data_dir:

        options = {name: getattr(args, name) for name in FLAG_DEFAULTS}
        options["in_json"] = None  # the training images' metadata names none of the validation images
        dataset = image_data.LoRADataset(args.validation_data_dir, **options, seed=args.seed)
        entries = dataset.entries
    else:
        return [], []
    return entries, [dataset.subsets[entry.subset].resize_interpolation for entry in entries]


def build_validation(args, held_out, models, device, weight_dtype, resolution, interpolations=None):
    """The encoded validation images (each resized with `interpolations`' filter, its subset's
    --resize_interpolation) and, for --validation_prompts, what scoring generated images needs."""
    if not held_out and not args.validation_prompts:
        return None
    seed = args.seed if args.validation_seed is None else args.validation_seed
    images = build_validation_set(held_out, models.vae, seed=seed, device=device, dtype=weight_dtype,
                                  family=models.family, interpolations=interpolations) if held_out else None
    return Validation.create(images, args.validation_prompts, args.validation_metrics.split(","),
                             seeds=args.validation_seeds, size=resolution[0])


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed


    # accelerate keeps its settings in process-wide singletons; a second train() in one process (a notebook, the
    # tests) with another --mixed_precision would be refused without this reset.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    handlers = [ddp_settings(args)]
    if args.ddp_timeout:
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=tracker_names(args),
                              project_dir=args.logging_dir, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=handlers)
    check_distribution(accelerator)
    allow_tf32(accelerator.device, not args.no_tf32)
    install_grad_scaler(accelerator, full_fp16=args.full_fp16)
    set_seed(args.seed)
    return accelerator


def ddp_settings(args):
    """DDP's settings for the prepared network: --ddp_gradient_as_bucket_view, --ddp_static_graph (kohya's). Some
    LoRA parameters can sit out a step (a text encoder's last layer under --clip_skip, a token's vectors once
    frozen, module dropout), so DDP looks for unused ones unless the graph is declared static."""
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(find_unused_parameters=not args.ddp_static_graph,
                                         gradient_as_bucket_view=args.ddp_gradient_as_bucket_view,
                                         static_graph=args.ddp_static_graph)


def check_distribution(accelerator):
    """The launch configurations this trainer runs: one process, or DDP over several (accelerate launch
    --multi_gpu, torchrun, several CPUs with gloo). Others stop here, before any work, in one line."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise TrainingError("accelerate's FSDP config: not supported by this trainer (FSDP shards parameters that "
                            "train, and the LoRA's are a few MB while the frozen base is not sharded); launch with "
                            "--multi_gpu (DDP), and --gradient_checkpointing or --fp8_base for memory")
    if kind == DistributedType.DEEPSPEED:
        raise TrainingError("accelerate's DeepSpeed config: not supported by this trainer yet (the --deepspeed "
                            "flags are refused too); launch with --multi_gpu (DDP)")
    if kind not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        raise TrainingError(f"accelerate's {kind.value} launch: not supported by this trainer; use one process or "
                            f"--multi_gpu (DDP)")


def prepare_network(network, accelerator):
    """The network prepared by accelerate (DDP) when several processes train, else None (one process runs the
    loss directly: the same operations as always)."""
    from accelerate.utils import DistributedType


    if accelerator.distributed_type == DistributedType.NO:
        return None
    return accelerator.prepare_model(NetworkForward(network))


def tracker_names(args) -> list[str] | None:
    """--log_with (default: TensorBoard when --logging_dir is given); wandb runs offline without a network."""
    if args.log_with is None:
        return ["tensorboard"] if args.logging_dir else None
    names = ["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with]
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
        folder = Path(args.logging_dir or args.output_dir)  # not ./wandb of wherever the run started
        folder.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(folder))
        if args.wandb_api_key:
            os.environ.setdefault("WANDB_API_KEY", args.wandb_api_key)
    return names


def check_outputs_and_resume(args, output_dir: Path, accelerator):
    """The output folder, the state to resume and other runs' files, before any work. Returns (the resumed
    state's extra record or {}, the network's shape, the run's session id)."""
    prepare_output_dir(output_dir)
    resumed = read_train_state(args.resume)["extra"] if args.resume else {}
    network_shape = dict(network_dim=args.network_dim, **network_options(args))
    if args.token_string:
        network_shape.update(token_string=args.token_string, num_vectors_per_token=args.num_vectors_per_token)
    saved_shape = resumed.get("network_shape", network_shape)
    if saved_shape != network_shape:
        raise TrainingError(f"--resume {args.resume}: the state is of a network with {saved_shape}, this run's has "
                            f"{network_shape}; use the --network_dim/--network_args of the run that saved it")
    # One id for every file of this run (kohya's ss_session_id), kept across --resume: only files that carry it are
    # ever deleted or replaced without --overwrite. From os.urandom: the seeded generators must not move.
    session_id = str(resumed.get("session_id") or int.from_bytes(os.urandom(4), "little"))
    others = outputs_of_other_runs(output_dir, args.output_name, session_id)
    if others:
        names = ", ".join(p.name for p in others[:4]) + (f" (+{len(others) - 4} more)" if len(others) > 4 else "")
        if not args.overwrite:
            raise TrainingError(f"--output_dir {output_dir} already holds {names} from another run; pass --overwrite "
                                f"to replace them, or choose another --output_name or --output_dir")
        accelerator.print(f"--overwrite: this run replaces {names} of an earlier run in {output_dir}")
    elif (output_dir / f"{args.output_name}.safetensors").exists():
        accelerator.print(f"{output_dir / args.output_name}.safetensors is this run's (resumed); it will be replaced")
    return resumed, network_shape, session_id


def check_optimizer_settings(args):
    """A bad --optimizer_type/--optimizer_args fails now, not after minutes of model loading."""
    quiet = logging.getLogger("lora_diffusion.training.optim")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # its advice is given once, for the real optimizer
    try:
        create_optimizer(args.optimizer_type, [{"params": [torch.nn.Parameter(torch.zeros(1))]}],
                         learning_rate=args.learning_rate, optimizer_args=args.optimizer_args)
    finally:
        quiet.setLevel(level)


def load_base_models(args, weight_dtype, device):
    """The frozen base, loaded straight into the compute dtype."""
    models = base_models.load_models(args.pretrained_model_name_or_path, v2=args.v2 or None,
                         v_parameterization=args.v_parameterization or None, dtype=weight_dtype, device=device)
    if args.vae:
        models.vae = load_vae(args.vae, models.vae)
    unet, text_encoder, vae = models.unet, models.text_encoder, models.vae
    check_family_args(args, models)
    layers = text_encoder.config.num_hidden_layers
    if args.clip_skip is not None and args.clip_skip > layers:
        raise TrainingError(f"--clip_skip {args.clip_skip}: this text encoder has {layers} layers (2 = penultimate)")
    for model in (unet, *models.text_encoder_list, vae):
        model.requires_grad_(False).eval()
    if vae.dtype == torch.float16 or (args.no_half_vae and vae.dtype != torch.float32):
        # SD1.x's and SDXL's VAEs overflow into NaN latents in fp16 (diffusers' force_upcast); bf16 is kept (2x
        # faster) unless --no_half_vae
        vae.to(torch.float32)
    if args.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # noqa: BLE001 - xformers raises several kinds when missing or unusable
            raise TrainingError(f"--xformers: xformers is not usable here ({e}); install it with "
                                f"`pip install \"lora-diffusion[xformers]\"` or drop the flag (SDPA is the default)")
    return models


def load_vae(name, like):
    """--vae: a diffusers VAE folder, or a .safetensors/.ckpt of VAE weights in the original (SD) naming, with or
    without the checkpoint's first_stage_model. prefix, or in diffusers' naming; it replaces `like` (same config)."""
    from diffusers import AutoencoderKL


    path = Path(name).expanduser()
    if path.is_dir():

        return AutoencoderKL.from_pretrained(str(path), local_files_only=True,
                                             **{DIFFUSERS_DTYPE_KWARG: like.dtype}).to(like.device)
    if not path.is_file():
        raise TrainingError(f"--vae {name}: not found (a diffusers VAE folder or a VAE .safetensors/.ckpt)")
    reader = CheckpointReader(path, like.dtype)
    expected = like.state_dict()
    levels = len(like.config.up_block_types)
    state = {}
    for key in reader.names:
        bare = key[len(VAE_PREFIX):] if key.startswith(VAE_PREFIX) else key
        target = bare if bare in expected else vae_name(bare, levels)
        if target in expected:
            tensor = reader.get(key)  # the original's 1x1 attention convs are diffusers' linear layers
            shape = expected[target].shape
            state[target] = tensor.reshape(shape) if tensor.numel() == shape.numel() else tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise TrainingError(f"--vae {name}: not a VAE of this model's shape ({len(missing)} of {len(expected)} "
                            f"weights missing, e.g. {missing[0]})")
    vae = AutoencoderKL.from_config(like.config).to(like.dtype)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].strip()
        raise TrainingError(f"--vae {name}: its weights do not fit this model's VAE ({reason})") from None
    return vae.to(like.device)


def start_at_initial_step(args, run, state, dataset, accelerator) -> int:
    """kohya's --initial_step / --initial_epoch (E: step (E - 1) x steps per epoch): the step and epoch counters
    start there (file names, the saving and sampling schedules, --max_train_steps counts from 0), over a state read
    with --resume too; the LR schedule starts at its beginning unless --resume restored it. With
    --skip_until_initial_step the data of the steps before it is skipped (the same batches a run from step 0 would
    have trained next); without, the data starts at the beginning of that epoch. Returns the batches to skip."""
    step = args.initial_step if args.initial_step is not None else (args.initial_epoch - 1) * run.steps_per_epoch
    flag = "--initial_step" if args.initial_step is not None else "--initial_epoch"
    if step < 0:
        raise TrainingError(f"--initial_step must be >= 0, got {step}")
    if step >= run.max_train_steps:
        raise TrainingError(f"{flag} starts at step {step}, which leaves nothing of --max_train_steps "
                            f"{run.max_train_steps} to train")
    if args.resume and step != state.step:
        accelerator.print(f"{flag}: starting at step {step}, not the state's step {state.step}")
    state.step, state.epoch = step, step // run.steps_per_epoch
    skip = (step % run.steps_per_epoch) * args.gradient_accumulation_steps if args.skip_until_initial_step else 0
    state.batch_in_epoch = skip
    dataset.set_current_step(step)
    accelerator.print(f"starting at step {step} (epoch {state.epoch + 1}"
                      + (f", {skip} batches of it skipped)" if skip else ", from its first batch)"))
    return skip


def check_family_args(args, models):
    """What does not apply to the model's family, named before any work on it."""
    family = models.family
    if family.clip_skip_note and args.clip_skip is not None:  # as kohya's sdxl_train_network: a warning
        print(f"warning: --clip_skip {args.clip_skip} is ignored for {family.title}, {family.clip_skip_note}",
              file=sys.stderr)
        args.clip_skip = None
    if args.v2 and not family.v2_applies:
        raise TrainingError(f"{models.name} is an {family.title} model; --v2 does not apply to it")
    encoders = len(family.text_encoder_parts)
    if isinstance(args.text_encoder_lr, list) and encoders != 2:
        raise TrainingError(f"--text_encoder_lr {' '.join(map(str, args.text_encoder_lr))}: two values are for "
                            f"SDXL's two text encoders (TE1, TE2), but {models.name} is {family.title}, with "
                            f"{('one', 'two', 'three')[encoders - 1]}; give one value")
    if getattr(args, "resolution_defaulted", False) and args.resolution != str(family.default_resolution):
        print(f"warning: {models.name} is {family.title} but --resolution defaulted to {args.resolution} "
              f"({family.title} was not detected from the file name); {family.title} trains at --resolution "
              f"{family.default_resolution}", file=sys.stderr)


check_sdxl_args = check_family_args  # its name before the families


def cache_inputs(args, dataset, models, accelerator, train_text_encoder):
    """Latents (--cache_latents) and, for frozen text encoders and fixed captions, the text encoders' outputs
    (--cache_text_encoder_outputs asks for them and fails when they cannot be cached; _to_disk keeps them next to
    the images); then the models that are no longer needed leave the device. Returns the text cache or None."""
    device = accelerator.device
    if args.cache_latents:
        encode_options = dict(batch_size=args.vae_batch_size, device=device, dtype=models.vae.dtype)
        if accelerator.num_processes == 1:
            dataset.cache_latents(models.vae, to_disk=args.cache_latents_to_disk, **encode_options)
        else:  # each process its share (through the disk cache); the barriers wait --ddp_timeout at most

            cache_latents_in_shares(dataset, models.vae, rank=accelerator.process_index,
                                    world=accelerator.num_processes, wait=accelerator.wait_for_everyone,
                                    to_disk=args.cache_latents_to_disk,
                                    scratch_dir=Path(args.output_dir) / f".{args.output_name}-latents-cache",
                                    **encode_options)
    text_cache = None
    cacheable = not train_text_encoder and not args.token_string and dataset.captions_are_fixed()
    if args.cache_text_encoder_outputs and not cacheable:
        raise TrainingError("--cache_text_encoder_outputs: the captions of the dataset config change from epoch to "
                            "epoch (shuffle_caption or caption dropout in a subset); drop those or the flag")
    encoders = models.text_encoder_list
    if cacheable:
        def encode(captions):
            return models.family.cache_text_outputs(models, captions, device=device, clip_skip=args.clip_skip,
                                                    max_token_length=args.max_token_length)

        if args.cache_text_encoder_outputs_to_disk:

            fields = dict(encoders=encoders_fingerprint(encoders), **models.family.text_cache_tag,
                          max_token_length=args.max_token_length, clip_skip=args.clip_skip,
                          dtype=str(encoders[0].dtype))
            with accelerator.main_process_first():
                text_cache, read, written = cache_text_outputs_on_disk(dataset, encode, fields)
            accelerator.print(f"text-encoder outputs: {read} cache files read, {written} written")
        else:
            text_cache = encode(dataset.fixed_captions())
    if args.highvram:
        return text_cache
    if args.cache_latents:
        models.vae.to("cpu")  # sampling moves it back for as long as it needs it
    if text_cache is not None:
        for encoder in encoders:
            encoder.to("cpu")
    return text_cache


def build_loader(args, dataset, accelerator):
    """The bucket batches of this process and the run's length: (loader, batch_sampler, batch_size,
    batches_per_epoch, steps_per_epoch, max_train_steps, num_epochs)."""


    device = accelerator.device
    batch_size = getattr(dataset, "batch_size", None) or args.train_batch_size  # a dataset config's batch_size wins
    batch_sampler = image_data.BucketBatchSampler(dataset, batch_size, seed=args.seed)
    loader_sampler = ShardedBatches(batch_sampler, accelerator.process_index, accelerator.num_processes)
    workers = args.max_data_loader_n_workers
    if workers is None:  # on a CPU the step is hundreds of times slower than loading: workers only take its cores
        workers = 0 if args.cache_latents or device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=loader_sampler, collate_fn=image_data.collate_fn,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(args.seed))
    batches_per_epoch = batch_sampler.num_batches_per_epoch // accelerator.num_processes
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise TrainingError(f"one epoch has fewer batches ({len(batch_sampler)}) than processes "
                            f"({accelerator.num_processes}); lower --train_batch_size or add images")
    max_train_steps = args.max_train_steps
    if args.max_train_epochs:
        max_train_steps = args.max_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    return loader, batch_sampler, batch_size, batches_per_epoch, steps_per_epoch, max_train_steps, num_epochs


def build_network(args, models, dataset, max_train_steps, accelerator, train_unet, train_text_encoder):
    """The LoRA on the base models (and --token_string's embedding): (network, embedding or None, the steps the
    embedding trains)."""
    from accelerate.utils import set_seed


    unet = models.unet
    if args.base_weights:  # kohya's: merged into the base for good before the new network

        merge_base_weights(args.base_weights, unet, models.text_encoders, args.base_weights_multiplier)
        accelerator.print(f"merged into the model: {', '.join(args.base_weights)}")
    if args.fp8_base or args.fp8_base_unet:  # kohya's: the frozen weights in float8, after any merge into them

        stored = store_in_float8(unet, keep=("conv_in",))
        if args.fp8_base:
            stored += sum(store_in_float8(encoder) for encoder in models.text_encoder_list)
        accelerator.print(f"--fp8_base{'' if args.fp8_base else '_unet'}: {stored} base layers stored in float8")
    if args.dim_from_weights:  # kohya's: every module with the rank and alpha it has in --network_weights

        network = dim_from_weights(args.network_weights, unet, models.text_encoders, dropout=args.network_dropout)
        network.set_trainable(unet=train_unet, text_encoder=train_text_encoder)
    else:
        network = create_network(unet, models.text_encoders, rank=args.network_dim, alpha=args.network_alpha,
                                 dropout=args.network_dropout, train_unet=train_unet,
                                 train_text_encoder=train_text_encoder, **network_options(args),
                                 **({"include": args.network_include} if args.network_include else {}))
    embedding, embedding_steps = None, 0
    if args.token_string:
        embedding = network.add_embedding(new_token_embedding(args, models))
        embedding_steps = math.ceil(args.train_text_encoder_ti_frac * max_train_steps)
        word = re.compile(rf"(?<!\w){re.escape(args.token_string)}(?!\w)", re.IGNORECASE)
        if not any(word.search(caption) for caption in dataset.fixed_captions()):
            raise TrainingError(f"--token_string {args.token_string}: no caption holds the word, so its vectors "
                                f"would never train; write it in the captions (e.g. '{args.token_string} dog, on "
                                f"grass') or --caption_prefix '{args.token_string} '")
    if args.network_weights:
        network.load_weights(args.network_weights)
        accelerator.print(f"started from {args.network_weights}")
    network.to(accelerator.device).train()
    if args.full_bf16 or args.full_fp16:  # kohya's: the LoRA's weights, gradients and optimizer state in 16 bits
        network.to(MIXED_PRECISION_DTYPES[args.mixed_precision])
    if args.full_fp16 and args.optimizer_type.lower() in ("adamw", "adam", "torch.optim.adamw", "torch.optim.adam"):
        warnings.warn(f"--full_fp16 with {args.optimizer_type}: its moments and eps ({args.optimizer_type}'s 1e-8 is 0 "
                      f"in fp16) underflow, so the first steps divide 0 by 0 (NaN); AdamW8bit, Lion or Adafactor "
                      f"keep fp16 weights finite, or use --mixed_precision bf16 --full_bf16")
    check_free_space(Path(args.output_dir), network, args)
    set_seed(args.seed, device_specific=True)  # same LoRA init everywhere; different noise on each process
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.cpu_offload_checkpointing:
            offload_saved_tensors(unet)
        for encoder in models.text_encoder_list:
            if train_text_encoder:
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            encoder.train(train_text_encoder)
        unet.train()  # diffusers and transformers only checkpoint in training mode; dropout is 0 in SD
    if args.torch_compile:  # kohya's: the U-Net, LoRA layers included, through torch.compile
        models.unet = torch.compile(unet, backend=args.dynamo_backend)
    return network, embedding, embedding_steps


def new_token_embedding(args, models):
    """--token_string's vectors, applied to the models: plain (TokenEmbeddings) or, with --layerwise_embeddings,
    one set per cross-attention layer (ED-LoRA: with 2+ vectors the first starts random, std 0.013)."""
    if not args.layerwise_embeddings:
        return TokenEmbeddings.create(models.tokenizers, models.text_encoders, args.token_string, args.init_word,
                                      args.num_vectors_per_token)

    if models.family.name == "sdxl":
        raise TrainingError("--layerwise_embeddings: SD1.x/2.x only (SDXL's two text encoders are not done yet)")
    layerwise = LayerwiseEmbeddings.create(models.tokenizer, models.text_encoder, models.unet, args.token_string,
                                           args.init_word, args.num_vectors_per_token, random_first=RANDOM_FIRST_STD,
                                           generator=torch.Generator().manual_seed(args.seed or 0))
    return LayerwiseTokenEmbeddings(layerwise.apply_to(models.tokenizer, models.text_encoder))


def build_optimizer(args, network, max_train_steps, accelerator):
    """(optimizer prepared by accelerate, lr scheduler, the optimizer's name for ss_optimizer, the parameters)."""
    param_groups = network.param_groups(unet_lr=args.unet_lr, text_encoder_lr=args.text_encoder_lr,
                                        default_lr=args.learning_rate, embedding_lr=args.embedding_lr)
    optimizer = create_optimizer(args.optimizer_type, param_groups, learning_rate=args.learning_rate,
                                 optimizer_args=args.optimizer_args,
                                 schedulefree_wrapper=args.optimizer_schedulefree_wrapper)
    lr_scheduler = create_lr_scheduler(args.lr_scheduler, optimizer, num_training_steps=max_train_steps,
                                       lr_warmup_steps=args.lr_warmup_steps,
                                       lr_scheduler_num_cycles=args.lr_scheduler_num_cycles,
                                       lr_scheduler_power=args.lr_scheduler_power,
                                       lr_scheduler_type=args.lr_scheduler_type,
                                       lr_scheduler_args=args.lr_scheduler_args, lr_decay_steps=args.lr_decay_steps,
                                       lr_scheduler_timescale=args.lr_scheduler_timescale,
                                       lr_scheduler_min_lr_ratio=args.lr_scheduler_min_lr_ratio)
    # The optimizer goes through accelerate (the GradScaler for fp16); the scheduler is stepped by the loop once
    # per optimizer step that updated (not on a step the scaler skipped). In a multi-process run the network is
    # prepared too (prepare_network: DDP all-reduces the gradients during the backward).
    optimizer_name = describe_optimizer(optimizer, args.optimizer_args)
    params = [p for group in param_groups for p in group["params"]]
    if args.fused_backward_pass:  # each parameter steps in the backward; the loop's own step then finds nothing
        check_fused_backward(args.optimizer_type, args.gradient_accumulation_steps, args.mixed_precision,
                             accelerator.num_processes)
        install_fused_backward(optimizer, args.max_grad_norm)
    return accelerator.prepare(optimizer), lr_scheduler, optimizer_name, params


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(args):
    from contextlib import ExitStack


    # --- what can fail without any work: the output folder, the state to resume, the optimizer's settings ------
    if args.console_log_level or args.console_log_file:
        root = logging.getLogger()
        root.setLevel(args.console_log_level or "INFO")
        if args.console_log_file:
            root.addHandler(logging.FileHandler(args.console_log_file, encoding="utf-8"))
    accelerator = make_accelerator(args)
    device, weight_dtype = accelerator.device, MIXED_PRECISION_DTYPES[args.mixed_precision]
    if device.type == "cpu":  # the rule of every command: the cores free now, unless told

        set_cpu_threads(args.threads, "train", say=accelerator.print)  # stdout: stderr is for errors
    output_dir = Path(args.output_dir)
    resumed, network_shape, session_id = check_outputs_and_resume(args, output_dir, accelerator)
    check_optimizer_settings(args)
    progress = ProgressFile(progress_path(args), enabled=accelerator.is_main_process)
    with progress.ending():

        # --- data (first: a wrong folder fails before minutes of model loading) ------------------------------------
        dataset = build_dataset(args)
        if args.debug_dataset:

            debug_dataset(dataset, 10, out=accelerator.print)
            return None
        if args.masked_loss and not dataset.has_masks:
            raise TrainingError("--masked_loss: no image folder has masks; set alpha_mask (the images' alpha) or a "
                                "conditioning_data_dir of mask images per subset in --dataset_config, or --alpha_mask")
        if args.cache_latents and args.cache_latents_defaulted and dataset.uncacheable_options:
            args = argparse.Namespace(**{**vars(args), "cache_latents": False})
            accelerator.print(f"latents are encoded every step: {', '.join(dataset.uncacheable_options)} change the "
                              f"images from epoch to epoch")
        held_out, interpolations = held_out_images(args, dataset)
        accelerator.print(dataset.summary())
        resolution = dataset.resolution
        prompts = read_prompts(args.sample_prompts, width=resolution[0], height=resolution[1]) \
            if args.sample_prompts else None

        # --- models, caches, batches, network, optimizer -----------------------------------------------------------
        models = load_base_models(args, weight_dtype, device)
        if args.zero_terminal_snr:

            models.noise_scheduler = with_zero_terminal_snr(models.noise_scheduler)
        train_text_encoder = not args.network_train_unet_only and args.text_encoder_lr != 0
        train_unet = not args.network_train_text_encoder_only and args.unet_lr != 0
        validation = build_validation(args, held_out, models, device, weight_dtype, resolution, interpolations)
        text_cache = cache_inputs(args, dataset, models, accelerator, train_text_encoder)
        loader, batch_sampler, batch_size, batches_per_epoch, steps_per_epoch, max_train_steps, num_epochs = \
            build_loader(args, dataset, accelerator)
        dataset.set_max_train_steps(max_train_steps)  # a token_warmup_step below 1 is a share of the run
        network, embedding, embedding_steps = build_network(args, models, dataset, max_train_steps, accelerator,
                                                            train_unet, train_text_encoder)
        optimizer, lr_scheduler, optimizer_name, params = build_optimizer(args, network, max_train_steps, accelerator)
        prepared = prepare_network(network, accelerator)
        if args.save_n_epoch_ratio:  # kohya's: about that many epoch files over the run
            every = max(1, num_epochs // args.save_n_epoch_ratio)
            args = argparse.Namespace(**{**vars(args), "save_every_n_epochs": every})
        run = Run(args=args, accelerator=accelerator, models=models, network=network, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, loader=loader, batch_sampler=batch_sampler,
                  batches_per_epoch=batches_per_epoch, steps_per_epoch=steps_per_epoch, max_train_steps=max_train_steps,
                  num_epochs=num_epochs, output_dir=output_dir, session_id=session_id, network_shape=network_shape,
                  metadata={}, resolution=resolution, weight_dtype=weight_dtype, params=params, prompts=prompts,
                  text_cache=text_cache, embedding=embedding, embedding_steps=embedding_steps,
                  train_text_encoder=train_text_encoder, log_with=tracker_names(args),
                  validation=validation, progress=progress, prepared=prepared)

        # --- where we start ---------------------------------------------------------------------------------------
        state = RunState(epoch_files=list(resumed.get("epoch_files", [])),
                         step_files=list(resumed.get("step_files", [])))
        skip_batches = 0
        if args.resume:
            saved = load_state(args.resume, **run.pieces)
            state.step, state.epoch, skip_batches = saved["step"], saved["epoch"], saved["batch_in_epoch"]
            state.batch_in_epoch = skip_batches
            dataset.set_current_step(state.step)
            accelerator.print(f"resumed from {args.resume} at step {state.step} (epoch {state.epoch + 1}, "
                              f"batch {skip_batches})")
        if args.initial_step is not None or args.initial_epoch is not None:
            skip_batches = start_at_initial_step(args, run, state, dataset, accelerator)
        run.metadata = run_metadata(args, models, dataset, resolution, batch_size, batches_per_epoch, max_train_steps,
                                    num_epochs, optimizer_name, session_id, num_processes=accelerator.num_processes)
        if run.log_with:
            init_kwargs = {}
            if args.log_tracker_config:

                init_kwargs = loads_toml(Path(args.log_tracker_config).read_text(encoding="utf-8"))
            if args.wandb_run_name and "wandb" in run.log_with:
                init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
            config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(args.log_tracker_name or "lora_diffusion", config=config, init_kwargs=init_kwargs)

        # --- the loop, then the final files -------------------------------------------------------------------------
        started = time.time()
        accelerator.print(f"training {sum(p.numel() for p in run.params):,} LoRA parameters for {max_train_steps} "
                          f"steps ({num_epochs} epochs of {steps_per_epoch} steps) on {device}, "
                          f"{'fp32' if args.mixed_precision == 'no' else args.mixed_precision}")
        progress.start(max_train_steps=max_train_steps, epochs=num_epochs, output_dir=output_dir,
                       output_name=args.output_name, step=state.step)
        with ExitStack() as edlora:
            edlora_pieces(args, run, dataset, edlora, say=accelerator.print)
            train_epochs(run, state, skip_batches)
            loop_ended = time.time()
            final_path, lines = save_final_files(run, state)  # its samples still read the per-layer states
        if args.layerwise_embeddings and accelerator.is_main_process:
            layerwise_path = output_dir / f"{args.output_name}.layerwise.safetensors"
            run.embedding.layerwise.save(layerwise_path)
            run.progress.files.append(str(layerwise_path))
            lines.append(f"layer-wise embedding {' '.join(run.embedding.tokens)}: {layerwise_path} (diffusers: "
                         f"lora_diffusion.concepts.layerwise.load_layerwise_into_pipeline; the LoRA file and the "
                         f"_emb file hold the layers' mean)")
        accelerator.end_training()
        elapsed = time.time() - started
        pace = ""
        if state.first_step_done and state.step > state.first_step_done[1]:
            per_step = (loop_ended - state.first_step_done[0]) / (state.step - state.first_step_done[1])
            pace = f" ({per_step:.3f} s/step after the first)"
        accelerator.print(f"done: {state.step} steps in {elapsed:.1f}s{pace}; LoRA: {final_path}" +
                          (f"; samples: {output_dir / 'sample'}" if prompts else "") +
                          (f"; logs: {args.logging_dir}" if args.logging_dir else ""))

        for line in lines + [best_epoch(state.validations) or ""]:
            if line:
                accelerator.print(line)
    return final_path


def main(argv=None, prog=None) -> int:

    try:
        args = parse_args(argv, prog)
        if args.output_config:
            path = Path(args.output_dir) / f"{args.output_name}.toml"
            write_config_file(path, args, args.parser)
            print(f"wrote {path}")
            return 0
        train(args)
        return 0
    except (TrainingError, ValueError, OSError) as e:
        # Every error of the pieces is a ValueError/OSError whose message names the flag or file to fix.
        if os.environ.get("LORA_DIFFUSION_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Several processes (torchrun, accelerate launch): a stop that saved on every rank ends them all with 0, as
        # a non-zero status makes the launcher report the run as failed. One process: 130, the shell's Ctrl-C.
        return 0 if getattr(e, "processes", 1) > 1 else 130
    except SystemExit as e:  # argparse's one-line answer to a bad command line (or --help)
        return e.code if isinstance(e.code, int) else 2


def command(argv=None, prog=None) -> int:
    """The trainer as a command (`python train_lora.py`, `lora-diffusion train`): main() with SIGTERM as Ctrl-C."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM saves like Ctrl-C
    return main(argv, prog)


if __name__ == "__main__":
    sys.exit(command())
