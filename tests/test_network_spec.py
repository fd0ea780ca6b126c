"""NetworkSpec: create_network's options as one object; the ss_network_args record kohya and LyCORIS write."""

import json

import pytest
from safetensors import safe_open

from lora_diffusion import NetworkSpec, create_network


def recorded_args(network, tmp_path):
    path = tmp_path / "x.safetensors"
    network.save_weights(str(path))
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ss_network_args"])


def test_spec_and_keywords_make_the_same_network(tmp_path, tiny_unet, tiny_text_encoder):
    by_keywords = create_network(tiny_unet, tiny_text_encoder, rank=4, alpha=2, algo="LoKr", factor=2,
                                 train_text_encoder=False)
    keyword_args, keyword_layers = recorded_args(by_keywords, tmp_path), sorted(by_keywords.layers())
    by_keywords.remove()
    by_spec = create_network(tiny_unet, tiny_text_encoder,
                             spec=NetworkSpec(rank=4, alpha=2, algo="LoKr", factor=2, train_text_encoder=False))
    assert sorted(by_spec.layers()) == keyword_layers
    # what LyCORIS' create_network records for these options: algo lower-case, convs at the network's rank/alpha
    expected = {"algo": "lokr", "conv_dim": "4", "conv_alpha": "2", "factor": "2"}
    assert recorded_args(by_spec, tmp_path) == keyword_args == expected
    assert by_spec.network_module == "lycoris.kohya"


def test_kohya_block_options_are_recorded_as_kohya_writes_them():
    spec = NetworkSpec(rank=8, alpha=0, conv_rank=4, down_lr_weight="1,1,0.5", block_lr_zero_threshold=0.1,
                       loraplus_lr_ratio=16).resolved()
    assert spec.alpha == 8 and spec.conv_alpha == 4  # kohya: alpha 0 -> rank
    assert spec.network_args(block_lr_weights=[1.0] * 25) == {
        "conv_dim": 4, "conv_alpha": 4, "down_lr_weight": "1,1,0.5", "block_lr_zero_threshold": 0.1,
        "loraplus_lr_ratio": 16}
    assert "block_lr_zero_threshold" not in spec.network_args(block_lr_weights=None)
    assert spec.loraplus_ratios() == {"unet": 16.0, "text_encoder": 16.0}
    assert NetworkSpec(dylora_unit=2).resolved().network_args() == {"unit": 2}
    assert NetworkSpec(dylora_unit=2).network_module == "networks.dylora"


@pytest.mark.parametrize("options, message", [
    (dict(factor=2), "LyCORIS options; pass algo="),
    (dict(algo="lora", wd_on_output=False), "wd_on_output=False is DoRA's option"),
    (dict(algo="nope"), "algo='nope' is not supported"),
    (dict(algo="lokr", factor=0), "LoKr factor=0"),
    (dict(algo="lora", block_dims="4,4"), "block-wise options"),
    (dict(loraplus_lr_ratio=0), "loraplus_lr_ratio=0: expected a number > 0"),
])
def test_bad_options_name_the_option_before_a_model_is_touched(options, message):
    with pytest.raises(ValueError, match=message):
        NetworkSpec(**options).resolved()


def test_unknown_option_names_the_nearest_and_spec_excludes_keywords(tiny_unet, tiny_text_encoder):
    with pytest.raises(TypeError, match="'rank_dropuot'.*'rank_dropout'"):
        create_network(tiny_unet, tiny_text_encoder, rank_dropuot=0.1)
    with pytest.raises(TypeError, match="either as keywords or as spec="):
        create_network(tiny_unet, tiny_text_encoder, rank=8, spec=NetworkSpec())
