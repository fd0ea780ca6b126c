"""A multi-vector token read back through load_network: the route that uses all its vectors is
network.expand_prompt (diffusers' load_textual_inversion rewrites prompts in the tokenizer call instead)."""

import torch

from lora_diffusion import TokenEmbeddings
from lora_diffusion.models import load_models


def states(models, prompt):
    ids = models.tokenizer(prompt, padding="max_length", max_length=models.tokenizer.model_max_length,
                           return_tensors="pt").input_ids
    with torch.no_grad():
        return models.text_encoder(ids)[0]


def test_unexpanded_prompt_reads_only_the_first_vector():
    models = load_models("builtin:tiny")
    dim = models.text_encoder.get_input_embeddings().embedding_dim
    first, second = torch.randn(dim) * 3, torch.randn(dim) * 3
    embedding = TokenEmbeddings("sks", torch.stack([first, second])).apply_to(models.tokenizer, models.text_encoder)
    assert embedding.expand("a sks toy") == "a sks sks_1 toy"
    # written out by hand: the ids of `sks sks_1` are the two new rows, in order
    ids = models.tokenizer("a sks sks_1 toy", add_special_tokens=False).input_ids
    table = models.text_encoder.get_input_embeddings()
    torch.testing.assert_close(table(torch.tensor(ids))[1:3], torch.stack([first, second]))
    plain, expanded = states(models, "a sks toy"), states(models, embedding.expand("a sks toy"))
    assert (plain - expanded).abs().max() > 1e-3  # without expand, `sks_1` (the second vector) is never read
    assert len(models.tokenizer("a sks toy", add_special_tokens=False).input_ids) == len(ids) - 1
