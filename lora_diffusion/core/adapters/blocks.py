"""kohya networks.lora's block-wise options: which U-Net block a module is in, per-block rank/alpha (`block_dims`,
`block_alphas`, `conv_block_dims`, `conv_block_alphas`) and per-block learning-rate weights (`down_lr_weight`,
`mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`), parsed from kohya's `--network_args` strings as kohya
parses them (or given as lists).

Blocks follow the original SD U-Net's layout. SD1.x/2.x: 25 blocks, 0-11 down (IN00-IN11; 0 is conv_in, which
networks.lora never targets), 12 the middle, 13-24 up (OUT00-OUT11). SDXL: 23 blocks, 0 the time/label embedding,
1-9 input_blocks 0-8, 10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 the output (0 and 22 have no LoRA).
"""

import math
import re
import warnings

SD_DOWN_BLOCKS, SD_MID_BLOCKS = 12, 1  # kohya's NUM_OF_BLOCKS, NUM_OF_MID_BLOCKS
SDXL_DOWN_BLOCKS, SDXL_MID_BLOCKS = 9, 3  # kohya's SDXL_NUM_OF_BLOCKS, SDXL_NUM_OF_MID_BLOCKS
_SD_UPDOWN = re.compile(r"^lora_unet_(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")


def block_count(sdxl: bool) -> int:
    return 1 + 2 * SDXL_DOWN_BLOCKS + SDXL_MID_BLOCKS + 1 if sdxl else 2 * SD_DOWN_BLOCKS + SD_MID_BLOCKS


def block_index(name: str, sdxl: bool) -> int | None:
    """The block of a U-Net module by its kohya name (kohya's get_block_index); None outside the blocks (text
    encoders, LyCORIS' conv_in/time_embedding, which networks.lora never targets)."""
    if sdxl:
        m = re.match(r"^lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name)
        if m:
            return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]] + int(m[2])
        return 0 if re.match(r"^lora_unet_(time_embed|label_emb)_", name) else None
    if name.startswith("lora_unet_mid_block_"):
        return SD_DOWN_BLOCKS
    m = _SD_UPDOWN.match(name)
    if not m:
        return None
    # three places per diffusers block: its resnets / attentions j = 0, 1(, 2), its sampler in the last one
    within = 3 * int(m[2]) + (2 if m[3].endswith("samplers") else int(m[4]))
    return 1 + within if m[1] == "down" else SD_DOWN_BLOCKS + 1 + within


def parse_block_values(value, option: str, sdxl: bool, kind=int) -> list | None:
    """`block_dims`-style values: kohya's "2,4,4,..." string or a list, exactly one per block."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        values = [kind(float(v)) if kind is int and float(v) == int(float(v)) else kind(v) for v in items]
    except (TypeError, ValueError):
        values = None
    count = block_count(sdxl)
    if values is None or len(values) != count or any(v < 0 or not math.isfinite(v) for v in values):
        layout = "SDXL: 1 + 9 input + 3 middle + 9 output + 1" if sdxl else "SD1.x/2.x: 12 down + 1 middle + 12 up"
        raise ValueError(f"{option}={value!r}: expected {count} {'whole numbers' if kind is int else 'numbers'} >= 0, "
                         f"one per U-Net block ({layout}), as a comma-separated string or a list")
    return values


def parse_lr_weights(down=None, mid=None, up=None, zero_threshold: float = 0.0, *,
                     sdxl: bool = False) -> list[float] | None:
    """The learning-rate weight of every block (kohya's parse_block_lr_kwargs + get_block_lr_weight), or None when
    no weight is given. `down`/`up`: "1,1,0.5,..." (an empty item is 0), a preset "cosine", "sine", "linear",
    "reverse_linear", "zeros" with an optional "+<base>" added ("sine+.5"), or a list; `mid`: "0.5" or a list.
    Short lists are filled with 1 and long ones cut (with a warning, as kohya). Given weights at or under
    `zero_threshold` become 0: those blocks get no module at all."""
    if down is None and mid is None and up is None:
        return None
    per_side = SDXL_DOWN_BLOCKS if sdxl else SD_DOWN_BLOCKS
    per_mid = SDXL_MID_BLOCKS if sdxl else SD_MID_BLOCKS
    sides = []
    for option, value, length in (("down_lr_weight", down, per_side), ("mid_lr_weight", mid, per_mid),
                                  ("up_lr_weight", up, per_side)):
        if value is None:
            sides.append([1.0] * length)  # kohya applies no threshold to the defaults
            continue
        weights = _weights(value, option, length, preset=option != "mid_lr_weight")
        if len(weights) != length:
            warnings.warn(f"{option} has {len(weights)} values, {length} blocks take one: "
                          f"{'the rest are cut' if len(weights) > length else 'the missing ones are 1'} (as kohya)",
                          stacklevel=3)
            weights = (weights + [1.0] * length)[:length]
        sides.append([w if w > zero_threshold else 0.0 for w in weights])
    weights = sides[0] + sides[1] + sides[2]
    return [1.0] + weights + [1.0] if sdxl else weights


def _weights(value, option: str, length: int, *, preset: bool) -> list[float]:
    if not isinstance(value, str):
        return [float(v) for v in value]
    if "," in value or not preset:
        try:
            return [float(v) if v.strip() else 0.0 for v in value.split(",")]
        except ValueError:
            raise ValueError(f"{option}={value!r}: expected comma-separated numbers") from None
    name, _, base = value.partition("+")
    try:
        base = float(base) if base else 0.0
    except ValueError:
        base = None
    if name not in LR_WEIGHT_PRESETS or base is None:
        raise ValueError(f"{option}={value!r}: expected comma-separated numbers (one per block, e.g. 1,1,0.5) or "
                         f"one of {', '.join(LR_WEIGHT_PRESETS)} with an optional +<number> (e.g. sine+.5)")
    steps = [i / (length - 1) for i in range(length)]
    curve = {"sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps, "zeros": [0.0] * length}
    curve["cosine"] = curve["sine"][::-1]
    curve["reverse_linear"] = steps[::-1]
    return [w + base for w in curve[name]]


def block_ranks(sdxl: bool, rank: int, alpha: float, conv_rank: int | None, conv_alpha: float | None, *,
                block_dims=None, block_alphas=None, conv_block_dims=None, conv_block_alphas=None,
                lr_weights: list[float] | None = None):
    """(dims, alphas, conv_dims, conv_alphas) per block as kohya's get_block_dims_and_alphas and
    remove_block_dims_and_alphas make them: unset lists are the network's rank/alpha (conv: conv_rank/conv_alpha,
    or none without conv_rank), and a block whose lr weight is 0 gets rank 0 (no module)."""
    count = block_count(sdxl)
    dims = parse_block_values(block_dims, "block_dims", sdxl) or [rank] * count
    alphas = parse_block_values(block_alphas, "block_alphas", sdxl, float) or [alpha] * count
    conv_dims = parse_block_values(conv_block_dims, "conv_block_dims", sdxl)
    conv_alphas = parse_block_values(conv_block_alphas, "conv_block_alphas", sdxl, float)
    if conv_alphas is not None and conv_dims is None:
        raise ValueError("conv_block_alphas needs conv_block_dims (kohya ignores it without them)")
    if conv_dims is None and conv_rank:
        conv_dims, conv_alphas = [conv_rank] * count, [conv_alpha] * count
    elif conv_dims is not None and conv_alphas is None:
        conv_alphas = [conv_alpha if conv_alpha is not None else 1.0] * count  # kohya's default, 1.0
    for i, weight in enumerate(lr_weights or []):
        if weight == 0:
            dims[i] = 0
            if conv_dims is not None:
                conv_dims[i] = 0
    return dims, alphas, conv_dims, conv_alphas
