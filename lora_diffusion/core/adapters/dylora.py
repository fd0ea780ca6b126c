"""DyLoRA (Valipour et al. 2022): a LoRA trained so that its first k ranks are a good LoRA for every k that is a
multiple of `block_size`, for LyCORIS' algo=dylora (`block_size`) and kohya's networks.dylora (`unit`).

In training, each forward draws b in 1..rank/block_size and uses the first k = b * block_size ranks at scale
alpha / k, with the ranks below the last block detached (one block learns per step, as in LyCORIS and kohya). In
eval and when merged it is the full-rank LoRA, alpha / rank. The parameters and the file are a plain LoRA's
(`lora_down.weight`, `lora_up.weight`, `alpha`), which is what LyCORIS and kohya write for DyLoRA too, so every LoRA
loader reads it, and cutting it to its first k ranks (kohya's extract_lora_from_dylora) gives a rank-k LoRA.

Where this differs from both: LyCORIS 4.1.3 scales by alpha / (number of blocks) rather than alpha / k, and kohya
keeps every rank in the product (only the trainable block moves) at alpha / rank * sqrt(rank / k); both also draw a
random rank in eval. Here eval is deterministic, and the training scale is the one the rank-k cut has.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRALayer


class DyLoRALayer(LoRALayer):
    kind = "dylora"
    label = "DyLoRA"
    file_algo = "lora"  # its files are plain LoRA modules
    detect_keys = ()  # never recognised from a file: a DyLoRA file loads as the LoRA it is
    OPTIONS = ("dropout", "block_size")

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None, *, block_size: int = 4,
                 multiplier: float = 1.0, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, dora_wd: bool = False, dtype: torch.dtype = torch.float32):
        for option, value in (("rank_dropout", rank_dropout), ("dora_wd", dora_wd)):
            if value:
                raise ValueError(f"DyLoRA has no {option} (LyCORIS' and kohya's DyLoRA ignore it); got "
                                 f"{option}={value!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or rank % block_size:
            raise ValueError(f"DyLoRA block_size (kohya: unit) {block_size!r}: expected a whole number >= 1 that "
                             f"divides the rank {rank}")
        super().__init__(base, rank, alpha, multiplier=multiplier, dropout=dropout, module_dropout=module_dropout,
                         dtype=dtype)
        self.block_size = block_size

    def sample_blocks(self) -> int:
        """How many blocks this training step uses, uniform in 1..rank / block_size (torch's generator)."""
        return int(torch.randint(1, self.rank // self.block_size + 1, ()))

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().lora_delta(x)
        k = self.sample_blocks() * self.block_size
        frozen = k - self.block_size
        down, up = self.lora_down.weight[:k], self.lora_up.weight[:, :k]
        down = torch.cat([down[:frozen].detach(), down[frozen:]]).to(x.dtype)
        up = torch.cat([up[:, :frozen].detach(), up[:, frozen:]], dim=1).to(x.dtype)
        if isinstance(self.lora_down, nn.Linear):
            h = F.linear(x, down)
        else:
            h = self.lora_down._conv_forward(x, down, None)
        if self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        h = h * (self.multiplier * self._alpha_value / k)
        return F.linear(h, up) if isinstance(self.lora_up, nn.Linear) else self.lora_up._conv_forward(h, up, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}"
