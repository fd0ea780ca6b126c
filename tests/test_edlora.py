"""ED-LoRA training (concepts/edlora.py, --layerwise_embeddings, --attn_reg_weight, --embedding_norm_threshold):
the U-Net's attn2 layers read the states encoded with their own vectors in a training call, the attention loss is
the formula written out here, the norm freeze keeps the vectors from the step that crosses the threshold, and the
example recipe trains through train_lora.py into a file diffusers draws with."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train_lora
from lora_diffusion.concepts import (
    ConceptAttention,
    ConceptAttnProcessor,
    LayerwiseEmbeddings,
    LayerwiseTokenEmbeddings,
    concept_attention,
    cross_attention_layers,
    edlora,
    layerwise_attention,
    load_layerwise_into_pipeline,
    norm_freeze,
)
from lora_diffusion.models import load_models
from lora_diffusion.options.flag_file import read_config_file
from lora_diffusion.training.trainer import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mix_of_show"
MINI = ROOT / "lora_diffusion" / "assets" / "mini"


def random_layerwise(models, name="<v>", vectors=2, seed=0):
    layers = cross_attention_layers(models.unet)
    values = torch.randn(len(layers), vectors, 64, generator=torch.Generator().manual_seed(seed)) * 0.3
    return LayerwiseEmbeddings(name, layers, values).apply_to(models.tokenizer, models.text_encoder)


def test_a_training_call_gives_each_attn2_the_states_of_its_own_vectors_and_their_gradients():
    models = load_models("builtin:mini")
    layerwise = random_layerwise(models)
    prompts = ["a red circle on a white background", layerwise.expand("a <v> on a white background")]
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([500, 500])
    original = models.unet.attn_processors
    with concept_attention(models, layerwise):
        states = models.family.encode_prompts(models, prompts)  # the loop's encode: the first layer's states
        ours = models.unet(latents, timesteps, states).sample
    assert models.unet.attn_processors == original and not type(models.family).__name__.startswith("Layerwise")

    # by hand: the research API's per-layer contexts (the plain prompt's are the same in every layer)
    with torch.no_grad():
        plain = models.family.encode_prompts(models, prompts[:1])
        token = layerwise.encode(models.tokenizer, models.text_encoder, "a <v> on a white background")
        contexts = {layer: torch.cat([plain, token[layer]]) for layer in layerwise.layers}
        with layerwise_attention(models.unet, contexts):
            expected = models.unet(latents, timesteps, states.detach()).sample
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(token[layerwise.layers[0]], token[layerwise.layers[-1]])

    ours.square().mean().backward()
    grad = layerwise.vectors.grad
    assert grad is not None and (grad.abs().sum(-1) > 0).all()  # every layer's vectors, both tokens


def test_rows_are_found_by_their_values_whatever_the_batch_order():
    """Classifier-free guidance puts [negative, prompt] in one U-Net batch: each row gets its own encoding."""
    models = load_models("builtin:mini")
    layerwise = random_layerwise(models, seed=3)
    prompt = layerwise.expand("a <v> on a black background")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), concept_attention(models, layerwise):
        states = models.family.encode_prompts(models, [prompt, ""])
        batch = models.unet(latents.expand(2, -1, -1, -1), torch.tensor([300, 300]), states.flip(0)).sample
        alone = models.unet(latents, torch.tensor([300]), states[:1]).sample
    torch.testing.assert_close(batch[1:], alone, rtol=1e-5, atol=1e-5)


def hand_attention(attn, hidden, context, heads):
    """Softmax(Q K^T / sqrt(d)) per head, [heads, pixels, tokens], written out."""
    q, k = hidden @ attn.to_q.weight.T, context @ attn.to_k.weight.T
    d = q.shape[-1] // heads
    return torch.stack([torch.softmax(q[:, h * d:(h + 1) * d] @ k[:, h * d:(h + 1) * d].T / math.sqrt(d), -1)
                        for h in range(heads)])


def test_the_attention_loss_is_the_formula_written_out():
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=4, cross_attention_dim=3, heads=2, dim_head=2)
    attn.set_processor(AttnProcessor())
    concept = ConceptAttention(None, None, record=True)
    concept.latent_size, concept.contexts = (2, 2), None
    # vector 0 of the token at position 1 of 3 (row 0 holds it); vector 1 absent
    concept.positions = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    processor = ConceptAttnProcessor(AttnProcessor(), concept, "layer")
    fine = [torch.randn(1, 4, 4) for _ in range(2)]  # two layers at the 2x2 grid
    coarse = torch.randn(1, 1, 4)  # one at 1x1
    contexts = [torch.randn(1, 3, 3) for _ in range(3)]
    for hidden, context in zip([*fine, coarse], contexts):
        plain = attn(hidden, encoder_hidden_states=context)
        attn.set_processor(processor)
        torch.testing.assert_close(attn(hidden, encoder_hidden_states=context), plain)  # the same attention
        attn.set_processor(AttnProcessor())
    mask = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    loss = concept.attention_loss(mask)

    # by hand: mean over heads of the column of the token; layers of one resolution averaged; / max; vs the mask
    # averaged over each cell's 2x2 pixels (and over all 16 pixels for the 1x1 grid)
    with torch.no_grad():
        maps_fine = [hand_attention(attn, h[0], c[0], 2)[:, :, 1].mean(0) for h, c in zip(fine, contexts)]
        m_fine = (maps_fine[0] + maps_fine[1]) / 2
        m_coarse = hand_attention(attn, coarse[0], contexts[2][0], 2)[:, :, 1].mean(0)
        cells = torch.tensor([(1 + 1 + 1 + 0) / 4, 0.0, 0.0, (0 + 1 + 1 + 1) / 4])
        fine_error = ((m_fine / m_fine.max() - cells) ** 2).mean()
        coarse_error = ((m_coarse / m_coarse.max() - mask.mean()) ** 2).mean()
        expected = (fine_error + coarse_error) / 2
    torch.testing.assert_close(loss, expected)
    assert loss.requires_grad


def test_the_norm_freeze_keeps_the_vectors_from_the_step_that_crosses_the_threshold():
    from types import SimpleNamespace

    from lora_diffusion.concepts.edlora import mean_norm

    models = load_models("builtin:mini")
    embedding = LayerwiseTokenEmbeddings(random_layerwise(models))
    start = mean_norm(embedding)
    hook = norm_freeze(embedding, start + 0.01, say=lambda text: None)
    optimizer = torch.optim.AdamW(embedding.parameters(), lr=1e-3, weight_decay=0.0)
    history, state = [], SimpleNamespace(step=0)
    for _ in range(12):
        if embedding.trainable:
            (-embedding.weight.norm(dim=-1).mean()).backward()  # pushes the norms up
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        hook(None, state)
        history.append((mean_norm(embedding), embedding.trainable, embedding.weight.detach().clone()))
    crossed = next(i for i, (norm, _, _) in enumerate(history) if norm >= start + 0.01)
    assert 0 < crossed < 11 and all(norm < start + 0.01 for norm, _, _ in history[:crossed])
    assert [trainable for _, trainable, _ in history] == [True] * crossed + [False] * (12 - crossed)
    assert all(torch.equal(vectors, history[crossed][2]) for _, _, vectors in history[crossed:])


def example_flags(tmp_path, **overrides):
    """The example config's recipe as flags, on a copy of its data, for a few steps."""
    data = tmp_path / "data"
    shutil.copytree(EXAMPLE / "data", data)
    (tmp_path / "prompts.txt").write_text("a red <ring> on a white background --w 64 --h 64 --s 2 --d 1\n")
    flags = dict(config_file=EXAMPLE / "edlora.toml", train_data_dir=data, output_dir=tmp_path / "out",
                 max_train_steps=2, sample_prompts=tmp_path / "prompts.txt", max_data_loader_n_workers=0)
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return argv


def test_the_example_recipe_trains_and_diffusers_draws_with_its_layerwise_file(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    import lora_diffusion.models

    recipe = read_config_file(EXAMPLE / "edlora.toml", build_parser())
    assert (recipe["network_dim"], recipe["embedding_lr"], recipe["text_encoder_lr"], recipe["unet_lr"]) == \
        (4, 1e-3, [1e-5], 1e-4)
    kept, real = [], lora_diffusion.models.load_models
    monkeypatch.setattr(lora_diffusion.models, "load_models",
                        lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
    losses, matches, real_loss, real_match = [], [], edlora.attention_loss, edlora.ConceptAttention.match
    monkeypatch.setattr(edlora, "attention_loss", lambda *a: losses.append(real_loss(*a)) or losses[-1])

    def match(self, states):
        found = real_match(self, states)
        matches.append((torch.is_grad_enabled(), found[0] is not None))
        return found

    monkeypatch.setattr(edlora.ConceptAttention, "match", match)
    assert train_lora.main(example_flags(tmp_path)) == 0
    assert len(losses) == 2 and all(loss.item() > 0 and loss.requires_grad for loss in losses)  # a step each
    assert (True, True) in matches and (False, True) in matches  # training and sampling calls read the layers
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("ring*.safetensors")) == \
        ["ring.layerwise.safetensors", "ring.safetensors", "ring_emb.safetensors"]
    assert list((out / "sample").glob("*.png"))

    # only the new rows of the trainer's token table differ from the base model's, bit for bit the others
    [models] = kept
    fresh = real("builtin:mini").text_encoder.get_input_embeddings().weight
    table = models.text_encoder.get_input_embeddings().weight
    assert table.shape[0] == fresh.shape[0] + 2 and torch.equal(table[:fresh.shape[0]], fresh)

    trained = LayerwiseEmbeddings.load(out / "ring.layerwise.safetensors")
    assert trained.vectors.shape == (16, 2, 64) and trained.tokens == ["<ring>", "<ring>_1"]
    assert not torch.allclose(trained.vectors[0], trained.vectors[-1])  # the layers trained apart

    def draw(with_file):
        pipe = StableDiffusionPipeline.from_pretrained(MINI, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        from lora_diffusion.concepts import layerwise_pipeline_call

        settings = dict(height=64, width=64, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                        generator=torch.Generator().manual_seed(0))
        if not with_file:
            return pipe("a red <ring> <ring>_1 on a white background", **settings).images
        embedding = load_layerwise_into_pipeline(pipe, out / "ring.layerwise.safetensors")
        return layerwise_pipeline_call(pipe, embedding, "a red <ring> on a white background", **settings).images

    with_file, without = draw(True), draw(False)
    assert np.isfinite(with_file).all() and np.abs(with_file - without).max() > 1e-3


@pytest.mark.parametrize("flags, message", [
    (dict(layerwise_embeddings=True), "needs --token_string"),
    (dict(token_string="<v>", attn_reg_weight=0.1), "needs --layerwise_embeddings"),
    (dict(token_string="<v>", embedding_norm_threshold=0), "must be > 0"),
    (dict(token_string="<v>", layerwise_embeddings=True, weighted_captions=True), "exclude each other"),
])
def test_the_flags_are_checked_before_any_work(tmp_path, flags, message, capsys):
    argv = ["--pretrained_model_name_or_path", "builtin:mini", "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out")]
    for key, value in flags.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    assert train_lora.main(argv) == 2
    assert message in capsys.readouterr().err
