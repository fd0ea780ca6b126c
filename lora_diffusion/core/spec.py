"""NetworkSpec: what create_network makes, as one object (kohya's --network_dim/--network_alpha/--network_args).

A field that kohya records in a file's `ss_network_args` declares its key there (`arg`); the order of the fields is
the order of that record. `resolved()` checks what can be checked without a model and fills the defaults that
kohya and LyCORIS derive (alpha 0 -> rank, LyCORIS' convs at the network's rank); `network_args()` is the record.
"""

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace

from . import adapters
from .adapters import DoRA, LoRALayer
from .adapters.lokr import check_factor

# Options only LyCORIS' algorithms take (with algo=), beside dora_wd and train_norm.
LYCORIS_OPTIONS = ("use_tucker", "factor", "decompose_both", "full_matrix", "train_on_input", "use_scalar",
                   "rank_dropout_scale", "bypass_mode")
BLOCK_OPTIONS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                 "mid_lr_weight", "up_lr_weight")
LORAPLUS_OPTIONS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def _recorded(key=None, default=None):
    """A field recorded in ss_network_args under `key` (default: its own name) when it is set."""
    return field(default=default, metadata={"arg": key or True})


@dataclass(frozen=True)
class NetworkSpec:
    """The options of create_network; its docstring says what each does."""

    rank: int = 4
    alpha: float = 1.0
    conv_rank: int | None = None
    conv_alpha: float | None = None
    algo: str | None = None
    multiplier: float = 1.0
    dropout: float = 0.0
    include: list[str] | None = None
    exclude: list[str] | None = None
    train_unet: bool = True
    train_text_encoder: bool = True
    # recorded in ss_network_args, in this order (after algo, conv_dim and conv_alpha)
    rank_dropout: float = _recorded(default=0.0)
    module_dropout: float = _recorded(default=0.0)
    dora_wd: bool = _recorded(default=False)
    use_tucker: bool = _recorded(default=False)
    factor: int = _recorded(default=-1)
    decompose_both: bool = _recorded(default=False)
    full_matrix: bool = _recorded(default=False)
    train_on_input: bool = _recorded(default=False)
    block_size: int | None = _recorded()
    dylora_unit: int | None = _recorded("unit")
    train_norm: bool = _recorded(default=False)
    use_scalar: bool = _recorded(default=False)
    rank_dropout_scale: bool = _recorded(default=False)
    bypass_mode: bool = _recorded(default=False)
    wd_on_output: bool = _recorded(default=True)
    block_dims: object = _recorded()
    block_alphas: object = _recorded()
    conv_block_dims: object = _recorded()
    conv_block_alphas: object = _recorded()
    down_lr_weight: object = _recorded()
    mid_lr_weight: object = _recorded()
    up_lr_weight: object = _recorded()
    block_lr_zero_threshold: float = _recorded(default=0.0)
    loraplus_lr_ratio: float | None = _recorded()
    loraplus_unet_lr_ratio: float | None = _recorded()
    loraplus_text_encoder_lr_ratio: float | None = _recorded()

    @classmethod
    def of(cls, **options) -> "NetworkSpec":
        """A spec from create_network's keywords; an unknown one is named with the nearest option."""
        names = [f.name for f in fields(cls)]
        for key in options:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                raise TypeError(f"create_network got an unknown option {key!r}"
                                + (f" (did you mean {near[0]!r}?)" if near else ""))
        return cls(**options)

    @property
    def lycoris(self) -> bool:
        return self.algo is not None

    @property
    def blockwise(self) -> bool:
        return any(getattr(self, key) is not None for key in BLOCK_OPTIONS)

    @property
    def network_module(self) -> str:
        """The file's ss_network_module."""
        return "lycoris.kohya" if self.lycoris else "networks.dylora" if self.dylora_unit is not None else \
            "networks.lora"

    @property
    def layer_class(self) -> type[adapters.AdapterLayer]:
        if self.lycoris:
            return adapters.algorithm(self.algo)
        return adapters.DyLoRALayer if self.dylora_unit is not None else LoRALayer

    @property
    def variant(self) -> DoRA | None:
        """The layers' variant: DoRA with dora_wd (its magnitude per input column with wd_on_output=False)."""
        return DoRA(on_input=not self.wd_on_output) if self.dora_wd else None

    def layer_options(self) -> dict:
        """The options the layer class declares (OPTIONS), from this spec."""
        options = dict(dropout=self.dropout, use_tucker=self.use_tucker, factor=self.factor,
                       decompose_both=self.decompose_both, full_matrix=self.full_matrix,
                       train_on_input=self.train_on_input, use_scalar=self.use_scalar,
                       rank_dropout_scale=self.rank_dropout_scale, bypass_mode=self.bypass_mode,
                       block_size=self.dylora_unit if self.dylora_unit is not None else self.block_size or 4)
        return {key: options[key] for key in self.layer_class.OPTIONS}

    def loraplus_ratios(self) -> dict[str, float]:
        """{"unet": ..., "text_encoder": ...} as kohya resolves them (a part's own ratio, else the shared one)."""
        ratio = self.loraplus_lr_ratio
        ratios = {"unet": self.loraplus_unet_lr_ratio or ratio, "text_encoder": self.loraplus_text_encoder_lr_ratio
                  or ratio}
        return {part: float(r) for part, r in ratios.items() if r is not None}

    def resolved(self) -> "NetworkSpec":
        """This spec checked and with kohya's/LyCORIS' derived defaults; raises ValueError naming the option."""
        for option in LORAPLUS_OPTIONS:
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                                      not math.isfinite(value) or value <= 0):
                raise ValueError(f"{option}={value!r}: expected a number > 0 (the lora_up weights' lr is lr x ratio; "
                                 f"the LoRA+ paper suggests 16)")
        if self.blockwise and (self.lycoris or self.dylora_unit is not None):
            given = ", ".join(key for key in BLOCK_OPTIONS if getattr(self, key) is not None)
            raise ValueError(f"{given}: kohya networks.lora's block-wise options; LyCORIS (algo=) and networks.dylora "
                             f"have none")
        if self.dylora_unit is not None and self.lycoris:
            raise ValueError("dylora_unit is kohya's networks.dylora; with LyCORIS use algo='dylora', block_size=")
        spec = self
        if self.lycoris:
            adapters.algorithm(self.algo)  # an unknown algo= is named before anything else is made
            spec = replace(self, algo=str(self.algo).lower(), conv_rank=self.conv_rank or self.rank,
                           conv_alpha=self.conv_alpha or self.alpha, factor=check_factor(self.factor))
            if not spec.wd_on_output and not spec.dora_wd:
                raise ValueError("wd_on_output=False is DoRA's option (the axis of its magnitude): pass dora_wd=True "
                                 "too")
        else:
            if self.block_size is not None:
                raise ValueError("block_size is LyCORIS' DyLoRA option (algo='dylora'); kohya's networks.dylora `unit` "
                                 "is dylora_unit=")
            given = [key for key in ("dora_wd", "train_norm", *LYCORIS_OPTIONS)
                     if getattr(self, key) not in (False, -1)]
            given += [] if self.wd_on_output else ["wd_on_output"]
            if given:
                raise ValueError(f"{', '.join(given)}: LyCORIS options; pass algo= (network_module lycoris.kohya), "
                                 f"e.g. algo='lora' or algo='{'ia3' if 'train_on_input' in given else 'lokr'}'")
        alpha = spec.alpha or spec.rank  # kohya: an alpha of 0 (or none) means alpha = rank, i.e. scale 1
        return replace(spec, alpha=alpha, conv_alpha=spec.conv_alpha or spec.conv_rank)

    def network_args(self, *, block_lr_weights=None) -> dict:
        """kohya's record of the options (ss_network_args) of a resolved spec; `block_lr_weights`: the parsed
        down/mid/up lr weights (block_lr_zero_threshold is recorded only beside them)."""
        args = {"algo": self.algo} if self.lycoris else {}
        if self.conv_rank:
            args.update(conv_dim=self.conv_rank, conv_alpha=self.conv_alpha)
        values = asdict(self)
        values.update(factor=None if self.factor == -1 else self.factor,
                      block_size=(self.block_size or 4) if self.algo == "dylora" else None,
                      wd_on_output=None if self.wd_on_output else "False",
                      block_lr_zero_threshold=self.block_lr_zero_threshold if block_lr_weights else None)
        for f in fields(self):
            key, value = f.metadata.get("arg"), values[f.name]
            if key and value:
                args[f.name if key is True else key] = \
                    value if isinstance(value, (str, int, float)) else ",".join(str(v) for v in value)
        return args
