"""Layer-wise token embeddings (P+, Mix-of-Show's ED-LoRA tokens), SD1.x/2.x: a new token has one embedding per
cross-attention layer of the U-Net; the prompt is encoded once per layer with that layer's vectors, and each `attn2`
reads its own encoding. Plain (one-vector) embeddings are core.network.TokenEmbeddings and stay as they are.

    embedding = LayerwiseEmbeddings.create(tokenizer, text_encoder, unet, "<star>", init_word="star")
    embedding.apply_to(tokenizer, text_encoder)                   # the token added to the tokenizer and the table
    contexts = embedding.encode(tokenizer, text_encoder, "a red <star> on a white background")
    with layerwise_attention(unet, contexts):                     # each attn2 reads contexts[its name]
        ...                                                       # the U-Net's calls, e.g. a training step

    embedding.save("star.layerwise.safetensors")
    # in diffusers (a StableDiffusionPipeline; our generate does not read these files yet):
    embedding = load_layerwise_into_pipeline(pipe, "star.layerwise.safetensors")
    images = layerwise_pipeline_call(pipe, embedding, "a red <star> on a white background", num_inference_steps=30)

The file: one tensor per cross-attention layer, keyed by the layer's processor name without `.processor`
(`down_blocks.0.attentions.0.transformer_blocks.0.attn2`), each [vectors, dim]; metadata `token` and `layers`.
"""

import functools
import json
from contextlib import contextmanager

import torch
from torch import nn

from lora_diffusion.core.network import TokenEmbeddings
from lora_diffusion.formats.io import atomic_write
from lora_diffusion.models.regional import cross_attention_processors

FORMAT = "lora_diffusion.layerwise_embeddings"


def cross_attention_layers(unet) -> list[str]:
    """The U-Net's cross-attention layers (`...attn2`), in its processors' order."""
    return [name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn2.processor")]


class LayerwiseEmbeddings(nn.Module):
    """A new token's vectors per cross-attention layer: `vectors` [layers, num_vectors, dim]. The tokens are added
    and read back as core.network.TokenEmbeddings adds a plain embedding's (its checks, names and prompt expansion);
    only the table's rows follow the layer being encoded."""

    def __init__(self, name, layers, vectors):
        super().__init__()
        if vectors.dim() != 3 or vectors.shape[0] != len(layers):
            raise ValueError(f"layer-wise embedding {name!r}: vectors {tuple(vectors.shape)} are not "
                             f"[{len(layers)} layers, vectors, dim]")
        self.name, self.layers = name, list(layers)
        self.vectors = nn.Parameter(vectors.float().clone())
        # the plain embedding of the first layer's vectors: the token names, expand(), adding the tokens
        object.__setattr__(self, "plain", TokenEmbeddings(name, self.vectors[0]))
        self.tokens = self.plain.tokens
        self.first_id = None
        self.current = None  # the layer whose vectors the embedding table gives now
        self.stacked = False  # True: the table's input is every layer's batch in turn (layer 0's rows first)
        self._hooks = []

    @classmethod
    def create(cls, tokenizer, text_encoder, unet, name, init_word=None, num_vectors=1, random_first=None,
               generator=None):
        """Every layer's vectors start as the embedding of `init_word`'s first token (else of `*`); with
        `random_first` (a std, Mix-of-Show's 0.013) and two or more vectors, the first vector is random normal with
        that std instead (Mix-of-Show's `<rand-0.013>+word` initialiser), the same in every layer."""
        table = text_encoder.get_input_embeddings().weight.detach()
        ids = tokenizer.encode(init_word or "*", add_special_tokens=False)
        start = table[ids[0]].float().expand(num_vectors, -1).clone()
        if random_first is not None and num_vectors > 1:
            start[0] = torch.randn(start.shape[1], generator=generator) * random_first
        layers = cross_attention_layers(unet)
        return cls(name, layers, start.expand(len(layers), -1, -1).clone())

    def apply_to(self, tokenizer, text_encoder):
        """Add the tokens to the tokenizer and the embedding table, whose rows then read the current layer's
        vectors (the first layer's outside encode)."""
        first = len(tokenizer)
        with torch.no_grad():
            self.plain.weight.copy_(self.vectors[0])
        self.plain.apply_to(tokenizer, text_encoder)  # checks, adds, resizes, pools at EOS, writes the rows
        self.plain.remove()  # its hook reads one layer's vectors; ours reads the current layer's
        self.first_id = first
        table = text_encoder.get_input_embeddings()
        self._hooks.append(table.register_forward_hook(functools.partial(LayerwiseEmbeddings._rows, self)))
        return self

    def _rows(self, table, args, out):
        offset = args[0] - self.first_id
        new = (offset >= 0) & (offset < len(self.tokens))
        index = offset.clamp(0, len(self.tokens) - 1)
        if self.stacked:  # row r of the ids belongs to layer r // (rows / layers)
            layer = torch.arange(len(offset), device=offset.device) // (len(offset) // len(self.layers))
            rows = self.vectors.to(out.dtype)[layer[:, None], index]
        else:
            rows = self.vectors[self.current or 0].to(out.dtype)[index]
        return torch.where(new.unsqueeze(-1), rows, out)

    def remove(self):
        while self._hooks:
            self._hooks.pop().remove()

    def expand(self, text):
        """A prompt with a multi-vector token written out as its tokens (`<star>` -> `<star> <star>_1`)."""
        return self.plain.expand(text)

    def encode(self, tokenizer, text_encoder, prompt) -> dict[str, torch.Tensor]:
        """{layer: the prompt's last hidden states [1, tokens, dim] with that layer's vectors}."""
        if self.first_id is None:
            raise RuntimeError("apply_to(tokenizer, text_encoder) before encode")
        ids = tokenizer(self.expand(prompt), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
        contexts = {}
        try:
            for index, layer in enumerate(self.layers):
                self.current = index
                contexts[layer] = text_encoder(ids)[0]
        finally:
            self.current = None
        return contexts

    def save(self, path):
        from safetensors.torch import save

        tensors = {layer: self.vectors[i].detach().float().cpu().contiguous() for i, layer in enumerate(self.layers)}
        metadata = {"format": FORMAT, "token": self.name, "layers": json.dumps(self.layers)}
        atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))

    @classmethod
    def load(cls, path, unet=None):
        """The file's embedding; with `unet`, checked to name exactly its cross-attention layers."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path}: not a layer-wise embedding file (metadata format is "
                                 f"{metadata.get('format')!r}, expected {FORMAT!r})")
            layers = json.loads(metadata["layers"])
            vectors = torch.stack([f.get_tensor(layer) for layer in layers])
        if unet is not None and layers != cross_attention_layers(unet):
            raise ValueError(f"{path}: its {len(layers)} layers are not this U-Net's "
                             f"{len(cross_attention_layers(unet))} cross-attention layers (another model?)")
        return cls(metadata["token"], layers, vectors)


class LayerContextProcessor:
    """An attn2's own processor, given its layer's text states instead of the call's."""

    def __init__(self, inner, state, layer):
        self.inner, self.state, self.layer = inner, state, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        context = self.state["contexts"].get(self.layer)
        if context is not None and encoder_hidden_states is not None:
            batch = hidden_states.shape[0]
            negative = self.state["negative"]
            if negative is not None and batch == 2 * context.shape[0]:  # classifier-free guidance's [uncond, cond]
                context = torch.cat([negative.expand_as(context), context])
            encoder_hidden_states = context.expand(batch, -1, -1).to(encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


@contextmanager
def layerwise_attention(unet, contexts, negative=None):
    """Within the block each `attn2` of `unet` reads contexts[its layer] (batch 1, or the call's batch); under
    classifier-free guidance pass the negative prompt's states, which go first in the batch as diffusers puts them."""
    state = {"contexts": contexts, "negative": negative}
    with cross_attention_processors(unet, lambda processor, layer: LayerContextProcessor(processor, state, layer)):
        yield


def load_layerwise_into_pipeline(pipe, path) -> LayerwiseEmbeddings:
    """A layer-wise embedding file into a diffusers StableDiffusionPipeline: its token added to pipe.tokenizer and
    pipe.text_encoder; draw with layerwise_pipeline_call."""
    return LayerwiseEmbeddings.load(path, pipe.unet).apply_to(pipe.tokenizer, pipe.text_encoder)


@torch.no_grad()
def layerwise_pipeline_call(pipe, embedding, prompt, negative_prompt="", guidance_scale=7.5, **kwargs):
    """pipe(...) for one prompt with each cross-attention layer reading the prompt encoded with its own vectors."""
    contexts = embedding.encode(pipe.tokenizer, pipe.text_encoder, prompt)
    ids = pipe.tokenizer(negative_prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    negative = pipe.text_encoder(ids)[0]
    with layerwise_attention(pipe.unet, contexts, negative if guidance_scale > 1 else None):
        return pipe(prompt_embeds=next(iter(contexts.values())), negative_prompt_embeds=negative,
                    guidance_scale=guidance_scale, **kwargs)
