"""DyLoRA (LyCORIS' algo=dylora, kohya's networks.dylora): files are LyCORIS' DyLoRA files (plain LoRA keys) and load
in LyCORIS with the same merged weights; training uses the first k = b * block_size ranks at alpha / k with only
the last block learning (formula written out here); eval is the full-rank LoRA."""

import logging

import pytest
import torch
from torch import nn

from conftest import build_tiny_text_encoder, build_tiny_unet

pytest.importorskip("lycoris")
from lycoris.modules import DyLoraModule, LoConModule, get_module, make_module  # noqa: E402

from lora_diffusion import create_network, load_network  # noqa: E402
from lora_diffusion.core.adapters import DyLoRALayer, LoRALayer  # noqa: E402
from lora_diffusion.core.kohya import parse_state_dict  # noqa: E402
from lora_diffusion.core.network import LoRANetwork  # noqa: E402

logging.getLogger("lycoris").setLevel(logging.ERROR)
NAME = "lora_unet_x"


def squeeze(shape):
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(24, 40), lambda: nn.Conv2d(16, 24, 3, padding=1)],
                         ids=["linear", "conv3x3"])
def test_dylora_files_are_lycoris_dylora_files(make_base):
    torch.manual_seed(0)
    base = make_base()
    theirs = DyLoraModule(NAME, base, 1.0, lora_dim=8, alpha=4, block_size=4)
    ours = DyLoRALayer(base, 8, 4, block_size=4)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    tensors = LoRANetwork({NAME: ours}, rank=8, alpha=4, network_module="lycoris.kohya").file_tensors()
    # LyCORIS' DyLoRA save: LoRA keys and shapes (its conv lora_up is 2-D; kohya's, and ours, [out, r, 1, 1])
    their_keys = {f"{NAME}.{k}": squeeze(v.shape) for k, v in theirs.custom_state_dict().items()}
    assert {k: squeeze(v.shape) for k, v in tensors.items()} == their_keys
    kind, params = get_module(tensors, NAME)
    assert kind is LoConModule  # LyCORIS reads a DyLoRA file as the LoRA it is
    loaded = make_module(kind, params, NAME, base)
    ours.eval()
    torch.testing.assert_close(ours.delta_weight(), loaded.get_diff_weight()[0].reshape(base.weight.shape).detach(),
                               rtol=1e-5, atol=1e-6)
    # and LyCORIS' DyLoRA module, saved its way, reads here as the full-rank LoRA LyCORIS itself loads from it
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    saved = {f"{NAME}.{k}": v.detach().clone() for k, v in theirs.custom_state_dict().items()}
    weights = parse_state_dict(saved)[NAME]
    assert weights.label in ("LoRA", "LoCon") and (weights.rank, weights.alpha) == (8, 4)
    from lora_diffusion.core.network import layer_from_file
    mine = layer_from_file(base, weights, NAME, "test")
    up, down = saved[f"{NAME}.lora_up.weight"], saved[f"{NAME}.lora_down.weight"]
    by_formula = (up.flatten(1) @ down.flatten(1)).reshape(base.weight.shape) * 4 / 8
    # lycoris-lora 4.1.3 cannot read its own conv DyLoRA files (2-D lora_up) back; given the 4-D form, it can
    four_d = {k: (v.reshape(*v.shape, 1, 1) if k.endswith("lora_up.weight") and base.weight.dim() == 4 else v)
              for k, v in saved.items()}
    reloaded = make_module(*get_module(four_d, NAME), NAME, base)
    torch.testing.assert_close(mine.delta_weight(), by_formula, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.delta_weight(), reloaded.get_diff_weight()[0].reshape(by_formula.shape).detach(),
                               rtol=1e-5, atol=1e-6)


def test_training_uses_the_first_k_ranks_and_trains_the_last_block():
    torch.manual_seed(1)
    base = nn.Linear(12, 10)
    layer = DyLoRALayer(base, 6, 3, block_size=2).apply_to()
    with torch.no_grad():
        layer.lora_up.weight.normal_()
    x = torch.randn(4, 12)
    for blocks in (1, 2, 3):
        layer.train()
        layer.sample_blocks = lambda blocks=blocks: blocks
        layer.zero_grad()
        y = base(x)
        k = 2 * blocks
        down, up = layer.lora_down.weight.detach(), layer.lora_up.weight.detach()
        expected = nn.functional.linear(x, base.weight, base.bias) + 3 / k * (x @ down[:k].T) @ up[:, :k].T
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        y.square().sum().backward()
        rows = layer.lora_down.weight.grad.abs().sum(1) > 0
        assert rows.tolist() == [i in range(k - 2, k) for i in range(6)]  # only the last block of the k learns
    layer.eval()
    with torch.no_grad():
        expected = nn.functional.linear(x, base.weight, base.bias) + 3 / 6 * (x @ down.T) @ up.T
        torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)  # eval: full rank, deterministic


def test_dylora_networks_lycoris_and_kohya_flavours(tmp_path):
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    lycoris_style = create_network(unet, text_encoder, rank=8, alpha=4, algo="dylora", block_size=4)
    assert lycoris_style.network_module == "lycoris.kohya" and lycoris_style.network_args["block_size"] == 4
    assert len(lycoris_style.unet_layers) == 282  # LyCORIS' targets
    lycoris_style.remove()
    kohya_style = create_network(unet, text_encoder, rank=4, alpha=4, dylora_unit=2)
    assert kohya_style.network_module == "networks.dylora" and kohya_style.network_args["unit"] == 2
    assert (len(kohya_style.unet_layers), len(kohya_style.text_encoder_layers)) == (192, 72)  # kohya's targets
    assert all(isinstance(layer, DyLoRALayer) for layer in kohya_style.layers().values())
    path = tmp_path / "dylora.safetensors"
    kohya_style.save_weights(path)
    kohya_style.load_weights(path)  # resume: a DyLoRA network takes its own (LoRA) file
    kohya_style.remove()
    loaded = load_network(path, unet, text_encoder)  # and it loads as the LoRA it is
    assert {type(layer) for layer in loaded.layers().values()} == {LoRALayer}
    for options, message in ((dict(rank=6, algo="dylora", block_size=4), "divides the rank 6"),
                             (dict(rank=4, dylora_unit=2, algo="dylora"), "dylora_unit"),
                             (dict(rank=4, algo="dylora", rank_dropout=0.1), "rank_dropout")):
        with pytest.raises(ValueError, match=message):
            create_network(unet, None, **options)


def test_block_size_without_lycoris_is_refused():
    """kohya's networks.dylora `unit` is dylora_unit=; a block_size without algo='dylora' would be ignored."""
    with pytest.raises(ValueError, match="dylora_unit"):
        create_network(build_tiny_unet(), None, rank=4, block_size=2)
