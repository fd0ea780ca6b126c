"""kohya's `ss_*` training record: the settings of a run, stored as strings in the LoRA file's header.

    metadata = training_metadata(learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, num_train_images=300,
                                 optimizer=describe_optimizer(optimizer, optimizer_args), resolution=(512, 512), ...)
    metadata.update(training_metadata(steps=step, epoch=epoch, training_finished_at=time.time()))  # at each save

Values are converted as kohya writes them (str(value)): floats "0.0001", None "None", bools "True"/"False",
tuples "(512, 512)"; dicts and lists become JSON. Only keys passed are written. The network's own keys
(ss_network_*, ss_output_name, modelspec.*, hashes) belong to lora_diffusion.core.kohya, not here.
"""

import json
import os
import time

from lora_diffusion.options import trainer_options

# Every key a kohya LoRA training record can hold (without the "ss_" prefix), and what it means.
TRAINING_KEYS = {
    "session_id": "random integer shared by the files of one run",
    "training_started_at": "unix time the run started",
    "training_finished_at": "unix time this file was written",
    "training_comment": "free text",
    "sd_model_name": "base model file or folder name",
    "new_sd_model_hash": "sha256 of the base model",
    "vae_name": "VAE file name, if a separate VAE was used",
    "v2": "SD 2.x base",
    "v_parameterization": "v prediction",
    "base_model_version": "sd_v1, sd_v2, sd_v2_v, ...",
    "learning_rate": "--learning_rate",
    "unet_lr": "--unet_lr",
    "text_encoder_lr": "--text_encoder_lr",
    "num_train_images": "training images x repeats",
    "num_reg_images": "regularization images",
    "num_batches_per_epoch": "batches per epoch",
    "num_epochs": "epochs of the run",
    "epoch": "epoch of this file",
    "steps": "optimizer steps of this file",
    "max_train_steps": "total steps of the run",
    "lr_warmup_steps": "--lr_warmup_steps",
    "lr_scheduler": "--lr_scheduler",
    "lr_scheduler_num_cycles": "--lr_scheduler_num_cycles",
    "lr_scheduler_power": "--lr_scheduler_power",
    "optimizer": "optimizer class path and args (see training.optim.describe_optimizer)",
    "max_grad_norm": "--max_grad_norm",
    "mixed_precision": "no, fp16 or bf16",
    "full_fp16": "--full_fp16",
    "gradient_checkpointing": "--gradient_checkpointing",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "batch_size_per_device": "--train_batch_size",
    "total_batch_size": "batch size x processes x accumulation",
    "seed": "--seed",
    "resolution": "training resolution, kohya writes the tuple: (512, 512)",
    "enable_bucket": "--enable_bucket",
    "min_bucket_reso": "--min_bucket_reso",
    "max_bucket_reso": "--max_bucket_reso",
    "bucket_no_upscale": "--bucket_no_upscale",
    "bucket_info": "JSON of the buckets used",
    "cache_latents": "--cache_latents",
    "clip_skip": "--clip_skip",
    "max_token_length": "--max_token_length",
    "noise_offset": "--noise_offset",
    "multires_noise_iterations": "--multires_noise_iterations",
    "multires_noise_discount": "--multires_noise_discount",
    "adaptive_noise_scale": "--adaptive_noise_scale",
    "zero_terminal_snr": "--zero_terminal_snr",
    "min_snr_gamma": "--min_snr_gamma",
    "prior_loss_weight": "--prior_loss_weight",
    "network_dropout": "--network_dropout",
    "scale_weight_norms": "--scale_weight_norms",
    "caption_dropout_rate": "--caption_dropout_rate",
    "caption_dropout_every_n_epochs": "--caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate": "--caption_tag_dropout_rate",
    "keep_tokens": "--keep_tokens",
    "shuffle_caption": "--shuffle_caption",
    "flip_aug": "--flip_aug",
    "color_aug": "--color_aug",
    "random_crop": "--random_crop",
    "face_crop_aug_range": "--face_crop_aug_range",
    "dataset_dirs": 'JSON {folder name: {"n_repeats": n, "img_count": n}}',
    "reg_dataset_dirs": "JSON, same shape, for regularization folders",
    "tag_frequency": "JSON {folder name: {tag: count}}",
    "datasets": "JSON of a dataset-config run's datasets",
    "loss_type": "l1, l2 (MSE), huber or smooth_l1",
    "resize_interpolation": "--resize_interpolation",
}

# Keys another module writes: refuse them here so a file never holds two differing copies.
NETWORK_KEYS = ("network_module", "network_dim", "network_alpha", "network_args", "output_name")


def metadata_value(value):
    """A value as kohya stores it: JSON for dicts/lists, str() for everything else."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def training_metadata(**values):
    """{"ss_<key>": str} for the given values; keys are TRAINING_KEYS names, with or without "ss_"."""
    record = {}
    for key, value in values.items():
        name = key[3:] if key.startswith("ss_") else key
        if name in NETWORK_KEYS:
            raise ValueError(f"training_metadata: ss_{name} is the network's key, written by core.kohya")
        if name not in TRAINING_KEYS:
            raise ValueError(f"training_metadata: unknown key {key!r}; known: {', '.join(TRAINING_KEYS)}")
        record[f"ss_{name}"] = metadata_value(value)
    return record


def run_metadata(args, models, dataset, resolution, batch_size, num_batches, max_train_steps, num_epochs,
                 optimizer_name, session_id, num_processes=1) -> dict:
    """The training record (kohya's ss_* keys) of this run, as plain values: every option declared with
    metadata=True (lora_diffusion.options), then what the run computed."""
    record = {f"ss_{o.name}": getattr(args, o.name) for o in trainer_options() if o.metadata and not o.dest}
    record.update(
        ss_num_train_images=dataset.num_train_images, ss_num_reg_images=dataset.num_reg_images,
        ss_num_batches_per_epoch=num_batches, ss_num_epochs=num_epochs, ss_max_train_steps=max_train_steps,
        ss_optimizer=optimizer_name, ss_resolution=f"({resolution[0]}, {resolution[1]})",
        ss_batch_size_per_device=batch_size,
        ss_total_batch_size=batch_size * num_processes * args.gradient_accumulation_steps,
        ss_dataset_dirs=dataset.dataset_dirs, ss_tag_frequency=dataset.tag_frequency,
        ss_sd_model_name=os.path.basename(str(args.pretrained_model_name_or_path)),
        ss_training_started_at=time.time(), ss_v_parameterization=models.v_parameterization,
        ss_session_id=session_id,
    )
    return record
