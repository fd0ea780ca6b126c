"""ED-LoRA training pieces (Mix-of-Show's concept LoRAs), SD1.x/2.x: layer-wise token embeddings in a training run,
the attention-regularisation loss and the embedding-norm freeze. The trainer wires them with
`--layerwise_embeddings`, `--attn_reg_weight` and `--embedding_norm_threshold` (examples/mix_of_show/edlora.toml);
research code uses them directly:

    layerwise = LayerwiseEmbeddings.create(tokenizer, text_encoder, unet, "<ring>", init_word="ring",
                                           num_vectors=2, random_first=0.013).apply_to(tokenizer, text_encoder)
    embedding = network.add_embedding(LayerwiseTokenEmbeddings(layerwise))   # trains, saves, resumes with the LoRA
    with concept_attention(models, layerwise, record=True) as concept:      # for the run: encode and U-Net calls
        ...                                  # each text encoding runs once per layer; each attn2 reads its own
        loss = loss + weight * concept.attention_loss(batch["alpha_masks"])  # after the U-Net call
    norm_freeze(embedding, 0.55)(run, state)                                 # after an optimizer step

How the layers get their encodings without a change to the loop: while `concept_attention` is active the models'
family encodes every prompt once per cross-attention layer (the table's new rows read that layer's vectors) and
returns the first layer's states, as a plain embedding would; a forward pre-hook on the U-Net finds, for each row of
the states it is given, the encoding it came from (the closest recorded encoding within 1 % of the row's largest
value, preferring one with gradients in a training step and the newest) and hands each attn2 its own layer's rows.
Rows of prompts without the token are left as they are (every layer's states are the same for them).

Attention regularisation (Mix-of-Show's attention loss, in the form written out in tests/test_edlora.py): in a
training call each attn2 computes its attention probabilities A [batch, heads, pixels, tokens]; for each vector j of
the token, the map M_j = mean over heads and over the token's positions of A[..., position]; the maps of the layers
of one resolution are averaged, divided by their maximum over the pixels, and compared with the subject mask
area-downsampled to that resolution: loss = mean over resolutions of the mean over (rows holding the token, vectors)
of mean_pixels (M_j / max M_j - mask)^2.
"""

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_diffusion.core.network import TokenEmbeddings
from lora_diffusion.models.regional import attention_grid, cross_attention_processors
from lora_diffusion.models.text import tokenize_captions

from .layerwise import LayerwiseEmbeddings

MATCH_TOLERANCE = 1e-2  # a row is an encoding's if it is within this share of the row's largest value (fp16/bf16)
RANDOM_FIRST_STD = 0.013  # Mix-of-Show's `<rand-0.013>`: the first token's vector starts random with this std


class LayerwiseTokenEmbeddings(TokenEmbeddings):
    """A LayerwiseEmbeddings as the network carries a new token (LoRANetwork.add_embedding): its one parameter
    `weight` is the layer-wise vectors [layers, vectors, dim] (trained, frozen, saved in the training state and
    resumed as any embedding's); the LoRA file and `<output_name>_emb.safetensors` hold their mean over the layers
    (one vector per token, for readers of plain embeddings); the layer-wise file is LayerwiseEmbeddings.save."""

    def __init__(self, layerwise: LayerwiseEmbeddings):
        torch.nn.Module.__init__(self)
        self.name = layerwise.name
        self.register_parameter("weight", layerwise.vectors)
        object.__setattr__(self, "layerwise", layerwise)
        object.__setattr__(self, "_hooks", [])

    @property
    def num_vectors(self) -> int:
        return self.weight.shape[1]

    def remove(self):
        self.layerwise.remove()

    def file_tensors(self, *, bundled: bool) -> dict[str, torch.Tensor]:
        return {"string_to_param.*" if bundled else "emb_params": self.weight.detach().mean(0)}

    def load_vectors(self, vectors, source):
        """A file's vectors: layer-wise [layers, vectors, dim], or one set [vectors, dim] that every layer starts
        from (a plain embedding, the mean a LoRA file bundles)."""
        if isinstance(vectors, torch.Tensor) and vectors.dim() == 2:
            vectors = vectors.expand(self.weight.shape[0], -1, -1)
        if not isinstance(vectors, torch.Tensor) or vectors.shape != self.weight.shape:
            raise ValueError(f"{source}: the embedding {self.name!r} has {getattr(vectors, 'shape', vectors)}, this "
                             f"run's is layer-wise {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(vectors)


def mean_norm(embedding) -> float:
    """The mean L2 norm of an embedding's vectors (every layer's and vector's)."""
    return float(torch.stack([p.detach().float().norm(dim=-1).mean() for p in embedding.parameters()]).mean())


def norm_freeze(embedding, threshold: float, say=print):
    """A step hook (Run.step_hooks): once the vectors' mean norm is >= `threshold` after a step, they are kept as
    they are for the rest of the run (Mix-of-Show stops the embeddings' growth so; --embedding_norm_threshold)."""

    def hook(run, state):
        if embedding.trainable and mean_norm(embedding) >= threshold:
            embedding.freeze()
            say(f"step {state.step}: the embedding's mean norm {mean_norm(embedding):.4f} reached "
                f"--embedding_norm_threshold {threshold}; it is kept from here on")

    return hook


@dataclass
class Encoding:
    """One per-layer encoding of captions: the first layer's states (detached), every layer's, the token's
    positions [captions, vectors, tokens] (weights summing to 1 over the tokens, 0 where a vector is absent)."""

    base: torch.Tensor
    layers: dict
    positions: torch.Tensor
    grad: bool


def state_token_ids(tokenizer, captions, max_token_length=None) -> torch.Tensor:
    """The token id behind each of encode_prompts' states [captions, states] (windows joined as it joins them)."""
    ids = tokenize_captions(tokenizer, captions, max_token_length=max_token_length)
    if ids.shape[1] == 1:
        return ids[:, 0]
    return torch.cat([ids[:, 0, :1], ids[:, :, 1:-1].reshape(len(ids), -1), ids[:, -1, -1:]], dim=1)


class ConceptAttention:
    """The shared state of one U-Net's ED-LoRA processors: recent per-layer encodings, the current call's
    per-layer states and token positions, and (when recording) the attention maps of the call."""

    def __init__(self, embedding: LayerwiseEmbeddings, tokenizer, *, record=False, keep=4):
        self.embedding, self.tokenizer, self.record = embedding, tokenizer, record
        self.encodings = deque(maxlen=keep)
        self.contexts = None  # {layer: [batch, tokens, dim]} of the current U-Net call, or None
        self.positions = None  # [batch, vectors, tokens] of the current U-Net call
        self.latent_size = None
        self.maps = []  # (pixels, [batch, vectors, pixels]) per attn2 of the current training call

    # -- text -------------------------------------------------------------------------------------------------

    def encode(self, encode, captions, max_token_length=None):
        """`encode(captions)` with each layer's vectors, in one text-encoder batch (the captions once per layer);
        the first layer's states, recorded."""
        embedding = self.embedding
        ids = state_token_ids(self.tokenizer, captions, max_token_length)
        offsets = torch.arange(len(embedding.tokens))
        present = (ids[:, None, :] == embedding.first_id + offsets[None, :, None]).float()
        if not present.any():
            return encode(captions)
        embedding.stacked = True
        try:
            every = encode(list(captions) * len(embedding.layers))
        finally:
            embedding.stacked = False
        count = len(captions)
        layers = {layer: every[i * count:(i + 1) * count] for i, layer in enumerate(embedding.layers)}
        states = base = layers[embedding.layers[0]]
        positions = present / present.sum(-1, keepdim=True).clamp_min(1)
        self.encodings.append(Encoding(states.detach(), layers, positions, states.requires_grad))
        return base

    # -- the U-Net call ---------------------------------------------------------------------------------------

    def before_unet(self, unet, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        states = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        self.latent_size, self.maps = tuple(sample.shape[-2:]), []
        self.contexts, self.positions = self.match(states) if states is not None else (None, None)

    def match(self, states):
        """Each row of the U-Net's text states -> (encoding, row) it came from, or None; the per-layer states."""
        grad = torch.is_grad_enabled()
        found = []
        for row in states.detach():
            best = None
            for age, encoding in enumerate(reversed(self.encodings)):
                if encoding.base.shape[1:] != row.shape:
                    continue
                base = encoding.base.to(row)
                distance = (base - row).abs().amax((1, 2)) / row.abs().amax().clamp_min(1e-6)
                for index, d in enumerate(distance.tolist()):
                    key = (encoding.grad != grad, d, age)
                    if d < MATCH_TOLERANCE and (best is None or key < best[0]):
                        best = (key, encoding, index)
            found.append(best[1:] if best else None)
        if not any(found):
            return None, None
        contexts = {layer: torch.stack([hit[0].layers[layer][hit[1]].to(row) if hit else row
                                        for row, hit in zip(states, found)]) for layer in self.embedding.layers}
        absent = torch.zeros_like(next(hit for hit in found if hit)[0].positions[0])
        positions = torch.stack([hit[0].positions[hit[1]] if hit else absent for hit in found]).to(states.device)
        if grad:  # a training encoding serves one U-Net call: its graph is not kept for later calls
            used = {id(hit[0]) for hit in found if hit and hit[0].grad}
            self.encodings = deque((e for e in self.encodings if id(e) not in used), maxlen=self.encodings.maxlen)
        return contexts, positions

    def add_map(self, probs, heads):
        """Record an attn2's attention probabilities [batch * heads, pixels, tokens] at the token's positions."""
        batch = probs.shape[0] // heads
        probs = probs.reshape(batch, heads, *probs.shape[1:]).mean(1)  # [batch, pixels, tokens]
        maps = torch.einsum("bpt,bvt->bvp", probs.float(), self.positions.float())
        self.maps.append((probs.shape[1], maps))

    # -- the loss ---------------------------------------------------------------------------------------------

    def attention_loss(self, mask):
        """The attention loss of the last training call against `mask` [batch, H, W] in [0, 1] (pixels); 0 when
        no row held the token."""
        if not self.maps or self.positions is None:
            return torch.zeros(())
        return attention_loss(self.maps, self.positions, mask, self.latent_size)


def attention_loss(maps, positions, mask, latent_size):
    """maps: (pixels, [batch, vectors, pixels]) per layer; positions [batch, vectors, tokens]; mask [batch, H, W]."""
    present = (positions.sum(-1) > 0).float()  # [batch, vectors]
    by_size = {}
    for pixels, layer_maps in maps:
        by_size.setdefault(pixels, []).append(layer_maps)
    total = 0.0
    for pixels, layer_maps in by_size.items():
        height, width = attention_grid(pixels, latent_size)
        average = torch.stack(layer_maps).mean(0)
        normalised = average / average.amax(-1, keepdim=True).clamp_min(1e-8)
        target = F.interpolate(mask.to(average)[:, None], size=(height, width), mode="area").reshape(len(mask), 1, -1)
        error = ((normalised - target) ** 2).mean(-1)  # [batch, vectors]
        total = total + (error * present).sum() / present.sum().clamp_min(1)
    return total / len(by_size)


def attention_with_probs(attn, hidden_states, context, attention_mask=None):
    """diffusers' classic attention (AttnProcessor) on [batch, pixels, dim] states, returning the probabilities."""
    batch = context.shape[0]
    attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
    probs = attn.get_attention_scores(query, key, attention_mask)
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor, probs


class ConceptAttnProcessor:
    """An attn2's own processor, given its layer's states; in a training call with the token present, attention
    computed here so that its probabilities are recorded (the loss needs them; SDPA does not give them)."""

    def __init__(self, inner, concept: ConceptAttention, layer):
        self.inner, self.concept, self.layer = inner, concept, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        concept = self.concept
        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if concept.contexts is not None and concept.contexts[self.layer].shape[0] == encoder_hidden_states.shape[0]:
            encoder_hidden_states = concept.contexts[self.layer].to(encoder_hidden_states)
        if (concept.record and torch.is_grad_enabled() and concept.positions is not None and hidden_states.ndim == 3
                and attn.spatial_norm is None and attn.group_norm is None and concept.positions.any()):
            out, probs = attention_with_probs(attn, hidden_states, encoder_hidden_states, attention_mask)
            concept.add_map(probs, attn.heads)
            return out
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def layerwise_family(family, concept: ConceptAttention):
    """The models' family with encode_prompts running once per layer (ConceptAttention.encode)."""
    base = type(family)

    class Layerwise(base):
        def encode_prompts(self, models, captions, *, clip_skip=None, max_token_length=None):
            def encode(texts):
                return base.encode_prompts(self, models, texts, clip_skip=clip_skip,
                                           max_token_length=max_token_length)

            return concept.encode(encode, captions, max_token_length)

    Layerwise.__name__ = Layerwise.__qualname__ = f"Layerwise{base.__name__}"
    layerwise = Layerwise.__new__(Layerwise)
    layerwise.__dict__.update(family.__dict__)
    return layerwise


@contextmanager
def concept_attention(models, embedding: LayerwiseEmbeddings, *, record=False):
    """Within the block, `models` (SD1.x/2.x SDModels) encode prompts once per layer of `embedding` and each attn2
    reads its own layer's states, in training, validation and sampling alike; `record`: training calls record the
    attention maps for ConceptAttention.attention_loss. Yields the ConceptAttention."""
    if models.family.name == "sdxl":
        raise ValueError("layer-wise embeddings are SD1.x/2.x only (SDXL's two text encoders are not done yet)")
    concept = ConceptAttention(embedding, models.tokenizer, record=record)
    family = models.family
    models.family = layerwise_family(family, concept)
    hook = models.unet.register_forward_pre_hook(concept.before_unet, with_kwargs=True)
    try:
        with cross_attention_processors(models.unet, lambda inner, layer: ConceptAttnProcessor(inner, concept,
                                                                                               layer)):
            yield concept
    finally:
        hook.remove()
        models.family = family


def attention_term(concept: ConceptAttention, weight: float):
    """A loss term (Run.loss_terms): `weight` x the attention loss of the micro-batch's U-Net call against its
    subject mask (the batch's `alpha_masks`, pixels)."""

    def term(run, batch):
        mask = batch.get("alpha_masks")
        if mask is None:
            return torch.zeros((), device=run.device)
        return weight * concept.attention_loss(mask.to(run.device)).to(run.device)

    return term
