"""kohya's --cpu_offload_checkpointing: with gradient checkpointing, what the U-Net's backward needs from its
forward (each checkpointed block's inputs, and the few tensors saved between blocks) waits in CPU memory, pinned on
CUDA, and comes back for the backward; the blocks' activations are recomputed as gradient checkpointing does. It
trades PCIe transfers for the activation memory that checkpointing still keeps (large for SDXL at 1024 px)."""

import functools

import torch
from torch import nn


def offload_saved_tensors(module: nn.Module, *, pin_memory: bool | None = None) -> nn.Module:
    """Each call of `module` saves its tensors for the backward in CPU memory (torch.autograd.graph.save_on_cpu).
    pin_memory: default, when the module is on CUDA (page-locked memory makes the copies asynchronous); call it
    after the module is on its device."""
    if getattr(module, "_offloads_saved_tensors", False):
        return module
    forward = module.forward
    on_cuda = any(p.device.type == "cuda" for p in module.parameters())
    pin = on_cuda if pin_memory is None else pin_memory

    @functools.wraps(forward)
    def offloaded(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return forward(*args, **kwargs)

    module.forward = offloaded
    module._offloads_saved_tensors = True
    return module
