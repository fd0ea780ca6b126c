"""`--network_args key=value` as data: each key of kohya's networks.lora / networks.dylora and of LyCORIS'
lycoris.kohya, the create_network keyword it becomes and its type. A key whose keyword create_network does not
take (yet) is refused before any work with its name; a key of another module gets a hint."""

import math
from dataclasses import dataclass, fields

from lora_diffusion.core.spec import NetworkSpec


@dataclass(frozen=True)
class NetworkArg:
    key: str
    keyword: str  # a field of NetworkSpec (create_network's options)
    type: type  # int, float, bool, str (kept as given: kohya's block strings)
    modules: tuple  # network modules that read it
    default: object = None  # the value that means "off": accepted even where not implemented


KOHYA = ("networks.lora", "lora_diffusion", "networks.dylora")
LYCORIS = ("lycoris.kohya",)
ALL = KOHYA + LYCORIS

NETWORK_ARGS = {a.key: a for a in [
    NetworkArg("conv_dim", "conv_rank", int, ALL),
    NetworkArg("conv_alpha", "conv_alpha", float, ALL),
    NetworkArg("rank_dropout", "rank_dropout", float, ALL, 0.0),
    NetworkArg("module_dropout", "module_dropout", float, ALL, 0.0),
    # kohya's block-wise ranks and learning rates (networks.lora)
    *[NetworkArg(key, key, str, KOHYA) for key in ("block_dims", "block_alphas", "conv_block_dims",
                                                    "conv_block_alphas", "down_lr_weight", "mid_lr_weight",
                                                    "up_lr_weight")],
    NetworkArg("block_lr_zero_threshold", "block_lr_zero_threshold", float, KOHYA, 0.0),
    NetworkArg("loraplus_lr_ratio", "loraplus_lr_ratio", float, ALL),
    NetworkArg("loraplus_unet_lr_ratio", "loraplus_unet_lr_ratio", float, ALL),
    NetworkArg("loraplus_text_encoder_lr_ratio", "loraplus_text_encoder_lr_ratio", float, ALL),
    NetworkArg("unit", "dylora_unit", int, ("networks.dylora",)),
    # LyCORIS (lycoris.kohya)
    NetworkArg("algo", "algo", str, LYCORIS),
    NetworkArg("preset", "preset", str, LYCORIS, "full"),
    NetworkArg("dora_wd", "dora_wd", bool, LYCORIS, False),
    NetworkArg("wd_on_output", "wd_on_output", bool, LYCORIS, True),  # False: DoRA's magnitude per input (ComfyUI)
    NetworkArg("use_tucker", "use_tucker", bool, LYCORIS, False),
    NetworkArg("use_cp", "use_tucker", bool, LYCORIS, False),
    NetworkArg("factor", "factor", int, LYCORIS, -1),
    NetworkArg("decompose_both", "decompose_both", bool, LYCORIS, False),
    NetworkArg("full_matrix", "full_matrix", bool, LYCORIS, False),
    NetworkArg("use_scalar", "use_scalar", bool, LYCORIS, False),
    NetworkArg("rank_dropout_scale", "rank_dropout_scale", bool, LYCORIS, False),
    NetworkArg("bypass_mode", "bypass_mode", bool, LYCORIS, False),
    NetworkArg("train_norm", "train_norm", bool, LYCORIS, False),
    NetworkArg("train_on_input", "train_on_input", bool, LYCORIS, False),
    NetworkArg("block_size", "block_size", int, LYCORIS),
    NetworkArg("constraint", "constraint", float, LYCORIS, 0.0),
    NetworkArg("rescaled", "rescaled", bool, LYCORIS, False),
]}


class NetworkArgsError(ValueError):
    pass


def _value(item: str, arg: NetworkArg, text: str):
    if arg.type is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise NetworkArgsError(f"--network_args {item!r}: expected True or False")
        return text.lower() in ("true", "1", "yes")
    if arg.type is str:
        return text.lower() if arg.key in ("algo", "preset") else text
    try:
        value = arg.type(float(text)) if arg.type is int and float(text).is_integer() else arg.type(text)
    except ValueError:
        raise NetworkArgsError(f"--network_args {item!r}: {text!r} is not a {arg.type.__name__}") from None
    if arg.key == "factor" and value == -1:
        return value  # LyCORIS' "no limit"
    if not math.isfinite(value) or value < 0:
        raise NetworkArgsError(f"--network_args {item!r}: expected a finite number >= 0")
    return value


def network_keywords(network_module: str, items: list[str], accepted=None) -> dict:
    """create_network keywords of --network_args for this --network_module; `accepted`: the keywords
    create_network takes (default: NetworkSpec's fields)."""
    if accepted is None:
        accepted = {f.name for f in fields(NetworkSpec)}
    lycoris = network_module in LYCORIS
    options = {"algo": "lora"} if lycoris else {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip().strip("\"'")
        arg = NETWORK_ARGS.get(key)
        if not sep or arg is None or network_module not in arg.modules:
            known = sorted(k for k, a in NETWORK_ARGS.items() if network_module in a.modules)
            hint = f" ({key} is an option of --network_module {' or '.join(arg.modules)})" if arg else ""
            raise NetworkArgsError(f"--network_args {item!r}: expected key=value with key in {known}{hint}")
        value = _value(item, arg, text)
        if arg.keyword not in accepted:
            if value == arg.default or (arg.type is not bool and arg.default is None and not value):
                continue  # the off value of an option not built yet
            raise NetworkArgsError(f"--network_args {item!r}: {key} is not implemented yet in this trainer")
        options[arg.keyword] = value
    return options
