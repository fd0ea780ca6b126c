"""Train a LoRA for Stable Diffusion: `python train_lora.py --flags` (kohya sd-scripts' flag names).

    python train_lora.py --config_file examples/quickstart/config.toml

Reads top to bottom: flags -> accelerator -> models -> data -> network -> optimizer -> the loop -> files.
The pieces live in the package (lora_diffusion.training, lora_diffusion.network, lora_diffusion.dataset); this file
wires them. `python train_lora.py` (the repository root) and `lora-diffusion train` both run main().
"""

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LR_LOG_NAMES = {"unet": "lr/unet", "text_encoder": "lr/textencoder", "embeddings": "lr/embeddings"}
SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------------------------
# Flags


def build_parser(prog=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("config")
    g.add_argument("--config_file", help="TOML of flags (any sections), or a kohya_ss GUI .json")
    g.add_argument("--output_config", action="store_true", help="write the flags to <output_dir>/<output_name>.toml "
                   "and exit")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", help="diffusers folder, SD1.x/2.x .safetensors/.ckpt, or "
                   "builtin:tiny")
    g.add_argument("--v2", action="store_true", help="the model is SD2.x (detected from single files)")
    g.add_argument("--v_parameterization", action="store_true", help="v-prediction (SD2.x 768-v)")
    g.add_argument("--clip_skip", type=int, help="use the output of the k-th last text-encoder layer (2: penultimate)")
    g.add_argument("--max_token_length", type=int, choices=[75, 150, 225])

    g = p.add_argument_group("data (see docs/dataset.md)")
    g.add_argument("--train_data_dir", help="the PARENT of <repeats>_<name> folders")
    g.add_argument("--reg_data_dir", help="the parent of <repeats>_<class> regularization folders")
    g.add_argument("--dataset_config", help="kohya dataset config TOML ([general], [[datasets]], [[datasets.subsets]])")
    g.add_argument("--caption_extension", default=".txt")
    g.add_argument("--resolution", default="512", help="W or W,H")
    g.add_argument("--enable_bucket", action="store_true")
    g.add_argument("--min_bucket_reso", type=int, default=256)
    g.add_argument("--max_bucket_reso", type=int, default=1024)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--bucket_no_upscale", action="store_true")
    g.add_argument("--random_crop", action="store_true")
    g.add_argument("--flip_aug", action="store_true")
    g.add_argument("--shuffle_caption", action="store_true")
    g.add_argument("--keep_tokens", type=int, default=0)
    g.add_argument("--caption_dropout_rate", type=float, default=0.0)
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0)
    g.add_argument("--caption_prefix")
    g.add_argument("--caption_suffix")
    g.add_argument("--caption_separator", default=",")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--cache_latents", action="store_true", default=None,
                   help="encode every image once before training (the default unless --random_crop: measured "
                        "0.68x the time per step; see docs/performance.md)")
    g.add_argument("--no_cache_latents", dest="cache_latents", action="store_false",
                   help="run the VAE on every step instead (kohya's default; draws a fresh latent sample each time)")
    g.add_argument("--cache_latents_to_disk", action="store_true")
    g.add_argument("--vae_batch_size", type=int, default=1)
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--max_data_loader_n_workers", type=int, help="default: 0 with cached latents, else up to 4")

    g = p.add_argument_group("network")
    g.add_argument("--network_module", default="networks.lora", help="networks.lora (kohya's LoRA/LoCon) or "
                   "lycoris.kohya (LyCORIS: --network_args algo=lora|locon|loha|lokr, dora_wd=True, use_tucker=True, "
                   "factor=8, decompose_both=True)")
    g.add_argument("--network_dim", type=int, default=4, help="rank")
    g.add_argument("--network_alpha", type=float, default=1.0)
    g.add_argument("--network_dropout", type=float, default=0.0)
    g.add_argument("--network_args", nargs="*", default=[], help="conv_dim=8 conv_alpha=4 rank_dropout=0.1 "
                   "module_dropout=0.1")
    g.add_argument("--network_weights", help="start from this LoRA file (not a resume: see --resume)")
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")

    g = p.add_argument_group("pivotal tuning: a new token's embedding trains with the LoRA (see docs/training.md)")
    g.add_argument("--token_string", help="the new word, written in the captions and prompts (e.g. sks); saved in the "
                   "LoRA file as A1111 bundles embeddings, and as <output_name>_emb.safetensors")
    g.add_argument("--init_word", help="start the vectors from this word's (one token a vector, cycling); default: "
                   "the vocabulary's mean")
    g.add_argument("--num_vectors_per_token", type=int, default=1, help="vectors of the new token; with N > 1 the "
                   "token stands for `tok tok_1 ... tok_<N-1>` in captions and prompts")
    g.add_argument("--embedding_lr", type=float, help="learning rate of the new vectors (default: --learning_rate)")
    g.add_argument("--train_text_encoder_ti_frac", type=float, default=1.0,
                   help="train the vectors during this fraction of the steps only, then keep them (diffusers' "
                        "advanced scripts; default 1: all steps)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer_type", default="AdamW",
                   help="AdamW, AdamW8bit, Lion, Lion8bit, PagedAdamW8bit, Prodigy, Adafactor, SGDNesterov or "
                        "module.Class")
    g.add_argument("--optimizer_args", nargs="*", default=[], help='e.g. "weight_decay=0.01" "betas=0.9,0.99"')
    g.add_argument("--use_8bit_adam", action="store_true", help="same as --optimizer_type AdamW8bit")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--unet_lr", type=float)
    g.add_argument("--text_encoder_lr", type=float)
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", type=float, default=0, help="steps, or a fraction (< 1) of the total")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")

    g = p.add_argument_group("training")
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, help="overrides --max_train_steps")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--xformers", action="store_true", help="xformers attention (default: PyTorch SDPA)")
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--multires_noise_iterations", type=int, default=0)
    g.add_argument("--multires_noise_discount", type=float, default=0.3)
    g.add_argument("--min_snr_gamma", type=float)
    g.add_argument("--min_timestep", type=int, default=0)
    g.add_argument("--max_timestep", type=int, default=1000)

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="output")
    g.add_argument("--output_name", default="lora")
    g.add_argument("--overwrite", action="store_true", help="replace files of another run that --output_dir holds "
                   "under this --output_name (refused without it)")
    g.add_argument("--save_model_as", default="safetensors", choices=["safetensors"])
    g.add_argument("--save_precision", choices=["float", "fp16", "bf16"], help="default: fp32")
    g.add_argument("--save_every_n_epochs", type=int)
    g.add_argument("--save_every_n_steps", type=int)
    g.add_argument("--save_last_n_epochs", type=int, help="keep only the last N epoch files")
    g.add_argument("--save_state", action="store_true", help="also save optimizer/RNG state with each file")
    g.add_argument("--resume", help="a <name>-...-state folder written by --save_state")
    g.add_argument("--logging_dir", help="TensorBoard logs")
    g.add_argument("--log_prefix", default="")
    g.add_argument("--sample_prompts", help="one prompt a line, options --n --w --h --d --l --s")
    g.add_argument("--sample_every_n_epochs", type=int)
    g.add_argument("--sample_every_n_steps", type=int)
    g.add_argument("--sample_sampler", default="ddim")
    g.add_argument("--training_comment")
    return p


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    from lora_diffusion.config import read_config_file

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.config_file:  # file values are defaults; flags given on the command line win
        parser.set_defaults(**read_config_file(args.config_file, parser))
        args = parser.parse_args(argv)
    check_args(args)
    args.parser = parser
    return args


def check_args(args):
    from lora_diffusion.training.sampling import SAMPLERS

    def bad(message):
        raise TrainingError(message)

    if not args.output_config and not args.pretrained_model_name_or_path:
        bad("--pretrained_model_name_or_path is required (a diffusers folder, an SD checkpoint, or builtin:tiny)")
    if not args.output_config and not (args.train_data_dir or args.dataset_config):
        bad("--train_data_dir (the parent of <repeats>_<name> folders) or --dataset_config is required")
    if args.network_module not in ("networks.lora", "lora_diffusion", "lycoris.kohya"):
        bad(f"--network_module {args.network_module}: use networks.lora (LoRA / LoCon) or lycoris.kohya (LoRA, "
            f"LoCon, LoHa, LoKr, DoRA)")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        bad("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.cache_latents_to_disk:
        if args.cache_latents is False:
            bad("--cache_latents_to_disk and --no_cache_latents exclude each other")
        args.cache_latents = True
    if args.cache_latents is None:  # cached latents have one fixed crop, so random crops need the VAE every step
        args.cache_latents = not args.random_crop
    elif args.cache_latents and args.random_crop:
        bad("--cache_latents and --random_crop exclude each other (a cached latent has one fixed crop)")
    if args.use_8bit_adam:
        args.optimizer_type = "AdamW8bit"
    for name in ("network_dim", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                 "max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs",
                 "sample_every_n_epochs", "sample_every_n_steps", "vae_batch_size"):
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
                              ("train_text_encoder_ti_frac", 1.0)):
            if getattr(args, name) != default:
                bad(f"--{name} needs --token_string (the new word whose embedding trains)")
    else:
        from lora_diffusion.network import check_token_name

        try:
            check_token_name(args.token_string)
        except ValueError as e:
            bad(str(e))
        if not 1 <= args.num_vectors_per_token <= 75:
            bad(f"--num_vectors_per_token must be 1 to 75, got {args.num_vectors_per_token}")
        if not 0 < args.train_text_encoder_ti_frac <= 1:
            bad(f"--train_text_encoder_ti_frac must be in (0, 1], got {args.train_text_encoder_ti_frac}")
        if args.embedding_lr is not None and args.embedding_lr < 0:
            bad(f"--embedding_lr must be >= 0, got {args.embedding_lr}")
    network_options(args)  # a bad --network_args before any work


_KOHYA_ARGS = {"conv_dim": ("conv_rank", int), "conv_alpha": ("conv_alpha", float),
               "rank_dropout": ("rank_dropout", float), "module_dropout": ("module_dropout", float)}
# LyCORIS' own keys (lycoris.kohya.create_network), with --network_module lycoris.kohya only
_LYCORIS_ARGS = {"algo": ("algo", str), "dora_wd": ("dora_wd", bool), "use_tucker": ("use_tucker", bool),
                 "use_cp": ("use_tucker", bool), "factor": ("factor", int), "decompose_both": ("decompose_both", bool),
                 "full_matrix": ("full_matrix", bool), "preset": ("preset", str)}


def network_options(args) -> dict:
    """--network_args k=v pairs as create_network keywords (LyCORIS' keys with --network_module lycoris.kohya)."""
    lycoris = args.network_module == "lycoris.kohya"
    known = {**_KOHYA_ARGS, **(_LYCORIS_ARGS if lycoris else {})}
    options = {"algo": "lora"} if lycoris else {}
    for item in args.network_args:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in known:
            hint = " (LyCORIS' algo, dora_wd, ... need --network_module lycoris.kohya)" \
                if key in _LYCORIS_ARGS and not lycoris else ""
            raise TrainingError(f"--network_args {item!r}: expected key=value with key in {sorted(known)}{hint}")
        name, kind = known[key]
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise TrainingError(f"--network_args {item!r}: expected True or False")
            options[name] = value.lower() in ("true", "1", "yes")
            continue
        if kind is str:
            options[name] = value.lower()
            continue
        try:
            options[name] = kind(value)
        except ValueError:
            raise TrainingError(f"--network_args {item!r}: {value!r} is not a {kind.__name__}") from None
        if key == "factor" and options[name] == -1:
            continue  # LyCORIS' "no limit"
        if not math.isfinite(options[name]) or options[name] < 0:
            raise TrainingError(f"--network_args {item!r}: expected a finite number >= 0")
    if lycoris:
        from lora_diffusion.network import ALGOS

        if options["algo"] not in ALGOS:
            raise TrainingError(f"--network_args algo={options['algo']}: supported are {', '.join(ALGOS)} (LyCORIS' "
                                f"ia3, dylora, glora, full, diag-oft, boft are not)")
        if options.pop("preset", "full") != "full":
            raise TrainingError("--network_args preset=...: only LyCORIS' default preset (full) is supported")
    return options


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the run that the loop calls


def build_dataset(args):
    from lora_diffusion.dataset import LoRADataset

    options = dict(caption_extension=args.caption_extension, resolution=args.resolution,
                   enable_bucket=args.enable_bucket, min_bucket_reso=args.min_bucket_reso,
                   max_bucket_reso=args.max_bucket_reso, bucket_reso_steps=args.bucket_reso_steps,
                   bucket_no_upscale=args.bucket_no_upscale, random_crop=args.random_crop, flip_aug=args.flip_aug,
                   shuffle_caption=args.shuffle_caption, keep_tokens=args.keep_tokens,
                   caption_dropout_rate=args.caption_dropout_rate,
                   caption_tag_dropout_rate=args.caption_tag_dropout_rate, caption_prefix=args.caption_prefix,
                   caption_suffix=args.caption_suffix, caption_separator=args.caption_separator, seed=args.seed)
    if args.dataset_config:
        return LoRADataset.from_config(args.dataset_config, **options)
    return LoRADataset(args.train_data_dir, args.reg_data_dir, **options)


class ShardedBatches(torch.utils.data.Sampler):
    """This process's share of the bucket batches (every world-th batch); equal counts on every process."""

    def __init__(self, batch_sampler, rank: int, world: int):
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __iter__(self):
        batches = list(self.batch_sampler)
        usable = len(batches) - len(batches) % self.world
        return iter(batches[self.rank:usable:self.world])

    def __len__(self):
        return len(self.batch_sampler) // self.world


def captions_are_fixed(dataset) -> bool:
    """No caption option draws at random, in any folder (a dataset config sets them per subset)."""
    return not any(s.shuffle_caption or s.caption_dropout_rate or s.caption_tag_dropout_rate for s in dataset.subsets)


def fixed_captions(dataset) -> set[str]:
    """Every caption the dataset can give when no caption option is random."""
    from lora_diffusion.dataset import process_caption

    return {process_caption(e.caption, dataset.subsets[e.subset], random.Random(0)) for e in dataset.entries}


def cache_text_encoder_outputs(captions, tokenizer, text_encoder, args, device) -> dict:
    """caption -> encoder hidden states, for a frozen text encoder and captions that never change."""
    from lora_diffusion.training import encode_prompts

    captions, cache = sorted(captions), {}
    text_encoder.to(device)
    with torch.no_grad():
        for start in range(0, len(captions), 16):
            chunk = captions[start:start + 16]
            states = encode_prompts(tokenizer, text_encoder, chunk, clip_skip=args.clip_skip,
                                    max_token_length=args.max_token_length)
            cache.update(zip(chunk, states))
    return cache


def save_lora(network, path, args, run, accelerator, *, epoch, step, final=False):
    """One LoRA file with the whole run's settings in its metadata, written by the main process only."""
    from lora_diffusion.training import training_metadata

    if not accelerator.is_main_process:
        return
    metadata = training_metadata(**run["metadata"], ss_epoch=epoch, ss_steps=step,
                                 ss_training_finished_at=time.time() if final else None)
    models = run["models"]
    network.save_weights(path, dtype=SAVE_DTYPES[args.save_precision], metadata=metadata,
                         output_name=args.output_name, v2=models.v2, v_parameterization=models.v_parameterization,
                         resolution=run["resolution"])
    accelerator.print(f"saved {path}")


def prepare_output_dir(output_dir: Path):
    """Create --output_dir and make sure a file can be written there, before any work."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file; expected a folder (or a path to create one at)")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise TrainingError(f"--output_dir {output_dir} is not writable ({e.strerror or e})") from None


def session_of(path: Path):
    """The ss_session_id of a LoRA file, or the session_id a state folder records (None when unreadable)."""
    from safetensors import safe_open

    try:
        if path.is_dir():
            return json.loads((path / "train_state.json").read_text(encoding="utf-8"))["extra"]["session_id"]
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("ss_session_id")
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return None


def outputs_of_other_runs(output_dir: Path, output_name: str, session_id: str) -> list[Path]:
    """Files and state folders this run would write (final, epoch, step) that another run wrote."""
    names = re.compile(re.escape(output_name) + r"((-\d{6}|-step\d{8})?(\.safetensors|-state)|_emb\.safetensors)")
    return sorted(p for p in output_dir.iterdir() if names.fullmatch(p.name) and session_of(p) != session_id)


def check_free_space(output_dir: Path, network, args):
    """Roughly: two copies of the largest save (an atomic write keeps the old file until the new one is whole)."""
    n = sum(p.numel() for p in network.parameters())
    size = n * (SAVE_DTYPES[args.save_precision] or torch.float32).itemsize + (n * 4 * 4 if args.save_state else 0)
    free = shutil.disk_usage(output_dir).free
    if free < 2 * size:
        raise TrainingError(f"--output_dir {output_dir}: only {free / 2**20:.1f} MiB free, each save needs about "
                            f"{size / 2**20:.1f} MiB (twice that while it replaces an older file)")


class DeferredStop:
    """Ctrl-C / SIGTERM during the loop only ask the loop to stop at the next step boundary (so the saved LoRA and
    state are those of a whole step and a resumed run ends exactly as an uninterrupted one); a second one aborts."""

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        os.write(2, f"\n{signal.Signals(signum).name}: finishing this step, then saving the LoRA and the state "
                    f"(again to stop at once, without saving)\n".encode())

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stop_requested(stop: DeferredStop, accelerator) -> bool:
    """Did any process get a signal? (All processes must stop at the same step.)"""
    flag = stop.signum is not None
    if accelerator.num_processes > 1:
        total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
        flag = total.item() > 0
    return flag


class _StopAtBoundary(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(args):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    from lora_diffusion.dataset import BucketBatchSampler, collate_fn
    from lora_diffusion import create_network
    from lora_diffusion.models import load_models
    from lora_diffusion.training import (StateError, create_lr_scheduler, create_optimizer, describe_optimizer,
                                         diffusion_loss, encode_prompts, generate_samples, load_state, make_noise,
                                         non_finite, read_prompts, read_train_state, rotate, sample_timesteps,
                                         save_state, training_target)

    # accelerate keeps its settings in process-wide singletons; a second train() in one process (a notebook, the
    # tests) with another --mixed_precision would be refused without this reset.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    log_with = "tensorboard" if args.logging_dir else None
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=log_with,
                              project_dir=args.logging_dir, cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    device, weight_dtype = accelerator.device, DTYPES[args.mixed_precision]
    output_dir = Path(args.output_dir)

    # --- what can fail without any work: the output folder, the state to resume, the optimizer's settings ------
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
    quiet = logging.getLogger("lora_diffusion.training.optim")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # its advice is given once, for the real optimizer
    try:  # a bad --optimizer_type/--optimizer_args fails now, not after minutes of model loading
        create_optimizer(args.optimizer_type, [{"params": [torch.nn.Parameter(torch.zeros(1))]}],
                         learning_rate=args.learning_rate, optimizer_args=args.optimizer_args)
    finally:
        quiet.setLevel(level)

    # --- data (first: a wrong folder fails before minutes of model loading) ------------------------------------
    dataset = build_dataset(args)
    accelerator.print(dataset.summary())
    resolution = dataset_resolution(dataset)
    prompts = read_prompts(args.sample_prompts, width=resolution[0], height=resolution[1]) \
        if args.sample_prompts else None

    # --- models: the frozen base, loaded straight into the compute dtype ---------------------------------------
    models = load_models(args.pretrained_model_name_or_path, v2=args.v2 or None,
                         v_parameterization=args.v_parameterization or None, dtype=weight_dtype, device=device)
    unet, text_encoder, vae, tokenizer = models.unet, models.text_encoder, models.vae, models.tokenizer
    layers = text_encoder.config.num_hidden_layers
    if args.clip_skip is not None and args.clip_skip > layers:
        raise TrainingError(f"--clip_skip {args.clip_skip}: this text encoder has {layers} layers (2 = penultimate)")
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False).eval()
    if vae.dtype == torch.float16:
        vae.to(torch.float32)  # SD1.x's VAE overflows into NaN latents in fp16 (not in bf16, which is kept: 2x faster)
    if args.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # noqa: BLE001 - xformers raises several kinds when missing or unusable
            raise TrainingError(f"--xformers: xformers is not usable here ({e}); install it with "
                                f"`pip install \"lora-diffusion[xformers]\"` or drop the flag (SDPA is the default)")

    if args.cache_latents:
        with accelerator.main_process_first():
            dataset.cache_latents(vae, to_disk=args.cache_latents_to_disk, batch_size=args.vae_batch_size,
                                  device=device, dtype=vae.dtype)
    train_text_encoder = not args.network_train_unet_only and args.text_encoder_lr != 0
    train_unet = not args.network_train_text_encoder_only and args.unet_lr != 0
    text_cache = None
    if not train_text_encoder and not args.token_string and captions_are_fixed(dataset):
        text_cache = cache_text_encoder_outputs(fixed_captions(dataset), tokenizer, text_encoder, args, device)
    if args.cache_latents:
        vae.to("cpu")  # sampling moves it back for as long as it needs it
    if text_cache is not None:
        text_encoder.to("cpu")

    batch_size = getattr(dataset, "batch_size", None) or args.train_batch_size  # a dataset config's batch_size wins
    batch_sampler = BucketBatchSampler(dataset, batch_size, seed=args.seed)
    loader_sampler = ShardedBatches(batch_sampler, accelerator.process_index, accelerator.num_processes)
    workers = args.max_data_loader_n_workers
    if workers is None:  # on a CPU the step is hundreds of times slower than loading: workers only take its cores
        workers = 0 if args.cache_latents or device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=loader_sampler, collate_fn=collate_fn,
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

    # --- network ----------------------------------------------------------------------------------------------
    network = create_network(unet, text_encoder, rank=args.network_dim, alpha=args.network_alpha,
                             dropout=args.network_dropout, train_unet=train_unet,
                             train_text_encoder=train_text_encoder, **network_options(args))
    embedding, embedding_steps = None, 0
    if args.token_string:
        from lora_diffusion.network import TokenEmbeddings

        embedding = network.add_embedding(TokenEmbeddings.create(tokenizer, text_encoder, args.token_string,
                                                                 args.init_word, args.num_vectors_per_token))
        embedding_steps = math.ceil(args.train_text_encoder_ti_frac * max_train_steps)
        word = re.compile(rf"(?<!\w){re.escape(args.token_string)}(?!\w)", re.IGNORECASE)
        if not any(word.search(caption) for caption in fixed_captions(dataset)):
            accelerator.print(f"warning: no caption holds --token_string {args.token_string}; its embedding "
                              f"only learns from captions that name it")
    if args.network_weights:
        network.load_weights(args.network_weights)
        accelerator.print(f"started from {args.network_weights}")
    network.to(device).train()
    check_free_space(output_dir, network, args)
    set_seed(args.seed, device_specific=True)  # same LoRA init everywhere; different noise on each process
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        unet.train()  # diffusers and transformers only checkpoint in training mode; dropout is 0 in SD
        text_encoder.train(train_text_encoder)

    param_groups = network.param_groups(unet_lr=args.unet_lr, text_encoder_lr=args.text_encoder_lr,
                                        default_lr=args.learning_rate, embedding_lr=args.embedding_lr)
    optimizer = create_optimizer(args.optimizer_type, param_groups, learning_rate=args.learning_rate,
                                 optimizer_args=args.optimizer_args)
    lr_scheduler = create_lr_scheduler(args.lr_scheduler, optimizer, num_training_steps=max_train_steps,
                                       lr_warmup_steps=args.lr_warmup_steps,
                                       lr_scheduler_num_cycles=args.lr_scheduler_num_cycles,
                                       lr_scheduler_power=args.lr_scheduler_power)
    # Only the optimizer goes through accelerate (GradScaler for fp16, skipped steps while accumulating). The
    # scheduler is stepped by hand once per optimizer step. The gradients are averaged across processes by hand
    # (average_gradients), not by DDP, although the LoRA is in the models' trees and DDP(unet) works: one flat
    # all-reduce per optimizer step covers the LoRA of both models and a new token's embedding (which is outside
    # them), with no no_sync() for accumulation and no wrapping to undo for sampling and saving. Measured on 2 gloo
    # CPU processes, builtin:tiny, LoRA on U-Net + text encoder, 15 steps x 4 runs each: 227-322 ms/step by hand,
    # 286-309 ms/step with DDP over the U-Net and the text encoder (the same within noise).
    optimizer_name = describe_optimizer(optimizer, args.optimizer_args)
    optimizer = accelerator.prepare(optimizer)
    pieces = dict(network=network, optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=accelerator)

    # --- where we start ---------------------------------------------------------------------------------------
    global_step, first_epoch, skip_batches = 0, 0, 0
    epoch_files = list(resumed.get("epoch_files", []))  # stems of the epoch files this run wrote, oldest first
    if args.resume:
        state = load_state(args.resume, **pieces)
        global_step, first_epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        accelerator.print(f"resumed from {args.resume} at step {global_step} (epoch {first_epoch + 1}, "
                          f"batch {skip_batches})")

    run = {"models": models, "resolution": resolution,
           "metadata": run_metadata(args, models, dataset, resolution, batch_size, batches_per_epoch,
                                   max_train_steps, num_epochs, optimizer_name, session_id)}
    if log_with:
        accelerator.init_trackers("lora_diffusion", config={k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, bool))})

    last_sampled_step = None

    last_samples = []  # the PNGs of the last sampling

    def sample(epoch=None):
        nonlocal last_sampled_step, last_samples
        last_sampled_step = global_step
        if not prompts or not accelerator.is_main_process:
            return
        # generate_samples puts every module (the LoRA too: no dropout in the pictures) in eval mode and gives each
        # submodule its own mode back: the frozen base stays in eval, the LoRA in train mode.
        last_samples = generate_samples(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
            noise_scheduler=models.noise_scheduler, prompts=prompts, out_dir=output_dir / "sample", step=global_step,
            epoch=epoch, output_name=args.output_name, device=device, dtype=weight_dtype,
            sampler=args.sample_sampler, v_parameterization=models.v_parameterization, clip_skip=args.clip_skip,
            max_token_length=args.max_token_length, seed=args.seed, expand_prompt=network.expand_prompt)

    last_saved = None  # the last LoRA file this process wrote; every file written was checked finite

    def intact():
        return (f"The last file written, {last_saved}, holds finite weights." if last_saved else
                "No LoRA file was written by this run.")

    def checkpoint(stem, epoch, batch_in_epoch, *, with_state=args.save_state, final=False):
        """The LoRA (and the state to resume at `batch_in_epoch` of 0-based `epoch`) as `<stem>...`, never with
        NaN/inf (checked after the cast to --save_precision); a write error names the path."""
        nonlocal last_saved
        path, state_dir = output_dir / f"{stem}.safetensors", output_dir / f"{stem}-state"
        bad = non_finite(network.file_tensors(SAVE_DTYPES[args.save_precision]))
        if bad:
            cause = "are NaN/inf" if non_finite(network.state_dict()) else \
                f"overflow --save_precision {args.save_precision} (fp16 ends at 65504)"
            raise TrainingError(f"at step {global_step} the LoRA weights {cause} ({len(bad)} tensors, e.g. {bad[0]}); "
                                f"{path.name} was not written. {intact()} Try a lower --learning_rate or "
                                f"--unet_lr/--text_encoder_lr, --max_grad_norm 1.0, or --save_precision bf16/float")
        extra = dict(session_id=session_id, network_shape=network_shape, epoch_files=epoch_files)
        target = path
        try:
            save_lora(network, path, args, run, accelerator,
                      epoch=epoch + (batch_in_epoch > 0), step=global_step, final=final)  # ss_epoch counts from 1
            last_saved, target = path, state_dir
            if with_state:
                save_state(state_dir, step=global_step, epoch=epoch, batch_in_epoch=batch_in_epoch, extra=extra,
                           **pieces)
        except OSError as e:
            raise TrainingError(f"could not write {target} at step {global_step}: {e.strerror or e}. Files already "
                                f"there are left as they were (writes are atomic). {intact()}") from None
        except StateError as e:
            raise TrainingError(f"at step {global_step}: {e}. {intact()}") from None

    # --- one step: noise, predict, loss -----------------------------------------------------------------------
    def compute_loss(batch):
        if "latents" in batch:
            latents = batch["latents"].to(device)
        else:
            with torch.no_grad():
                images = batch["images"].to(device, vae.dtype)
                latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        latents = latents.to(weight_dtype)
        if text_cache is not None:
            context = torch.stack([text_cache[c] for c in batch["captions"]]).to(device)
        else:
            grad = train_text_encoder or (embedding is not None and embedding.weight.requires_grad)
            with torch.set_grad_enabled(grad), accelerator.autocast():
                context = encode_prompts(tokenizer, text_encoder, [network.expand_prompt(c) for c in batch["captions"]],
                                         clip_skip=args.clip_skip, max_token_length=args.max_token_length)
        noise = make_noise(latents, noise_offset=args.noise_offset,
                           multires_noise_iterations=args.multires_noise_iterations,
                           multires_noise_discount=args.multires_noise_discount)
        timesteps = sample_timesteps(latents.shape[0], min_timestep=args.min_timestep,
                                     max_timestep=args.max_timestep, device=device)
        noisy, target = training_target(models.noise_scheduler, latents, noise, timesteps, models.v_parameterization)
        with accelerator.autocast():
            pred = unet(noisy, timesteps, context.to(weight_dtype)).sample
        return diffusion_loss(pred, target, timesteps=timesteps, noise_scheduler=models.noise_scheduler,
                              min_snr_gamma=args.min_snr_gamma, v_parameterization=models.v_parameterization,
                              is_reg=batch["is_reg"].to(device), prior_loss_weight=args.prior_loss_weight)

    # --- the loop ---------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    params = [p for group in param_groups for p in group["params"]]
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="steps")
    recent_losses, epoch, batch_in_epoch = [], first_epoch, skip_batches
    started, first_step_done = time.time(), None
    accelerator.print(f"training {sum(p.numel() for p in params):,} LoRA parameters for {max_train_steps} steps "
                      f"({num_epochs} epochs of {steps_per_epoch} steps) on {device}, "
                      f"{'fp32' if args.mixed_precision == 'no' else args.mixed_precision}")
    stop = DeferredStop().__enter__()
    try:
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps:
                break
            batch_sampler.set_epoch(epoch)
            batch_in_epoch = skip_batches if epoch == first_epoch else 0
            batch_sampler.skip_batches = batch_in_epoch * accelerator.num_processes
            micro = 0
            for batch in loader:
                if micro == 0:  # one optimizer step sums N micro-batches, or what is left of the epoch
                    group = min(args.gradient_accumulation_steps, batches_per_epoch - batch_in_epoch)
                    if embedding is not None and global_step >= embedding_steps and embedding.weight.requires_grad:
                        embedding.weight.requires_grad_(False)  # --train_text_encoder_ti_frac: kept from here on
                        embedding.weight.grad = None  # optimizers skip a parameter without a gradient
                loss = compute_loss(batch)
                if not loss_is_finite(loss, accelerator):
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {global_step + 1} (epoch {epoch + 1}); stopping "
                        f"before a broken file is written. {intact()} Try a lower --learning_rate, "
                        f"--mixed_precision bf16 instead of fp16, or --max_grad_norm 1.0")
                accelerator.backward(loss / group)
                micro, batch_in_epoch = micro + 1, batch_in_epoch + 1
                if micro < group:
                    continue
                micro = 0
                average_gradients(params, accelerator)
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr_scheduler.step()
                global_step += 1

                recent_losses = (recent_losses + [loss.item()])[-100:]
                logs = {"loss/current": recent_losses[-1], "loss/average": sum(recent_losses) / len(recent_losses)}
                for group_of_params, lr in zip(optimizer.param_groups, lr_scheduler.get_last_lr()):
                    logs[LR_LOG_NAMES.get(group_of_params.get("name"), "lr/textencoder")] = lr
                progress.update(1)
                if first_step_done is None:
                    first_step_done = (time.time(), global_step)  # later steps are the steady pace
                progress.set_postfix(loss=f"{logs['loss/average']:.4f}")
                if log_with:
                    accelerator.log({args.log_prefix + k: v for k, v in logs.items()}, step=global_step)
                if args.save_every_n_steps and global_step % args.save_every_n_steps == 0:
                    checkpoint(f"{args.output_name}-step{global_step:08d}", epoch, batch_in_epoch)
                if args.sample_every_n_steps and global_step % args.sample_every_n_steps == 0:
                    sample()
                if global_step >= max_train_steps:
                    break
                if stop_requested(stop, accelerator):  # a whole step is done: its LoRA and state resume exactly
                    raise _StopAtBoundary
            if batch_in_epoch < batches_per_epoch:
                continue  # stopped inside the epoch
            done = epoch + 1
            if args.save_every_n_epochs and done % args.save_every_n_epochs == 0 and done < num_epochs:
                stem = f"{args.output_name}-{done:06d}"
                epoch_files = [s for s in epoch_files if s != stem] + [stem]
                checkpoint(stem, done, 0)
                if args.save_last_n_epochs and accelerator.is_main_process:  # only files of this run, checked
                    for suffix in (".safetensors", "-state"):
                        rotate([output_dir / f"{s}{suffix}" for s in epoch_files], args.save_last_n_epochs,
                               owned=lambda path: session_of(Path(path)) == session_id)
            if args.sample_every_n_epochs and done % args.sample_every_n_epochs == 0:
                sample(epoch=done)
    except _StopAtBoundary:
        why = signal.Signals(stop.signum).name if stop.signum else "a signal to another process"
        accelerator.print(f"\n{why} at step {global_step}: saving the LoRA and the training state")
        stem = f"{args.output_name}-step{global_step:08d}"
        checkpoint(stem, epoch, batch_in_epoch, with_state=True)  # a second signal here aborts the save
        accelerator.print(f"resume with: --resume {output_dir / (stem + '-state')}")
        raise KeyboardInterrupt from None
    finally:
        stop.__exit__()
        progress.close()  # an error message then starts on a line of its own
    loop_ended = time.time()

    # --- the final file ---------------------------------------------------------------------------------------
    check_identical_across_processes(params, accelerator)
    final_path = output_dir / f"{args.output_name}.safetensors"
    checkpoint(args.output_name, epoch, batch_in_epoch, final=True)
    lines = []
    if embedding is not None and accelerator.is_main_process:
        emb_path = output_dir / f"{args.output_name}_emb.safetensors"
        embedding.save_textual_inversion(emb_path, {"ss_session_id": session_id})
        lines.append(f"embedding {' '.join(embedding.tokens)}: bundled in the LoRA file (A1111/Forge) and in "
                     f"{emb_path} "
                     f"(diffusers: load_textual_inversion(path, token={args.token_string!r}), and load_lora_weights "
                     f"of the LoRA file's tensors without its bundle_emb.* keys)")
    if prompts and last_sampled_step != global_step:
        sample()  # the final LoRA's pictures, unless this step was just sampled
    if last_samples:
        lines += summarize_last_samples(last_samples, output_dir / "sample" / f"{args.output_name}_grid.png")
    accelerator.end_training()
    elapsed = time.time() - started
    pace = ""
    if first_step_done and global_step > first_step_done[1]:
        per_step = (loop_ended - first_step_done[0]) / (global_step - first_step_done[1])
        pace = f" ({per_step:.3f} s/step after the first)"
    accelerator.print(f"done: {global_step} steps in {elapsed:.1f}s{pace}; LoRA: {final_path}" +
                      (f"; samples: {output_dir / 'sample'}" if prompts else "") +
                      (f"; logs: {args.logging_dir}" if args.logging_dir else ""))
    for line in lines:
        accelerator.print(line)
    return final_path


def summarize_last_samples(paths, grid_path) -> list[str]:
    """The last sampling's images in one grid, and the shapes world judge's verdict when the prompts are its own."""
    from PIL import Image

    from lora_diffusion.quality import fmt, summarize_samples
    from lora_diffusion.world import parse_caption

    grid_path, accuracy = summarize_samples(paths, grid_path)
    lines = [f"samples of the last sampling in one grid: {grid_path}"]
    if accuracy:
        judged = sum(parse_caption(Image.open(p).text.get("prompt", "")) is not None for p in paths)
        lines.append(f"judged (shapes world): {fmt(accuracy)} of {judged} samples")
    return lines


def loss_is_finite(loss, accelerator) -> bool:
    """The same answer on every process (so that all stop together): is the loss finite everywhere?"""
    finite = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return finite.item() == 1.0


def average_gradients(params, accelerator):
    """Mean of the LoRA gradients over processes, in one flat all-reduce."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad]  # a frozen embedding keeps no gradient: the optimizer skips it
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for p, piece in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = piece.view_as(p)


def check_identical_across_processes(params, accelerator):
    """Every process must end with the same LoRA: compare a fingerprint of the weights before one process writes."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(9973)
    fingerprint = torch.stack([flat.double().sum(), (flat.double() * weights).sum()])
    everyone = accelerator.gather(fingerprint[None]).reshape(-1, 2)
    if not torch.equal(everyone.min(0).values, everyone.max(0).values):
        raise TrainingError(f"LoRA weights differ between processes: {everyone.tolist()}")
    accelerator.print(f"LoRA weights identical on {accelerator.num_processes} processes")


def dataset_resolution(dataset) -> tuple[int, int]:
    """(width, height) the dataset trains at: --resolution, or what a dataset config set."""
    width, height = dataset.subsets[0].resolution
    return int(width), int(height)


def run_metadata(args, models, dataset, resolution, batch_size, num_batches, max_train_steps, num_epochs,
                 optimizer_name, session_id) -> dict:
    """The training record (kohya's ss_* keys) of this run, as plain values."""
    return dict(
        ss_learning_rate=args.learning_rate, ss_unet_lr=args.unet_lr, ss_text_encoder_lr=args.text_encoder_lr,
        ss_num_train_images=dataset.num_train_images, ss_num_reg_images=dataset.num_reg_images,
        ss_num_batches_per_epoch=num_batches, ss_num_epochs=num_epochs, ss_max_train_steps=max_train_steps,
        ss_lr_warmup_steps=args.lr_warmup_steps, ss_lr_scheduler=args.lr_scheduler,
        ss_optimizer=optimizer_name,
        ss_mixed_precision=args.mixed_precision, ss_full_fp16=False, ss_seed=args.seed,
        ss_resolution=f"({resolution[0]}, {resolution[1]})",
        ss_clip_skip=args.clip_skip, ss_max_token_length=args.max_token_length, ss_noise_offset=args.noise_offset,
        ss_multires_noise_iterations=args.multires_noise_iterations,
        ss_multires_noise_discount=args.multires_noise_discount, ss_min_snr_gamma=args.min_snr_gamma,
        ss_caption_dropout_rate=args.caption_dropout_rate, ss_caption_tag_dropout_rate=args.caption_tag_dropout_rate,
        ss_keep_tokens=args.keep_tokens, ss_shuffle_caption=args.shuffle_caption, ss_flip_aug=args.flip_aug,
        ss_enable_bucket=args.enable_bucket, ss_bucket_no_upscale=args.bucket_no_upscale,
        ss_min_bucket_reso=args.min_bucket_reso, ss_max_bucket_reso=args.max_bucket_reso,
        ss_cache_latents=args.cache_latents,
        ss_gradient_checkpointing=args.gradient_checkpointing,
        ss_gradient_accumulation_steps=args.gradient_accumulation_steps,
        ss_batch_size_per_device=batch_size, ss_max_grad_norm=args.max_grad_norm,
        ss_prior_loss_weight=args.prior_loss_weight, ss_network_dropout=args.network_dropout,
        ss_dataset_dirs=dataset.dataset_dirs, ss_tag_frequency=dataset.tag_frequency,
        ss_sd_model_name=os.path.basename(str(args.pretrained_model_name_or_path)),
        ss_training_started_at=time.time(), ss_v_parameterization=models.v_parameterization,
        ss_training_comment=args.training_comment, ss_session_id=session_id,
    )


def main(argv=None, prog=None) -> int:
    from lora_diffusion.config import write_config_file

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
    except KeyboardInterrupt:
        return 130


def command(argv=None, prog=None) -> int:
    """The trainer as a command (`python train_lora.py`, `lora-diffusion train`): main() with SIGTERM as Ctrl-C."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's SIGTERM saves like Ctrl-C
    return main(argv, prog)


if __name__ == "__main__":
    sys.exit(command())
