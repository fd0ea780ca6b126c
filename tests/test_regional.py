"""Regional prompts (models/regional.py): each region's prompt is what cross-attention reads inside its box.
Checked against attention computed by hand, the U-Net's own downsampling, and plain sampling with the region's
prompt (a region over the whole image), on SD1.x and SDXL and with a LoRA loaded."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor

from lora_diffusion import create_network
from lora_diffusion.models import load_models
from lora_diffusion.models.regional import (
    Region,
    RegionalAttnProcessor,
    RegionalState,
    RegionContext,
    attention_grid,
    box_mask,
    encode_regions,
    parse_region,
    regional_attention,
)
from lora_diffusion.models.sampling import draw, make_sample_scheduler, sample_images


def attend(attn, hidden, context):
    """Single-head attention written out: to_out(softmax(q k^T / sqrt(d)) v)."""
    q, k, v = hidden @ attn.to_q.weight.T, context @ attn.to_k.weight.T, context @ attn.to_v.weight.T
    weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v) @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_a_region_attends_only_inside_its_box_by_hand():
    torch.manual_seed(0)
    attn = Attention(query_dim=4, cross_attention_dim=3, heads=1, dim_head=4)
    hidden = torch.randn(2, 4, 4)  # [unconditional, conditional], a 2x2 token grid
    global_context = torch.randn(2, 5, 3)
    embeds, negative = torch.randn(1, 7, 3), torch.randn(1, 7, 3)
    state = RegionalState([RegionContext(embeds, negative, (0.0, 0.0, 0.5, 1.0))], latent_size=(4, 4),
                          guidance=True)  # the 2x2 grid is the 4x4 latent halved
    attn.set_processor(RegionalAttnProcessor(AttnProcessor(), state))
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=global_context)
        plain = attend(attn, hidden, global_context)
        region = attend(attn, hidden, torch.cat([negative, embeds]))
    left = torch.tensor([True, False, True, False])  # row-major 2x2: the left column
    expected = torch.where(left[None, :, None], region, plain)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    state.guidance = False  # without guidance the batch is conditional only
    with torch.no_grad():
        got = attn(hidden[1:], encoder_hidden_states=global_context[1:])
    torch.testing.assert_close(got[0], torch.where(left[:, None], attend(attn, hidden[1:], embeds)[0],
                                                   attend(attn, hidden[1:], global_context[1:])[0]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("latent", [(8, 8), (5, 3), (13, 20)])
def test_attention_grids_follow_the_unets_strided_convolutions(latent):
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)  # the U-Net's Downsample2D
    x = torch.zeros(1, 1, *latent)
    for _ in range(4):
        assert attention_grid(x.shape[2] * x.shape[3], latent) == tuple(x.shape[2:])
        x = conv(x)
    with pytest.raises(ValueError, match="no downscale"):
        attention_grid(latent[0] * latent[1] - 1, latent)


def test_box_masks_hold_the_cells_whose_centres_are_inside():
    mask = box_mask((0.25, 0.0, 1.0, 0.5), 2, 4).reshape(2, 4)
    assert mask.tolist() == [[False, True, True, True], [False, False, False, False]]
    assert box_mask((0, 0, 1, 1), 3, 5).all()


def test_region_specs_parse_and_bad_ones_name_the_flag():
    assert parse_region("a red star, on the left@0,0,0.5,1") == Region("a red star, on the left", (0, 0, 0.5, 1))
    for spec, message in (("no box", "expected PROMPT@"), ("x@0,0,1", "four fractions"),
                          ("x@0,0,a,1", "not four numbers"), ("x@0.5,0,0.5,1", "x0 < x1"),
                          ("x@0,0,1.5,1", "between 0 and 1"), ("@0,0,1,1", "expected PROMPT@")):
        with pytest.raises(ValueError, match=f"--region .*{message}"):
            parse_region(spec)


def image(paths):
    [path] = paths
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


def random_lora(models, seed=0):
    network = create_network(models.unet, models.text_encoder, rank=2, alpha=2)
    generator = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.data = torch.randn(p.shape, generator=generator) * 0.3
    return network.apply_to()


def test_a_whole_image_region_is_plain_sampling_with_its_prompt_sd_with_a_lora(tmp_path):
    models = load_models("builtin:tiny")
    random_lora(models)

    def run(name, text, regions=()):
        prompt = dict(prompt=text, negative_prompt="", width=64, height=64, steps=3, scale=5.0, seed=3, sampler=None)
        return image(sample_images(models, prompts=[prompt], out_dir=tmp_path / name, regions=regions))

    plain = run("plain", "toy, a blue square")
    assert np.array_equal(run("whole", "toy, a red circle", [Region("toy, a blue square", (0, 0, 1, 1))]), plain)
    half = run("half", "toy, a red circle", [Region("toy, a blue square", (0, 0, 0.5, 1))])
    assert np.abs(half - plain).max() > 0 and np.abs(half - run("global", "toy, a red circle")).max() > 0
    assert not any(isinstance(p, RegionalAttnProcessor) for p in models.unet.attn_processors.values())


def test_a_whole_image_region_on_sdxl_is_its_text_states_with_the_global_pooled_states():
    models = load_models("builtin:tiny-xl")
    pipe = models.family.pipeline(models, make_sample_scheduler("ddim", models.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    settings = dict(width=64, height=64, num_inference_steps=2, guidance_scale=5.0, output_type="np")
    region = Region("a blue square", (0, 0, 1, 1))
    with torch.no_grad():
        [context] = encode_regions(models, pipe, [region], "", expand=lambda t: t)
        with regional_attention(pipe.unet, [context], latent_size=(8, 8), guidance=True):
            got = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **settings).images
        square, square_negative, _, _ = pipe.encode_prompt(prompt="a blue square", device="cpu")
        _, _, pooled, pooled_negative = pipe.encode_prompt(prompt="a red circle", device="cpu")
        expected = pipe(prompt_embeds=square, negative_prompt_embeds=square_negative, pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=pooled_negative, generator=torch.Generator().manual_seed(0),
                        **settings).images
        plain = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **settings).images
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - plain).max() > 1e-3
    assert not any(isinstance(p, RegionalAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_draw_keeps_its_behaviour_without_regions():
    models = load_models("builtin:tiny")
    pipe = models.family.pipeline(models, make_sample_scheduler("ddim", models.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    with regional_attention(pipe.unet, [], latent_size=(8, 8), guidance=True):
        a = draw(pipe, prompt="toy", width=64, height=64, num_inference_steps=2, generator=torch.manual_seed(0))[0]
    b = draw(pipe, prompt="toy", width=64, height=64, num_inference_steps=2, generator=torch.manual_seed(0))[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


# -- layer-wise token embeddings (concepts/layerwise.py): per-layer text states through the same attn2 seam --------


def tiny_pipeline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    models = load_models("builtin:tiny")
    pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layerwise_vectors_alike_in_every_layer_draw_what_a_plain_embedding_draws(tmp_path):
    from lora_diffusion.concepts.layerwise import LayerwiseEmbeddings, layerwise_pipeline_call
    from lora_diffusion.core.network import TokenEmbeddings

    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    settings = dict(num_inference_steps=2, height=64, width=64, output_type="np", guidance_scale=5.0)
    plain_pipe = tiny_pipeline()
    TokenEmbeddings("<star>", vector).apply_to(plain_pipe.tokenizer, plain_pipe.text_encoder)
    plain = plain_pipe("a red <star>", generator=torch.Generator().manual_seed(1), **settings).images
    pipe = tiny_pipeline()
    layers = LayerwiseEmbeddings.create(pipe.tokenizer, pipe.text_encoder, pipe.unet, "<star>").layers
    LayerwiseEmbeddings("<star>", layers, vector.expand(len(layers), 1, 32)).save(tmp_path / "star.safetensors")
    from lora_diffusion.concepts.layerwise import load_layerwise_into_pipeline

    embedding = load_layerwise_into_pipeline(pipe, tmp_path / "star.safetensors")
    ours = layerwise_pipeline_call(pipe, embedding, "a red <star>", generator=torch.Generator().manual_seed(1),
                                   **settings).images
    np.testing.assert_allclose(ours, plain, atol=1e-5)
    assert not any(type(p).__name__ == "LayerContextProcessor" for p in pipe.unet.attn_processors.values())


def test_each_cross_attention_layer_reads_the_prompt_encoded_with_its_own_vectors():
    from lora_diffusion.concepts.layerwise import LayerwiseEmbeddings, layerwise_pipeline_call

    pipe = tiny_pipeline()
    layers = LayerwiseEmbeddings.create(pipe.tokenizer, pipe.text_encoder, pipe.unet, "<v>").layers
    vectors = torch.randn(len(layers), 1, 32, generator=torch.Generator().manual_seed(2))
    embedding = LayerwiseEmbeddings("<v>", layers, vectors).apply_to(pipe.tokenizer, pipe.text_encoder)
    seen = {}
    hooks = [pipe.unet.get_submodule(layer).to_k.register_forward_pre_hook(
        lambda m, args, layer=layer: seen.setdefault(layer, args[0].detach().clone())) for layer in layers]
    layerwise_pipeline_call(pipe, embedding, "a <v> on a white background", num_inference_steps=1, height=64,
                            width=64, guidance_scale=1.0, output_type="latent")
    for hook in hooks:
        hook.remove()
    embedding.remove()
    ids = pipe.tokenizer("a <v> on a white background", padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    assert len(layers) >= 2 and set(seen) == set(layers)
    for index, layer in enumerate(layers):  # the table's row for <v> set by hand to this layer's vector
        with torch.no_grad():
            table[embedding.first_id] = vectors[index, 0]
            expected = pipe.text_encoder(ids)[0]
        torch.testing.assert_close(seen[layer], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen[layers[0]], seen[layers[1]])


def test_layerwise_files_name_their_layers_and_refuse_another_unet(tmp_path):
    from lora_diffusion.concepts.layerwise import LayerwiseEmbeddings

    pipe = tiny_pipeline()
    embedding = LayerwiseEmbeddings.create(pipe.tokenizer, pipe.text_encoder, pipe.unet, "<v>", init_word="star",
                                           num_vectors=2)
    assert embedding.vectors.shape == (len(embedding.layers), 2, 32)
    assert embedding.expand("a <v> here") == "a <v> <v>_1 here"
    embedding.save(tmp_path / "v.safetensors")
    loaded = LayerwiseEmbeddings.load(tmp_path / "v.safetensors", pipe.unet)
    assert loaded.layers == embedding.layers and torch.equal(loaded.vectors, embedding.vectors)
    other = load_models("builtin:tiny-xl").unet
    with pytest.raises(ValueError, match="not this U-Net's"):
        LayerwiseEmbeddings.load(tmp_path / "v.safetensors", other)
    with pytest.raises(ValueError, match="not a layer-wise embedding file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
        LayerwiseEmbeddings.load(tmp_path / "x.safetensors")
