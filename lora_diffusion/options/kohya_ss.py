"""A kohya_ss GUI config (the .json its "Save" and its presets write) as trainer flags, with the GUI's own rules:
0 and "" mean unset, the attention is a choice string, `LoRA_type` picks the network module and its
--network_args, optimizer/scheduler/network args are split on spaces with their quotes dropped, `sample_prompts`
holds the prompts themselves, `lr_warmup` is a percentage, and the learning rates decide which parts train.

A key that only drives the interface is ignored quietly; any other key this trainer has no use for is named in
a warning when it is set (never dropped without a word); a model family this trainer has not (FLUX, SD3, ...)
stops at once with one line."""

from pathlib import Path

from lora_diffusion.formats.io import atomic_write

# The GUI's keys under another name.
RENAMES = {"epoch": "max_train_epochs", "max_resolution": "resolution", "optimizer": "optimizer_type",
           "lora_network_weights": "network_weights", "save_as_bool": "save_state"}
# Keys of the interface, the launcher, or read by the network_args below: no flag of their own.
INTERFACE = {
    "LoRA_type", "LyCORIS_preset", "model_list", "num_cpu_threads_per_process", "use_wandb", "sdxl", "unit",
    "num_processes", "num_machines", "multi_gpu", "gpu_ids", "main_process_port", "extra_accelerate_launch_args",
    "noise_offset_type", "lowvram", "conv_dim", "conv_alpha", "conv_dims", "conv_alphas", "factor", "use_cp",
    "use_tucker", "use_scalar", "rank_dropout_scale", "constrain", "rescaled", "train_norm", "train_on_input",
    "bypass_mode", "dora_wd", "decompose_both", "rank_dropout", "module_dropout", "block_dims", "block_alphas",
    "conv_block_dims", "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
    "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
    "sdxl_cache_text_encoder_outputs", "sdxl_no_half_vae", "lr_warmup", "additional_parameters", "xformers",
    "save_model_as", "stop_text_encoder_training_pct", "flux1_checkbox", "sd3_checkbox", "train_inpainting",
}
# Keys the GUI writes only for FLUX / SD3 / other families (ignored unless that family is chosen).
OTHER_FAMILIES = {
    "ae", "apply_t5_attn_mask", "clip_l", "clip_g", "t5xxl", "t5xxl_max_token_length", "discrete_flow_shift",
    "guidance_scale", "model_prediction_type", "timestep_sampling", "split_mode", "flux1_cache_text_encoder_outputs",
    "flux1_cache_text_encoder_outputs_to_disk", "mem_eff_save", "train_blocks", "blocks_to_swap",
    "single_blocks_to_swap", "double_blocks_to_swap", "cpu_offload_checkpointing", "fp8_base_unet",
}
FAMILIES = {"Flux1": "FLUX.1", "Flux1 OFT": "FLUX.1", "HunyuanImage-2.1": "HunyuanImage 2.1", "Anima": "Anima",
            "Lumina": "Lumina", "LoRA-FA": "LoRA-FA (kohya's networks.lora_fa)"}
# Keys whose 0 means "unset" in the GUI (it leaves them out of the command line).
ZERO_UNSET = {
    "clip_skip", "ip_noise_gamma", "max_timestep", "min_timestep", "max_train_epochs", "max_train_steps",
    "min_snr_gamma", "sample_every_n_epochs", "sample_every_n_steps", "save_every_n_epochs", "save_every_n_steps",
    "save_last_n_steps", "save_last_n_steps_state", "save_last_n_epochs", "save_last_n_epochs_state", "seed",
    "v_pred_like_loss", "vae_batch_size", "unet_lr", "stop_text_encoder_training", "adaptive_noise_scale",
    "noise_offset", "multires_noise_iterations", "scale_weight_norms", "text_encoder_lr", "lr_scheduler_num_cycles",
}
NUMBERS = ("conv_dim", "conv_alpha", "factor", "unit", "network_dim", "network_alpha", "rank_dropout", "module_dropout",
           "constrain", "lr_warmup", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# LoRA_type -> (network_module, the GUI keys that become --network_args, the algo).
_LYCORIS_COMMON = ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "rank_dropout_scale", "train_norm")
NETWORKS = {
    "Standard": ("networks.lora", (), None),
    "Kohya LoCon": ("networks.lora", ("conv_dim", "conv_alpha"), None),
    "LoCon": ("lycoris.kohya", _LYCORIS_COMMON + ("use_tucker", "use_scalar", "dora_wd", "bypass_mode"), "locon"),
    "LyCORIS/LoCon": ("lycoris.kohya", _LYCORIS_COMMON + ("use_tucker", "use_scalar", "dora_wd", "bypass_mode"),
                      "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", _LYCORIS_COMMON + ("use_tucker", "use_scalar", "dora_wd", "bypass_mode"),
                     "loha"),
    "LyCORIS/LoKr": ("lycoris.kohya", _LYCORIS_COMMON + ("use_tucker", "use_scalar", "dora_wd", "bypass_mode",
                                                         "factor", "use_cp", "decompose_both"), "lokr"),
    "LyCORIS/iA3": ("lycoris.kohya", ("conv_dim", "conv_alpha", "train_on_input"), "ia3"),
    "LyCORIS/GLoRA": ("lycoris.kohya", _LYCORIS_COMMON + ("use_tucker",), "glora"),
    "LyCORIS/DyLoRA": ("lycoris.kohya", ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout",
                                         "train_norm", "unit"), "dylora"),
    "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", ("rank_dropout", "module_dropout", "rank_dropout_scale",
                                                     "train_norm"), "full"),
    "LyCORIS/BOFT": ("lycoris.kohya", _LYCORIS_COMMON + ("use_tucker",), "boft"),
    "LyCORIS/Diag-OFT": ("lycoris.kohya", _LYCORIS_COMMON + ("use_tucker", "constrain", "rescaled"), "diag-oft"),
    "Kohya DyLoRA": ("networks.dylora", ("conv_dim", "conv_alpha", "unit"), None),
    "Kohya LoHa": ("lycoris.kohya", ("conv_dim", "conv_alpha"), "loha"),
    "Kohya LoKr": ("lycoris.kohya", ("conv_dim", "conv_alpha", "factor"), "lokr"),
}
# kohya's networks.lora keys the GUI passes through for Standard / Kohya LoCon / Kohya DyLoRA when set.
_KOHYA_BLOCK_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                     "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
# GUI key -> the network_args key it becomes
_ARG_NAMES = {"unit": "unit", "constrain": "constraint"}


class GuiConfigError(ValueError):
    pass


def unset(value) -> bool:
    return value is None or value == "" or (not isinstance(value, bool) and _number(value) == 0)


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _words(value) -> list[str]:
    """The GUI's way with args fields: quotes dropped, split on whitespace."""
    if isinstance(value, list):
        value = " ".join(map(str, value))
    return str(value).replace('"', "").replace("'", "").split()


def gui_flags(document: dict, path: Path, flag_names) -> tuple[dict, list[str], str]:
    """(flag values, names of set keys with no use here, the additional_parameters text) of a GUI config."""
    def bad(message):
        raise GuiConfigError(f"--config_file {path}: {message}")

    lora_type = document.get("LoRA_type") or "Standard"
    if lora_type in FAMILIES or document.get("flux1_checkbox") or document.get("sd3_checkbox"):
        family = FAMILIES.get(lora_type, "FLUX.1" if document.get("flux1_checkbox") else "SD3")
        bad(f"LoRA_type {lora_type!r} is a {family} LoRA; this trainer trains Stable Diffusion 1.x, 2.x and SDXL")
    if lora_type not in NETWORKS:
        bad(f"LoRA_type {lora_type!r} is not known; expected one of {', '.join(NETWORKS)}")
    for key in NUMBERS:  # the GUI's number fields, whichever LoRA_type reads them
        if not unset(document.get(key)) and _number(document[key]) is None:
            bad(f"{key} = {document[key]!r}; expected a number")
    values, unused = {}, []
    for key, value in document.items():
        name = RENAMES.get(key, key)
        if key in INTERFACE or (key in OTHER_FAMILIES and name not in flag_names):
            continue
        if value is None or value == "" or value == [] or (name in ZERO_UNSET and unset(value)):
            continue
        if name not in flag_names:
            if value is not False and not unset(value):
                unused.append(key)
            continue
        values[name] = value
    values.update(_attention(document.get("xformers"), bad))
    values.update(_network(document, lora_type))
    for key in ("optimizer_args", "lr_scheduler_args"):
        if key in values:
            values[key] = _words(values[key])
    if isinstance(values.get("resolution"), str):
        values["resolution"] = values["resolution"].replace(" ", "")
    if values.get("persistent_data_loader_workers") is not None:
        values["persistent_data_loader_workers"] = bool(_number(values["persistent_data_loader_workers"]))
    _noise(document, values)
    _learning_rates(document, values)
    if not unset(document.get("lr_warmup")):  # a percentage of the steps
        warmup = _number(document["lr_warmup"])
        if warmup is None:
            bad(f"lr_warmup = {document['lr_warmup']!r}; expected a percentage")
        values["lr_warmup_steps"] = warmup / 100
    if document.get("sdxl"):
        if document.get("sdxl_no_half_vae"):
            values["no_half_vae"] = True
        if document.get("sdxl_cache_text_encoder_outputs"):
            values["cache_text_encoder_outputs"] = True
    if values.get("sample_prompts"):
        values["sample_prompts"] = _prompt_file(values["sample_prompts"], values.get("output_dir", "output"), path)
    return values, unused, document.get("additional_parameters") or ""


def _attention(choice, bad) -> dict:
    if choice in (None, "", False, "none", "None"):
        return {}
    if choice is True or choice == "xformers":
        return {"xformers": True}
    if choice == "sdpa":
        return {"sdpa": True}
    bad(f"xformers = {choice!r}; expected xformers, sdpa or none")


def _network(document: dict, lora_type: str) -> dict:
    """network_module and the --network_args the GUI builds for this LoRA_type."""
    module, keys, algo = NETWORKS[lora_type]
    args = []
    if module == "lycoris.kohya":
        args.append(f"preset={document.get('LyCORIS_preset') or 'full'}")
    for key in keys:
        value = document.get(key)
        if value is None or value == "":
            continue
        if key in ("conv_dim", "conv_alpha") and module != "lycoris.kohya" and unset(value):
            continue
        args.append(f"{_ARG_NAMES.get(key, key)}={value}")
    if module != "lycoris.kohya" or lora_type.startswith("Kohya"):
        args += [f"{key}={document[key]}" for key in _KOHYA_BLOCK_KEYS
                 if key not in keys and not unset(document.get(key))]
    args += [f"{key}={document[key]}" for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                                  "loraplus_text_encoder_lr_ratio") if not unset(document.get(key))]
    if algo:
        args.append(f"algo={algo}")
    return {"network_module": module, "network_args": _words(" ".join(args))}


def _noise(document: dict, values: dict):
    """noise_offset_type picks the offset (Original, with adaptive_noise_scale) or multires noise."""
    kind = document.get("noise_offset_type") or "Original"
    dropped = ("multires_noise_iterations", "multires_noise_discount") if kind == "Original" else \
        ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength")
    for key in dropped:
        values.pop(key, None)


def _learning_rates(document: dict, values: dict):
    """As the GUI: a text-encoder lr of 0 with a U-Net lr trains the U-Net only, and the reverse."""
    te, unet = _number(document.get("text_encoder_lr")) or 0.0, _number(document.get("unet_lr")) or 0.0
    if te == 0 and unet > 0:
        values["network_train_unet_only"] = True
    elif unet == 0 and te > 0:
        values["network_train_text_encoder_only"] = True


def _prompt_file(text, output_dir, path: Path) -> str:
    """The GUI's sample_prompts is the prompts themselves: written to <output_dir>/sample/prompt.txt, as the GUI
    does. A value that names an existing file is used as it is (a TOML-style path)."""
    text = str(text)
    if "\n" not in text and Path(text).expanduser().is_file():
        return text
    target = Path(output_dir) / "sample" / "prompt.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda f: f.write(text.rstrip("\n") + "\n"), mode="w")
    return str(target)
