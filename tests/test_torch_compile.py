"""kohya's --torch_compile / --dynamo_backend: the U-Net with its LoRA layers goes through torch.compile. With the
eager backend (dynamo traces, nothing is code-generated) the LoRA must come out exactly as without compiling; the
dynamo counters show the U-Net was traced."""

from safetensors.torch import load_file

import train_lora
from test_train import base_flags, make_dataset


def test_a_compiled_unet_trains_the_same_lora(tmp_path):
    import torch._dynamo

    data = make_dataset(tmp_path)
    assert train_lora.main(base_flags(tmp_path / "plain", data, max_train_steps=2)) == 0
    torch._dynamo.reset()
    assert train_lora.main(base_flags(tmp_path / "compiled", data, max_train_steps=2, torch_compile=True,
                                      dynamo_backend="eager")) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch._dynamo.reset()
    plain = load_file(str(tmp_path / "plain" / "out" / "t.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "out" / "t.safetensors"))
    assert plain.keys() == compiled.keys() and all(torch.equal(plain[k], compiled[k]) for k in plain)
