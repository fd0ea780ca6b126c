"""The LoRA is part of the model it is injected into: parameters, state_dict, .to, .train/.eval, hooks, DDP,
torch.compile and gradient checkpointing see it, and remove() gives the model back exactly."""

import itertools
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import build_tiny_unet, unet_inputs
from lora_diffusion import create_network, inject_trainable_lora
from lora_diffusion.lora import lora_network, remove_lora


def test_research_flow_sees_the_lora_in_the_model(tiny_unet):
    """cloneofsimo's train_lora_dreambooth.py: freeze, inject, then only the model is handed on."""
    tiny_unet.requires_grad_(False)
    params, names = inject_trainable_lora(tiny_unet, r=4, dropout_p=0.5)
    lora = list(itertools.chain(*params))
    trainable = [p for p in tiny_unet.parameters() if p.requires_grad]
    assert len(trainable) == len(lora) == 2 * 144 and {id(p) for p in trainable} == {id(p) for p in lora}
    named = dict(tiny_unet.named_parameters())
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert {f"{q}.lora.lora_down.weight", f"{q}.lora.lora_up.weight"} <= set(named)
    assert f"{q}.lora.alpha" in tiny_unet.state_dict()

    tiny_unet.to(torch.float64)  # .to() takes the LoRA along
    assert all(p.dtype == torch.float64 for p in lora)
    tiny_unet.to(torch.float32)

    for p in lora:
        p.data.normal_(0, 0.05)
    x, t, c = unet_inputs()
    tiny_unet.eval()  # the model's eval() turns the LoRA dropout off: two calls agree
    with torch.no_grad():
        assert torch.equal(tiny_unet(x, t, c).sample, tiny_unet(x, t, c).sample)
    tiny_unet.train()
    with torch.no_grad():
        assert not torch.equal(tiny_unet(x, t, c).sample, tiny_unet(x, t, c).sample)

    tiny_unet.requires_grad_(False)  # requires_grad_ reaches the LoRA too
    assert not any(p.requires_grad for p in lora)


def test_remove_restores_types_state_dict_and_outputs(tiny_unet, tiny_text_encoder):
    x, t, c = unet_inputs()
    with torch.no_grad():
        before = tiny_unet(x, t, c).sample
    state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    types = [(n, type(m)) for n, m in tiny_unet.named_modules()]
    network = create_network(tiny_unet, tiny_text_encoder, rank=4, conv_rank=4)
    for p in network.parameters():
        p.data.normal_(0, 0.05)
    assert len(tiny_unet.state_dict()) > len(state)
    network.remove()
    assert [(n, type(m)) for n, m in tiny_unet.named_modules()] == types
    after = tiny_unet.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(tiny_unet(x, t, c).sample, before)


def test_the_model_hooks_and_stacked_loras():
    base = nn.Linear(8, 8)
    model = nn.Sequential(base)
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    x = torch.randn(3, 8)
    plain = base(x).detach()
    seen.clear()
    first = create_and_fill(base, 0.1)
    second = create_and_fill(base, 0.2)
    assert set(base._modules) == {"lora", "lora_1"}
    out = model(x)
    # both LoRAs add up; a user's hook registered earlier sees the base output
    torch.testing.assert_close(out, plain + first.lora_delta(x) + second.lora_delta(x))
    torch.testing.assert_close(seen[-1], plain)
    first.remove()
    torch.testing.assert_close(model(x), plain + second.lora_delta(x))
    second.remove()
    assert not base._modules and len(base._forward_hooks) == 1


def create_and_fill(base, value):
    from lora_diffusion import LoRALayer

    layer = LoRALayer(base, rank=2).apply_to()
    for p in layer.parameters():
        p.data.fill_(value)
    return layer


def test_gradient_checkpointing_gives_the_same_gradients(tiny_unet):
    tiny_unet.requires_grad_(False)
    params, _ = inject_trainable_lora(tiny_unet, r=4)
    lora = list(itertools.chain(*params))
    for p in lora:
        p.data.normal_(0, 0.05)
    x, t, c = unet_inputs()

    def grads():
        for p in lora:
            p.grad = None
        tiny_unet(x, t, c).sample.pow(2).mean().backward()
        return [p.grad.clone() for p in lora]

    plain = grads()
    tiny_unet.enable_gradient_checkpointing()
    tiny_unet.train()
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_torch_compile_runs_the_lora():
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    params, _ = inject_trainable_lora(model, target_replace_module={"Sequential"}, r=2)
    for p in itertools.chain(*params):
        p.data.normal_(0, 0.1)
    x = torch.randn(5, 16)
    eager = model(x)
    compiled = torch.compile(model, backend="eager")  # dynamo traces the hooks; no C++ toolchain needed
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in itertools.chain(*params))


# -- DistributedDataParallel over two gloo processes ---------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        unet = build_tiny_unet()
        unet.requires_grad_(False)
        torch.manual_seed(0)  # the same LoRA init on every process
        params, _ = inject_trainable_lora(unet, r=4)
        ddp = nn.parallel.DistributedDataParallel(unet)
        optimizer = torch.optim.SGD(itertools.chain(*params), lr=0.1)
        x, t, c = unet_inputs(seed=100 + rank)  # different data on each process
        for _ in range(2):
            optimizer.zero_grad()
            ddp(x, t, c).sample.pow(2).mean().backward()
            optimizer.step()
        torch.save({k: v for k, v in lora_network(unet).state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_keeps_the_lora_identical_on_every_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert set(a) == set(b) and len(a) == 3 * 144
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and it trained: the zero-initialised lora_up weights moved
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("lora_up.weight"))


def test_remove_lora_after_inject(tiny_unet):
    names_before = set(tiny_unet.state_dict())
    inject_trainable_lora(tiny_unet, r=2)
    remove_lora(tiny_unet)
    assert set(tiny_unet.state_dict()) == names_before
    with pytest.raises(ValueError, match="no LoRA"):
        lora_network(tiny_unet)
