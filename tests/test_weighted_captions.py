"""kohya's --weighted_captions: the web UIs' emphasis syntax parsed as they define it, and the weights applied to
the text encoder's states as kohya's get_weighted_text_embeddings does (multiply each token's state, then rescale
each caption to its unweighted mean), written out here on the plain caption's own encoding."""

import pytest
import torch

import train_lora
from lora_diffusion.models import load_models
from lora_diffusion.models.prompt_weights import parse_weights
from lora_diffusion.models.text import encode_prompts
from lora_diffusion.training.validation import caption_encoder
from test_train import base_flags, make_dataset


@pytest.mark.parametrize("text, expected", [
    ("a (red:1.5) square", [("a ", 1.0), ("red", 1.5), (" square", 1.0)]),
    ("a (red) square", [("a ", 1.0), ("red", 1.1), (" square", 1.0)]),
    ("a ((red)) [square]", [("a ", 1.0), ("red", 1.1 * 1.1), (" ", 1.0), ("square", 1 / 1.1)]),
    ("(a (red:2) b:0.5)", [("a ", 0.5), ("red", 1.0), (" b", 0.5)]),
    (r"a \(red\) square", [("a (red) square", 1.0)]),
    ("time: 12 (red", [("time", 1.0), (":", 1.0), (" 12 ", 1.0), ("red", 1.1)]),
    ("plain, tags", [("plain, tags", 1.0)]),
])
def test_the_emphasis_syntax(text, expected):
    got = parse_weights(text)
    merged = []  # compare merged neighbours of one weight, as the parser gives them
    for fragment, weight in expected:
        if merged and merged[-1][1] == pytest.approx(weight):
            merged[-1] = (merged[-1][0] + fragment, weight)
        else:
            merged.append((fragment, weight))
    assert [f for f, _ in got] == [f for f, _ in merged]
    assert [w for _, w in got] == pytest.approx([w for _, w in merged])


def test_weights_multiply_the_tokens_states_and_keep_the_mean():
    models = load_models("builtin:tiny")
    with torch.no_grad():
        got = caption_encoder(models, lambda c: c, weighted=True)(["a (red:1.5) square", "plain square"])
        plain = encode_prompts(models.tokenizer, models.text_encoder, ["a red square", "plain square"])
    weights = torch.ones(2, plain.shape[1])
    weights[0, 2] = 1.5  # BOS, "a", "red": one token each in CLIP's vocabulary
    assert models.tokenizer("a red square").input_ids[1:4] == [
        models.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("a", "red", "square")]
    expected = plain * weights.unsqueeze(-1)
    expected = expected * (plain.mean(dim=(1, 2)) / expected.mean(dim=(1, 2)))[:, None, None]
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got[1], plain[1], atol=1e-6)  # no weights: the plain encoding
    assert not torch.allclose(got[0], plain[0], atol=1e-3)


def test_a_run_with_weighted_captions_and_the_cache_that_cannot_hold_them(tmp_path, capsys):
    data = make_dataset(tmp_path)
    for caption in (data / "5_toy").glob("*.txt"):
        caption.write_text("toy, (square:1.3), [number]")
    assert train_lora.main(base_flags(tmp_path, data, weighted_captions=True, max_train_steps=2)) == 0
    argv = base_flags(tmp_path / "b", data, weighted_captions=True, cache_text_encoder_outputs=True,
                      network_train_unet_only=True)
    assert train_lora.main(argv) != 0
    assert "--cache_text_encoder_outputs and --weighted_captions exclude each other" in capsys.readouterr().err
