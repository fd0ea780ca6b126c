"""A file we save, loaded by a real client (diffusers' load_lora_weights) and fused, gives the outputs of our
network."""

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from conftest import ASSETS, build_tiny_text_encoder, build_tiny_unet, text_ids, unet_inputs
from lora_diffusion import create_network


def diffusers_pipeline():
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(ASSETS / "tiny-sd" / "vae"))
    return StableDiffusionPipeline(vae=vae, text_encoder=build_tiny_text_encoder(), tokenizer=None,
                                   unet=build_tiny_unet(), scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


CASES = {
    "default-fp32": dict(rank=4, alpha=1.0, dtype=None, multiplier=1.0, conv=None),
    "locon-conv_alpha": dict(rank=4, alpha=2.0, dtype=None, multiplier=1.0, conv=(8, 3.0)),
    "fp16-file": dict(rank=8, alpha=4.0, dtype=torch.float16, multiplier=1.0, conv=(4, 2.0)),
    "multiplier-0.6": dict(rank=4, alpha=4.0, dtype=None, multiplier=0.6, conv=None),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_diffusers_load_lora_weights_matches_our_network(tmp_path, case):
    c = CASES[case]
    unet, text_encoder = build_tiny_unet(), build_tiny_text_encoder()
    conv_rank, conv_alpha = c["conv"] or (None, None)
    network = create_network(unet, text_encoder, rank=c["rank"], alpha=c["alpha"], conv_rank=conv_rank,
                             conv_alpha=conv_alpha)
    g = torch.Generator().manual_seed(3)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
        if c["dtype"] is not None:  # compare like with like: values the fp16 file can hold exactly
            p.data = p.data.to(c["dtype"]).float()
    network.set_multiplier(c["multiplier"])
    x, t, context = unet_inputs()
    ids = text_ids()
    with torch.no_grad():
        ours_unet = unet(x, t, context).sample
        ours_te = text_encoder(ids).last_hidden_state
    network.remove()
    with torch.no_grad():
        base_unet = unet(x, t, context).sample
    network.save_weights(tmp_path / "lora.safetensors", dtype=c["dtype"])

    pipe = diffusers_pipeline()
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    pipe.fuse_lora(lora_scale=c["multiplier"])
    with torch.no_grad():
        theirs_unet = pipe.unet(x, t, context).sample
        theirs_te = pipe.text_encoder(ids).last_hidden_state
    assert (ours_unet - base_unet).abs().max() > 1e-2  # the LoRA does something
    tolerance = 1e-3 if c["dtype"] is not None else 1e-4
    torch.testing.assert_close(theirs_unet, ours_unet, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(theirs_te, ours_te, rtol=tolerance, atol=tolerance)
