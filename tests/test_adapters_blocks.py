"""kohya networks.lora's network options: block_dims/alphas (rank per U-Net block), down/mid/up_lr_weight (lr per
block), LoRA+ ratios. The expected blocks, ranks and learning rates are computed here from SD's original U-Net
layout (IN01-IN11, M00, OUT00-OUT11) over diffusers module paths, independently of the library's kohya-name rule."""

import math

import pytest

from conftest import build_tiny_text_encoder, build_tiny_unet
from lora_diffusion import create_network
from lora_diffusion.core.adapters import blocks


def sd_block(path: str) -> int:
    """SD1.x/2.x: diffusers down_blocks.i.{resnets,attentions}.j is the original IN(3i + j + 1), its downsampler
    IN(3i + 3); mid_block is block 12; up_blocks.i.{resnets,attentions}.j is OUT(3i + j), its upsampler sits in
    OUT(3i + 2). kohya counts IN00-IN11 as 0-11 and OUT00-OUT11 as 13-24."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return 12
    i, kind, j = int(parts[1]), parts[2], int(parts[3])
    if parts[0] == "down_blocks":
        return 3 * i + 3 if kind == "downsamplers" else 3 * i + j + 1
    return 13 + 3 * i + (2 if kind == "upsamplers" else j)


def layer_paths(network, unet):
    paths = {id(m): p for p, m in unet.named_modules()}
    return {name: paths[id(layer.base)] for name, layer in network.layers().items() if name.startswith("lora_unet_")}


def test_block_index_of_kohya_names():
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in": 1, "lora_unet_down_blocks_0_resnets_1_conv1": 2,
          "lora_unet_down_blocks_0_downsamplers_0_conv": 3, "lora_unet_down_blocks_3_resnets_1_conv2": 11,
          "lora_unet_mid_block_attentions_0_proj_out": 12, "lora_unet_up_blocks_0_resnets_2_conv1": 15,
          "lora_unet_up_blocks_0_upsamplers_0_conv": 15, "lora_unet_up_blocks_1_attentions_0_proj_in": 16,
          "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": 24,
          "lora_te_text_model_encoder_layers_0_mlp_fc1": None}
    assert {n: blocks.block_index(n, sdxl=False) for n in sd} == sd
    sdxl = {"lora_unet_input_blocks_1_0_in_layers_2": 2, "lora_unet_input_blocks_4_1_proj_in": 5,
            "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q": 11,
            "lora_unet_output_blocks_8_0_skip_connection": 21, "lora_unet_time_embed_0": 0}
    assert {n: blocks.block_index(n, sdxl=True) for n in sdxl} == sdxl
    assert blocks.block_count(False) == 25 and blocks.block_count(True) == 23
    # SDXL's lr weights: 1 (embeddings) + 9 input + 3 middle + 9 output + 1 (out), the two ends always 1
    weights = blocks.parse_lr_weights(down="reverse_linear", mid="0.5,0.25,0", sdxl=True)
    assert weights == pytest.approx([1.0] + [i / 8 for i in reversed(range(9))] + [0.5, 0.25, 0.0] + [1.0] * 10)


def test_block_dims_give_kohya_ranks():
    unet = build_tiny_unet()
    dims = [i % 4 for i in range(25)]  # 0: no module in that block
    alphas = [0.5 * i for i in range(25)]
    conv_dims = [(i + 1) % 3 for i in range(25)]
    network = create_network(unet, build_tiny_text_encoder(), rank=8, alpha=4, block_dims=",".join(map(str, dims)),
                             block_alphas=",".join(map(str, alphas)), conv_block_dims=conv_dims)
    paths = layer_paths(network, unet)
    made = set()
    for name, path in paths.items():
        layer, block = network.layers()[name], sd_block(path)
        kxk = layer.base.weight.dim() == 4 and layer.base.weight.shape[2:] != (1, 1)
        expected_rank = conv_dims[block] if kxk else dims[block]
        expected_alpha = 1.0 if kxk else (alphas[block] or expected_rank)  # kohya: conv alphas default to 1
        assert (layer.rank, layer.alpha.item()) == (expected_rank, expected_alpha), name
        made.add(path)
    # every LoCon target whose block has a rank is there, the others are not
    locon_unet = build_tiny_unet()
    modules = dict(locon_unet.named_modules())
    locon_paths = layer_paths(create_network(locon_unet, None, rank=2, conv_rank=2), locon_unet).values()

    def kernel_kxk(path):
        return modules[path].weight.dim() == 4 and modules[path].weight.shape[2:] != (1, 1)

    expected = {p for p in locon_paths if (conv_dims if kernel_kxk(p) else dims)[sd_block(p)]}
    assert made == expected and len(made) < len(locon_paths)
    assert all(layer.rank == 8 for layer in network.text_encoder_layers)  # block options are the U-Net's


def test_block_lr_weights_in_param_groups():
    unet = build_tiny_unet()
    with pytest.warns(UserWarning, match="up_lr_weight has 4 values"):  # kohya fills the rest with 1
        network = create_network(unet, build_tiny_text_encoder(), rank=2, down_lr_weight="sine+.5",
                                 mid_lr_weight="0", up_lr_weight="1,1,,0.5", block_lr_zero_threshold=0.6,
                                 loraplus_unet_lr_ratio=16)
    # kohya's rules: sine over the 12 down blocks plus 0.5; up "1,1,,0.5" is 1, 1, 0, 0.5 then 1s; the threshold
    # zeroes given weights at or under 0.6; the middle is 0
    down = [math.sin(math.pi * (i / 11) / 2) + 0.5 for i in range(12)]
    up = [1.0, 1.0, 0.0, 0.5] + [1.0] * 8
    weights = [w if w > 0.6 else 0.0 for w in down] + [0.0] + [w if w > 0.6 else 0.0 for w in up]
    assert network.block_lr_weights == pytest.approx(weights)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    lr_of = {id(p): (g["lr"], g["name"]) for g in groups for p in g["params"]}
    paths = layer_paths(network, unet)
    assert paths and all(weights[sd_block(p)] > 0 for p in paths.values())  # zero-weight blocks have no module
    for name, path in paths.items():
        layer, block = network.layers()[name], sd_block(path)
        assert lr_of[id(layer.lora_down.weight)] == (pytest.approx(1e-4 * weights[block]), f"unet_block{block}")
        assert lr_of[id(layer.lora_up.weight)] == (pytest.approx(16e-4 * weights[block]), f"unet_block{block}_plus")
    for layer in network.text_encoder_layers:  # no LoRA+ ratio for the text encoder: one group at its lr
        assert lr_of[id(layer.lora_up.weight)] == (5e-5, "text_encoder")
    # the blocks kohya leaves untouched (weight 0) are absent from the network, not just frozen
    full = create_network(build_tiny_unet(), None, rank=2)
    assert len(full.layers()) > len(paths)


def test_loraplus_ratios():
    network = create_network(build_tiny_unet(), build_tiny_text_encoder(), rank=2, loraplus_lr_ratio=16,
                             loraplus_text_encoder_lr_ratio=4)
    groups = {g["name"]: g for g in network.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)}
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx(
        {"unet": 1e-4, "unet_plus": 16e-4, "text_encoder": 5e-5, "text_encoder_plus": 20e-5})
    ups = {id(layer.lora_up.weight) for layer in network.layers().values()}
    assert {id(p) for p in groups["unet_plus"]["params"] + groups["text_encoder_plus"]["params"]} == ups
    assert not ups & {id(p) for p in groups["unet"]["params"] + groups["text_encoder"]["params"]}
    assert network.network_args["loraplus_lr_ratio"] == 16
    # LoHa has no lora_up: LyCORIS' rule gives it no LoRA+ group
    loha = create_network(build_tiny_unet(), None, rank=2, algo="loha", loraplus_lr_ratio=16)
    assert [g["name"] for g in loha.param_groups(unet_lr=1e-4)] == ["unet"]


def test_bad_network_options_are_named():
    unet = build_tiny_unet()
    for options, message in ((dict(block_dims="4," * 23 + "4"), r"block_dims.*25"),
                             (dict(block_dims="4,x" + ",4" * 23), r"block_dims.*25"),
                             (dict(down_lr_weight="sinus"), r"down_lr_weight.*cosine, sine"),
                             (dict(mid_lr_weight="a"), r"mid_lr_weight"),
                             (dict(conv_block_alphas="1," * 24 + "1"), r"conv_block_alphas needs conv_block_dims"),
                             (dict(block_dims="4," * 24 + "4", algo="loha"), r"block_dims.*LyCORIS"),
                             (dict(loraplus_lr_ratio=0), r"loraplus_lr_ratio"),
                             (dict(block_dims="0," * 24 + "0"), r"no module")):
        with pytest.raises(ValueError, match=message):
            create_network(unet, None, rank=2, **options)
    network = create_network(unet, None, rank=2, loraplus_lr_ratio=4)
    with pytest.raises(ValueError, match="LoRA\\+.*learning rate"):
        network.param_groups()
