"""Every option of `train_lora.py`, declared once: kohya sd-scripts' train_network.py / sdxl_train_network.py
flags with kohya's meaning, and this trainer's own (kohya=False). The parser, the TOML and kohya_ss GUI readers,
`--output_config`, the ss_* metadata and the flag table of docs/guide.md are made from this list; the dataset
options come from lora_diffusion.data.subset.Subset (the one declaration of those)."""

from dataclasses import fields

from lora_diffusion.data.subset import FLAG_DEFAULTS, Subset

from .declare import SWITCH, Option, group

LATER = "not implemented yet in this trainer"
NO_NETWORK = "it uploads to the Hugging Face Hub, and this trainer works offline (copy the files yourself)"
DEEPSPEED = ("DeepSpeed is not wired into this trainer yet (the LoRA trains through DDP: accelerate launch "
             "--multi_gpu; see docs/guide.md#distributed)")


def int_or_float(text):
    """kohya's int_or_float: "100" -> 100 steps, "0.1" -> a fraction of the steps."""
    value = float(text)
    return int(value) if value.is_integer() and "." not in str(text) else value


def _dataset_options() -> list[Option]:
    """The dataset options that are also flags, from their one declaration (Subset's fields)."""

    declared = {f.name: f for f in fields(Subset)}
    options = []
    for name, default in FLAG_DEFAULTS.items():
        meta = declared[name].metadata
        kind = meta["kind"]
        kind = SWITCH if kind is bool else str if kind in ("resolution", list, tuple) else kind
        options.append(Option(name, kind, default, meta.get("flag_help", meta.get("help", "")),
                              choices=meta.get("choices"), dataset=True, metadata=meta.get("metadata", False),
                              kohya=meta.get("kohya", True)))
    return options


# Options whose declaration here replaces the dataset's: their defaults depend on the model (resolve()).
_MODEL_DEFAULTS = [
    Option("resolution", str, None, "W or W,H (default: 512, or 1024 for SDXL)", dataset=True),
    Option("min_bucket_reso", int, None, "default: 256, or 512 for SDXL without --resolution", dataset=True,
           metadata=True),
    Option("max_bucket_reso", int, None, "default: 1024, or 2048 for SDXL without --resolution", dataset=True,
           metadata=True),
]

CONFIG = group(
    "config",
    Option("config_file", str, None, "TOML of flags (any sections), or a kohya_ss GUI .json"),
    Option("output_config", SWITCH, False, "write the flags to <output_dir>/<output_name>.toml and exit"),
    Option("console_log_level", str, None, "log level of the console", choices=("DEBUG", "INFO", "WARNING", "ERROR",
                                                                                "CRITICAL")),
    Option("console_log_file", str, None, "also write the log to this file"),
    Option("console_log_simple", SWITCH, False, "plain log lines (no colours; ours are plain anyway)"),
)

MODEL = group(
    "model",
    Option("pretrained_model_name_or_path", str, None, "diffusers folder, SD1.x/2.x/SDXL .safetensors/.ckpt, "
           "builtin:mini, builtin:tiny or builtin:tiny-xl (SDXL is detected: see docs/guide.md)"),
    Option("v2", SWITCH, False, "the model is SD2.x (detected from single files)"),
    Option("v_parameterization", SWITCH, False, "v-prediction (SD2.x 768-v)"),
    Option("clip_skip", int, None, "use the output of the k-th last text-encoder layer (2: penultimate); ignored "
           "for SDXL, which always uses the penultimate layers", metadata=True),
    Option("max_token_length", int, None, "75, 150 or 225 tokens of caption", choices=(75, 150, 225), metadata=True),
    Option("vae", str, None, "a VAE to use instead of the model's: a diffusers VAE folder, or a .safetensors/.ckpt "
           "of VAE weights (sd-vae-ft-mse-original, a checkpoint's first_stage_model)"),
    Option("tokenizer_cache_dir", str, None, "kohya downloads the tokenizer there; ours ship with the package, so "
           "this has no effect"),
    Option("disable_mmap_load_safetensors", SWITCH, False, "kohya reads SDXL single files without mmap; ours "
           "reads tensors by offset either way (no effect)"),
    Option("lowram", SWITCH, False, "kohya loads the models straight onto the GPU; ours load lazily from the "
           "file (no effect)"),
    Option("threads", int, None, "CPU threads of PyTorch's operations on a CPU (default: the cores not busy now, at "
           "least 1, unless OMP_NUM_THREADS is set: a thread per core spin-waits against other jobs)", kohya=False),
    Option("highvram", SWITCH, False, "keep the VAE and text encoders on the device after caching (default: "
           "moved to the CPU to free memory)"),
)

DATA = group(
    "data (see docs/dataset.md)",
    Option("train_data_dir", str, None, "the PARENT of <repeats>_<name> folders"),
    Option("reg_data_dir", str, None, "the parent of <repeats>_<class> regularization folders"),
    Option("dataset_config", str, None, "kohya dataset config TOML ([general], [[datasets]], [[datasets.subsets]])"),
    *_MODEL_DEFAULTS,
    Option("caption_extention", str, None, "kohya's old spelling of --caption_extension", dest="caption_extension"),
    Option("prior_loss_weight", float, 1.0, "loss weight of regularization images", metadata=True),
    Option("reg_target", str, "noise", "what regularization images learn: the added noise (kohya, DreamBooth) or "
           "base_model, the prediction of the model without the LoRA, so the LoRA leaves their prompts as they were "
           "(one more U-Net forward per step)", choices=("noise", "base_model"), kohya=False),
    Option("cache_latents", SWITCH, None, "encode every image once before training (the default unless "
           "--random_crop or --color_aug: measured 0.68x the time per step; see docs/performance.md)", metadata=True),
    Option("no_cache_latents", SWITCH, None, "run the VAE on every step instead (kohya's default; draws a fresh "
           "latent sample each time)", dest="cache_latents", const=False, kohya=False),
    Option("cache_latents_to_disk", SWITCH, False, "keep the latents next to the images for later runs"),
    Option("cache_info", SWITCH, False, "kohya caches the images' sizes in a JSON for the next start; ours reads "
           "image headers only (no effect)"),
    Option("skip_cache_check", SWITCH, False, "kohya skips checking disk caches; ours checks a small header (no "
           "effect)"),
    Option("vae_batch_size", int, 1, "images a VAE call while caching"),
    Option("no_half_vae", SWITCH, False, "keep the VAE in fp32 also under bf16 (under fp16 it always is: SD's VAEs "
           "overflow in fp16)", gui=("sdxl_no_half_vae",)),
    Option("cache_text_encoder_outputs", SWITCH, False, "encode each caption once before training (needs frozen "
           "text encoders: --network_train_unet_only, and fixed captions); done anyway when both hold",
           gui=("sdxl_cache_text_encoder_outputs",)),
    Option("cache_text_encoder_outputs_to_disk", SWITCH, False, "and keep them next to the images "
           "(<stem>_te_<key>.safetensors) for later runs"),
    Option("train_batch_size", int, 1, "images a step on each device"),
    Option("max_data_loader_n_workers", int, None, "default: 0 with cached latents, else up to 4"),
    Option("persistent_data_loader_workers", SWITCH, False, "keep the loader's worker processes between epochs "
           "(ours always do when there are workers)"),
    Option("dataset_class", str, None, "kohya's own Python dataset class", refused="a Python dataset class is "
           "kohya's code; use a --dataset_config instead"),
    Option("weighted_captions", SWITCH, False, "the web UIs' emphasis in captions: (word:1.2), (word) = x1.1, "
           "[word] = /1.1, as weights on those tokens' text-encoder states (each caption's mean kept, as kohya)"),
)

NETWORK = group(
    "network",
    Option("network_module", str, "networks.lora", "networks.lora (kohya's LoRA/LoCon) or lycoris.kohya (LyCORIS: "
           "--network_args algo=lora|locon|loha|lokr|ia3, dora_wd=True, use_tucker=True, factor=8, "
           "decompose_both=True)"),
    Option("network_dim", int, 4, "rank"),
    Option("network_alpha", float, 1.0, "the LoRA's output is scaled by alpha / rank"),
    Option("network_dropout", float, 0.0, "dropout of the rank's activations (kohya's neuron dropout)",
           metadata=True),
    Option("network_args", str, [], 'conv_dim=8 conv_alpha=4 rank_dropout=0.1 module_dropout=0.1 (and LyCORIS\' '
           "with lycoris.kohya)", nargs="*"),
    Option("network_weights", str, None, "start from this LoRA file (not a resume: see --resume)",
           gui=("lora_network_weights",)),
    Option("network_train_unet_only", SWITCH, False, "train the U-Net's LoRA only"),
    Option("network_train_text_encoder_only", SWITCH, False, "train the text encoders' LoRA only"),
    Option("dim_from_weights", SWITCH, False, "take each module's rank and alpha from --network_weights (and only "
           "its modules)"),
    Option("scale_weight_norms", float, None, "scale down each module whose weight change has a norm above this "
           "(kohya's max-norm regularization; 1 is typical)", metadata=True),
    Option("base_weights", str, None, "LoRA files merged into the model for good before training (a new LoRA on "
           "top of them)", nargs="*"),
    Option("base_weights_multiplier", float, None, "their multipliers (missing ones: 1)", nargs="*"),
    *[Option(name, SWITCH, False, f"store the frozen {part} Linear / Conv2d weights in float8 e4m3 (upcast "
             "per layer to the compute dtype)")
      for name, part in (("fp8_base", "U-Net and text encoder"), ("fp8_base_unet", "U-Net"))],
)

PIVOTAL = group(
    "pivotal tuning: a new token's embedding trains with the LoRA (see docs/training.md)",
    Option("token_string", str, None, "the new word, written in the captions and prompts (e.g. sks); in both text "
           "encoders on SDXL; saved in the LoRA file as A1111 bundles embeddings, and as "
           "<output_name>_emb.safetensors", kohya=False),
    Option("init_word", str, None, "start the vectors from this word's (one token a vector, cycling); default: the "
           "vocabulary's mean", kohya=False),
    Option("num_vectors_per_token", int, 1, "vectors of the new token; with N > 1 the token stands for "
           "`tok tok_1 ... tok_<N-1>` in captions and prompts", kohya=False),
    Option("embedding_lr", float, None, "learning rate of the new vectors (default: --learning_rate)", kohya=False),
    Option("train_text_encoder_ti_frac", float, 1.0, "train the vectors during this fraction of the steps only, "
           "then keep them (diffusers' advanced scripts; default 1: all steps)", kohya=False),
)

EDLORA = group(
    "ED-LoRA (Mix-of-Show's concept LoRAs; docs/research.md, examples/mix_of_show/edlora.toml)",
    Option("layerwise_embeddings", SWITCH, False, "--token_string gets one embedding per cross-attention layer "
           "(P+): the prompt is encoded once per layer; saved as <output_name>.layerwise.safetensors (the LoRA file "
           "bundles their mean); with 2+ vectors the first starts random (std 0.013), the others from --init_word; "
           "SD1.x/2.x", kohya=False),
    Option("attn_reg_weight", float, 0.0, "weight of the attention loss pulling the token's cross-attention maps "
           "towards the subject mask (needs --layerwise_embeddings and masks: --alpha_mask or "
           "conditioning_data_dir); 0: off", kohya=False),
    Option("embedding_norm_threshold", float, None, "keep the token's vectors once their mean norm reaches this "
           "(checked after each step); default: never", kohya=False),
    Option("network_include", str, [], "train LoRA only on the modules whose path or kohya name matches one of "
           "these regexes (e.g. attention only: 'attn[12].to_' 'self_attn.')", nargs="*", kohya=False),
)

OPTIMIZER = group(
    "optimizer",
    Option("optimizer_type", str, "AdamW", "AdamW, AdamW8bit, Lion, Lion8bit, PagedAdamW8bit, Prodigy, Adafactor, "
           "SGDNesterov, DAdaptAdam (and the DAdapt family), AdamWScheduleFree, SGDScheduleFree or module.Class",
           gui=("optimizer",)),
    Option("optimizer_args", str, [], 'e.g. "weight_decay=0.01" "betas=0.9,0.99"', nargs="*"),
    Option("use_8bit_adam", SWITCH, False, "same as --optimizer_type AdamW8bit"),
    Option("use_lion_optimizer", SWITCH, False, "same as --optimizer_type Lion"),
    Option("learning_rate", float, 1e-4, "learning rate of all groups without their own", metadata=True),
    Option("unet_lr", float, None, "learning rate of the U-Net's LoRA", metadata=True),
    Option("text_encoder_lr", float, None, "learning rate of the text encoders' LoRA (default: --learning_rate); on "
           "SDXL one value for both or two: TE1 (CLIP ViT-L), TE2 (OpenCLIP bigG)", nargs="+", metadata=True),
    Option("lr_scheduler", str, "constant", "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
           "polynomial, cosine_with_min_lr, inverse_sqrt, warmup_stable_decay, adafactor", metadata=True),
    Option("lr_scheduler_type", str, "", "a scheduler class instead (torch.optim.lr_scheduler.CosineAnnealingLR, "
           "or module.Class), built with --lr_scheduler_args"),
    Option("lr_scheduler_args", str, None, 'its arguments, e.g. "T_max=100"', nargs="*"),
    Option("lr_warmup_steps", int_or_float, 0, "steps, or a fraction (< 1) of the total", metadata=True),
    Option("lr_decay_steps", int_or_float, 0, "warmup_stable_decay: steps of the final decay, or a fraction (< 1)"),
    Option("lr_scheduler_num_cycles", int, 1, "cosine_with_restarts: restarts", metadata=True),
    Option("lr_scheduler_power", float, 1.0, "polynomial: the power", metadata=True),
    Option("lr_scheduler_timescale", int, None, "inverse_sqrt: the timescale (default: the warmup steps)"),
    Option("lr_scheduler_min_lr_ratio", float, None, "cosine_with_min_lr / warmup_stable_decay: the final lr as a "
           "fraction of the initial"),
    Option("optimizer_schedulefree_wrapper", SWITCH, False, "wrap --optimizer_type in schedule-free's "
           "ScheduleFreeWrapper", kohya=False),
    Option("max_grad_norm", float, 1.0, "0 disables clipping", metadata=True),
    Option("fused_backward_pass", SWITCH, False, "step each parameter inside the backward pass and free its "
           "gradient at once (--optimizer_type Adafactor, no accumulation, as kohya's; --max_grad_norm clips each "
           "tensor)"),
    Option("ema_decay", float, None, "keep an exponential moving average of the LoRA weights with this decay "
           "(0.999 is typical) and save it instead of the raw weights (OneTrainer's EMA)", kohya=False,
           refused="EMA of the LoRA weights is not implemented yet"),
)

TRAINING = group(
    "training",
    Option("max_train_steps", int, 1600, "optimizer steps of the run", metadata=True),
    Option("max_train_epochs", int, None, "overrides --max_train_steps", gui=("epoch",)),
    Option("seed", int, 42, "seed of everything random", metadata=True),
    Option("mixed_precision", str, "no", "no, fp16 or bf16", choices=("no", "fp16", "bf16"), metadata=True),
    Option("full_fp16", SWITCH, False, "the LoRA's weights, gradients and optimizer state in fp16 too (with "
           "--mixed_precision fp16; the GradScaler unscales the fp16 gradients; bf16 is safer)", metadata=True),
    Option("no_tf32", SWITCH, False, "on CUDA, keep fp32 matmuls and convolutions in full fp32 (default: TF32 "
           "allowed, about 8x faster on Ampere and later GPUs)", kohya=False),
    Option("full_bf16", SWITCH, False, "the LoRA's weights, gradients and optimizer state in bf16 too (with "
           "--mixed_precision bf16; half the memory of the trained weights, coarser updates)"),
    Option("gradient_accumulation_steps", int, 1, "micro-batches an optimizer step", metadata=True),
    Option("gradient_checkpointing", SWITCH, False, "recompute activations in the backward pass", metadata=True),
    Option("cpu_offload_checkpointing", SWITCH, False, "with --gradient_checkpointing: what the U-Net's backward "
           "keeps waits in (pinned) CPU memory"),
    Option("xformers", SWITCH, False, "xformers attention (default: PyTorch SDPA; without xformers installed, a "
           "warning and SDPA)"),
    Option("sdpa", SWITCH, False, "PyTorch's scaled dot-product attention (our default anyway)"),
    Option("mem_eff_attn", SWITCH, False, "kohya's memory-efficient attention: PyTorch SDPA here (which picks its "
           "memory-efficient kernel)"),
    Option("torch_compile", SWITCH, False, "torch.compile the U-Net with its LoRA layers (the first steps and each "
           "new shape compile first)"),
    Option("dynamo_backend", str, "inductor", "the torch.compile backend (inductor; eager or aot_eager to check "
           "tracing without compiling)"),
    Option("noise_offset", float, 0.0, "add a per-channel constant to the noise (dark/bright images)", metadata=True),
    Option("noise_offset_random_strength", SWITCH, False, "draw the offset's strength in [0, noise_offset] per "
           "sample"),
    Option("adaptive_noise_scale", float, None, "add |mean of each latent channel| x this to the noise offset "
           "(needs --noise_offset)", metadata=True),
    Option("multires_noise_iterations", int, 0, "multi-resolution (pyramid) noise levels (6-10)", metadata=True),
    Option("multires_noise_discount", float, 0.3, "weight of each lower level", metadata=True),
    Option("ip_noise_gamma", float, None, "input perturbation: noise the latents with noise + gamma x another "
           "noise (0.1 is typical)"),
    Option("ip_noise_gamma_random_strength", SWITCH, False, "draw gamma in [0, ip_noise_gamma] per step"),
    Option("zero_terminal_snr", SWITCH, False, "rescale the schedule to zero terminal SNR (Lin et al. 2023)",
           metadata=True),
    Option("min_snr_gamma", float, None, "Min-SNR weighting (5 is typical)", metadata=True),
    Option("debiased_estimation_loss", SWITCH, False, "weight the loss by 1/sqrt(SNR) (debiased estimation)"),
    Option("scale_v_pred_loss_like_noise_pred", SWITCH, False, "v-prediction: scale the loss like epsilon "
           "prediction's"),
    Option("v_pred_like_loss", float, None, "add this share of a v-prediction-like loss"),
    Option("loss_type", str, "l2", "l1, l2 (MSE), huber or smooth_l1", choices=("l1", "l2", "huber", "smooth_l1"),
           metadata=True),
    Option("huber_schedule", str, "snr", "how the Huber c changes with the timestep",
           choices=("constant", "exponential", "snr")),
    Option("huber_c", float, 0.1, "the Huber loss' c"),
    Option("huber_scale", float, 1.0, "scale of the Huber loss' c"),
    Option("masked_loss", SWITCH, False, "train only where the mask is white (mask images of a dataset config's "
           "conditioning_data_dir, or the images' alpha with --alpha_mask)"),
    Option("min_timestep", int, 0, "smallest timestep trained"),
    Option("max_timestep", int, 1000, "largest timestep trained (exclusive)"),
    Option("initial_epoch", int, None, "start counting at this epoch (1 = the first): step (E - 1) x steps per "
           "epoch, as --initial_step"),
    Option("initial_step", int, None, "start counting steps here (file names, schedules; --max_train_steps counts "
           "from 0), e.g. to go on from a --network_weights file; the LR schedule restarts unless --resume; wins "
           "over --initial_epoch"),
    Option("skip_until_initial_step", SWITCH, False, "skip the data of the steps before --initial_step (else the "
           "data starts at the beginning of that epoch)"),
)

DISTRIBUTED = group(
    "distributed (accelerate launch)",
    Option("ddp_timeout", int, None, "minutes a process waits for the others at any collective (the latent cache, "
           "saves; default: torch's, 10 for NCCL)"),
    Option("ddp_gradient_as_bucket_view", SWITCH, False, "DDP's gradient_as_bucket_view: the LoRA's gradients are "
           "views of DDP's all-reduce buckets (no copy)"),
    Option("ddp_static_graph", SWITCH, False, "DDP's static_graph: the same parameters train at every step (not with "
           "--clip_skip and a trained text encoder, module dropout, or --train_text_encoder_ti_frac below 1)"),
    Option("deepspeed", SWITCH, False, "train with DeepSpeed", refused=DEEPSPEED),
    Option("zero_stage", int, 2, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3)),
    Option("offload_optimizer_device", str, None, "DeepSpeed: cpu or nvme", choices=("cpu", "nvme"),
           refused=DEEPSPEED),
    Option("offload_optimizer_nvme_path", str, None, "DeepSpeed: the NVMe path", refused=DEEPSPEED),
    Option("offload_param_device", str, None, "DeepSpeed: cpu or nvme", choices=("cpu", "nvme"), refused=DEEPSPEED),
    Option("offload_param_nvme_path", str, None, "DeepSpeed: the NVMe path", refused=DEEPSPEED),
    Option("zero3_init_flag", SWITCH, False, "DeepSpeed ZeRO-3 init", refused=DEEPSPEED),
    Option("zero3_save_16bit_model", SWITCH, False, "DeepSpeed ZeRO-3 16-bit save", refused=DEEPSPEED),
    Option("fp16_master_weights_and_gradients", SWITCH, False, "DeepSpeed fp16 master weights", refused=DEEPSPEED),
)

OUTPUT = group(
    "output",
    Option("output_dir", str, "output", "where the files go"),
    Option("progress_file", str, None, "where the run appends its progress as JSON lines, one event a line: start, "
           "step, sample, validation, checkpoint, end (default: <output_dir>/<output_name>.progress.jsonl; "
           "docs/training.md)", kohya=False),
    Option("output_name", str, "lora", "the files' name"),
    Option("overwrite", SWITCH, False, "replace files of another run that --output_dir holds under this "
           "--output_name (refused without it)", kohya=False),
    Option("save_model_as", str, "safetensors", "the file format", choices=("safetensors",)),
    Option("save_precision", str, None, "float, fp16 or bf16 (default: fp32)", choices=("float", "fp16", "bf16")),
    Option("save_every_n_epochs", int, None, "a file every N epochs"),
    Option("save_every_n_steps", int, None, "a file every N steps"),
    Option("save_n_epoch_ratio", int, None, "about N epoch files over the run (overrides --save_every_n_epochs)"),
    Option("save_last_n_epochs", int, None, "keep only the last N epoch files"),
    Option("save_last_n_epochs_state", int, None, "keep only the last N epoch states (default: as the files)"),
    Option("save_last_n_steps", int, None, "keep only the step files of the last N steps"),
    Option("save_last_n_steps_state", int, None, "keep only the step states of the last N steps (default: as the "
           "files)"),
    Option("save_state", SWITCH, False, "also save optimizer/RNG state with each file", gui=("save_as_bool",)),
    Option("save_state_on_train_end", SWITCH, False, "save the state with the final file"),
    Option("resume", str, None, "a <name>-...-state folder written by --save_state"),
    Option("no_metadata", SWITCH, False, "write no ss_* training record into the files (only the network's keys)"),
    Option("training_comment", str, None, "free text stored in the files", metadata=True),
    *[Option(f"metadata_{key}", str, None, f"the file's modelspec.{key}") for key in (
        "title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
        "trigger_phrase", "preprocessor", "is_negative_embedding")],
    *[Option(name, SWITCH if kind is SWITCH else str, False if kind is SWITCH else None, "Hugging Face upload",
             refused=NO_NETWORK) for name, kind in (
        ("huggingface_repo_id", str), ("huggingface_repo_type", str), ("huggingface_path_in_repo", str),
        ("huggingface_token", str), ("huggingface_repo_visibility", str), ("save_state_to_huggingface", SWITCH),
        ("resume_from_huggingface", SWITCH), ("async_upload", SWITCH))],
)

LOGGING = group(
    "logging and samples",
    Option("logging_dir", str, None, "where the logs go (TensorBoard by default)"),
    Option("log_with", str, None, "tensorboard, wandb or all (default: tensorboard when --logging_dir is given); "
           "wandb runs offline without a network", choices=("tensorboard", "wandb", "all")),
    Option("log_prefix", str, "", "prefix of the run's log folder and names"),
    Option("log_tracker_name", str, None, "the tracker's project name (default: lora_diffusion)"),
    Option("log_tracker_config", str, None, "a TOML of tracker settings (wandb's init keywords under [wandb])"),
    Option("log_config", SWITCH, False, "log the run's flags to the tracker (ours always do)"),
    Option("wandb_run_name", str, None, "wandb's run name"),
    Option("wandb_api_key", str, None, "wandb's key (offline runs need none)"),
    Option("sample_prompts", str, None, "a file of prompts, one a line, options --n --w --h --d --l --s (a kohya_ss "
           "GUI file may hold the prompts themselves)"),
    Option("sample_every_n_epochs", int, None, "samples every N epochs"),
    Option("sample_every_n_steps", int, None, "samples every N steps"),
    Option("sample_at_first", SWITCH, False, "samples before the first step too"),
    Option("sample_sampler", str, "ddim", "the sampler of the samples"),
    Option("debug_dataset", SWITCH, False, "print the first samples' captions, buckets, crops and masks and exit "
           "(no window; kohya shows them)"),
)

VALIDATION = group(
    "validation",
    Option("validation_split", float, None, "hold out this share of the training images (e.g. 0.1) for a "
           "validation loss at fixed timesteps and noise"),
    Option("validation_data_dir", str, None, "validation images instead, in the train_data_dir layout", kohya=False),
    Option("validation_every_n_epochs", int, 1, "validate every N epochs", kohya=False),
    Option("validate_every_n_epochs", int, None, "kohya's name of --validation_every_n_epochs",
           dest="validation_every_n_epochs"),
    Option("validate_every_n_steps", int, None, "validate every N steps too (the loss and metrics of the epoch's "
           "validation, logged at that step)"),
    Option("max_validation_steps", int, None, "at most this many validation batches: the validation loss over the "
           "first N held-out images (one image a batch)"),
    Option("validation_seed", int, None, "the fixed noise's seed (default: --seed)"),
    Option("validation_prompts", str, None, "also score generated images: world:star, world:held-out, world:seen, "
           "or a prompts file (as lora-diffusion evaluate)", kohya=False),
    Option("validation_metrics", str, "judge", "of the generated images: judge,fid,kid", kohya=False),
    Option("validation_seeds", int, 2, "images per validation prompt", kohya=False),
)


def trainer_options() -> list[Option]:
    """Every option, in the order of --help; the dataset's own come in the data group."""
    ours = CONFIG + MODEL + DATA + NETWORK + PIVOTAL + EDLORA + OPTIMIZER + TRAINING + DISTRIBUTED + OUTPUT + \
        LOGGING + VALIDATION
    names = {o.name for o in ours}
    dataset = [o for o in group(DATA[0].group, *_dataset_options()) if o.name not in names]
    at = max(i for i, o in enumerate(ours) if o.group == DATA[0].group) + 1
    return ours[:at] + dataset + ours[at:]
