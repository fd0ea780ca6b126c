"""--cpu_offload_checkpointing: a checkpointed U-Net whose saved tensors wait in CPU memory gives the gradients of
one that keeps them, and its saved tensors do pass through the offloading hooks."""

import torch

from lora_diffusion.core.network import create_network
from lora_diffusion.models import build_tiny_models
from lora_diffusion.models.offload import offload_saved_tensors


def lora_grads(offload):
    models = build_tiny_models(seed=0)
    unet = models.unet
    network = create_network(unet, None, rank=4, alpha=4, train_text_encoder=False)
    torch.manual_seed(1)
    for p in network.parameters():  # the up weights start at 0: make every LoRA matrix get a gradient
        p.data.normal_(0, 0.02)
    unet.enable_gradient_checkpointing()
    unet.train()
    if offload:
        offload_saved_tensors(unet, pin_memory=False)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    out = unet(latents, torch.tensor([10, 500]), context).sample
    out.square().mean().backward()
    return {name: p.grad.clone() for name, p in network.named_parameters()}


def test_offloaded_checkpointing_gives_the_same_gradients_and_offloads(monkeypatch):
    packed = []
    original = torch.autograd.graph.save_on_cpu

    class Counting(original):  # torch's own hooks, counted: the packs are what goes to the CPU
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(tensor.shape) or pack(tensor)

    plain = lora_grads(False)
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    offloaded = lora_grads(True)
    assert packed, "no tensor went through the offloading hooks"
    assert plain.keys() == offloaded.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(offloaded[name], plain[name], rtol=0, atol=0, msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_the_trainer_offloads_a_checkpointed_unet_and_trains_the_same_lora(tmp_path, monkeypatch):
    import train_lora
    from tests.test_train import base_flags, make_dataset, read

    data = make_dataset(tmp_path)
    entered = []
    original = torch.autograd.graph.save_on_cpu

    class Counting(original):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    flags = dict(gradient_checkpointing=True, max_train_steps=2)
    assert train_lora.main(base_flags(tmp_path / "plain", data, **flags)) == 0
    assert not entered
    assert train_lora.main(base_flags(tmp_path / "offload", data, cpu_offload_checkpointing=True, **flags)) == 0
    assert entered  # the U-Net's training calls ran inside the offloading hooks
    plain, _ = read(tmp_path / "plain" / "out" / "t.safetensors")
    offloaded, _ = read(tmp_path / "offload" / "out" / "t.safetensors")
    assert all(torch.equal(plain[k], offloaded[k]) for k in plain)
