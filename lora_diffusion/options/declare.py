"""An option of the trainer as data: one declaration gives its flag, its TOML key, its kohya_ss GUI keys, its
kohya `ss_*` metadata key, its help and its row in docs/guide.md's table."""

from dataclasses import dataclass
from typing import Any, Callable

SWITCH = bool  # type=SWITCH: a --flag without a value (store_true)


@dataclass(frozen=True)
class Option:
    name: str  # the flag without its dashes, the TOML key, the Namespace attribute
    type: Callable | None = str  # int, float, str, SWITCH, or a parsing function
    default: Any = None
    help: str = ""
    nargs: str | None = None  # "*" or "+" for lists
    choices: tuple | None = None
    group: str = ""  # filled in by group()
    metadata: bool = False  # written to every LoRA file as kohya's ss_<name> (str(value))
    gui: tuple = ()  # kohya_ss GUI keys that mean this option under another name
    kohya: bool = True  # one of kohya sd-scripts' (sdxl_)train_network.py flags
    refused: str | None = None  # why a value other than the default cannot run here (checked before any work)
    dest: str | None = None  # another option this flag sets (--no_cache_latents sets cache_latents)
    const: Any = None  # with dest: the value it sets
    aliases: tuple = ()  # more spellings of the flag (kohya's --caption_extention)
    dataset: bool = False  # also a dataset option (lora_diffusion.data.subset.Subset's field of the same name)

    @property
    def switch(self) -> bool:
        return self.type is SWITCH

    @property
    def attribute(self) -> str:
        return self.dest or self.name


def group(title: str, *options: Option) -> list[Option]:
    from dataclasses import replace

    return [replace(option, group=title) for option in options]
