"""Regional prompts (Mix-of-Show's regionally controllable sampling): each region's prompt is what the U-Net's
cross-attention (`attn2`) reads inside its box, at every attention resolution; outside every box it reads the global
prompt. Nothing else changes: self-attention, the ResNets and SDXL's pooled text and time ids see the global prompt.

    regions = [Region("a red star", (0, 0, 0.5, 1)), Region("a blue ring", (0.5, 0, 1, 1))]
    sample_images(models, prompts=[...], regions=regions, out_dir=...)      # models.sampling, any family

or on any diffusers pipeline, with the region prompts' embeddings (batch 1 each) made by the caller:

    contexts = [RegionContext(embeds, negative_embeds, box) for ...]
    with regional_attention(pipe.unet, contexts, latent_size=(h // 8, w // 8), guidance=scale > 1):
        pipe(prompt_embeds=..., negative_prompt_embeds=..., guidance_scale=scale, ...)

Each attn2 runs its own processor (so LoRA layers on to_k/to_v apply) once for the global context and once per
region; a token inside a box takes that region's output (a later region wins where boxes overlap).
"""

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """A prompt and its box (x0, y0, x1, y1) as fractions of the image's width and height, from the top left."""

    prompt: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class RegionContext:
    """A region's encoded prompt: the conditional and unconditional text states (batch 1) and its box."""

    embeds: torch.Tensor
    negative_embeds: torch.Tensor
    box: tuple[float, float, float, float]


_SPEC = re.compile(r"^(?P<prompt>.+)@(?P<box>[^@]+)$", re.S)


def parse_region(spec: str) -> Region:
    """`prompt@x0,y0,x1,y1` (fractions 0..1, x0 < x1, y0 < y1) -> Region; ValueError naming --region otherwise."""
    match = _SPEC.match(spec.strip())
    expected = "expected PROMPT@x0,y0,x1,y1 with fractions of the image, e.g. 'a red star@0,0,0.5,1'"
    if not match or not match["prompt"].strip():
        raise ValueError(f"--region {spec!r}: {expected}")
    try:
        box = tuple(float(v) for v in match["box"].split(","))
    except ValueError:
        raise ValueError(f"--region {spec!r}: the box {match['box']!r} is not four numbers; {expected}") from None
    return Region(match["prompt"].strip(), check_box(box, spec))


def check_box(box, what) -> tuple[float, float, float, float]:
    if len(box) != 4 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box):
        raise ValueError(f"--region {what!r}: the box needs four fractions between 0 and 1, got {box}")
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"--region {what!r}: the box needs x0 < x1 and y0 < y1, got {box}")
    return tuple(float(v) for v in box)


def box_mask(box, height, width, device=None) -> torch.Tensor:
    """[height * width] booleans, row-major: the grid cells whose centres lie in the box."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return inside.reshape(-1)


def attention_grid(tokens, latent_size) -> tuple[int, int]:
    """The (height, width) of an attention layer's token grid: the latent halved (rounding up, as the U-Net's
    strided convolutions do) until it holds `tokens` cells."""
    height, width = latent_size
    while height * width > tokens:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != tokens:
        raise ValueError(f"regional prompts: an attention layer has {tokens} tokens, which is no downscale of the "
                         f"latent's {latent_size[0]}x{latent_size[1]}")
    return height, width


class RegionalState:
    """What the regional processors of one U-Net share during a call: the regions and the latent's size."""

    def __init__(self, contexts, latent_size, guidance):
        self.contexts, self.latent_size, self.guidance = list(contexts), tuple(latent_size), guidance
        self._masks = {}

    def context(self, region: RegionContext, batch, like):
        """The region's text states for a U-Net batch: [unconditional..., conditional...] under classifier-free
        guidance (diffusers' order), else conditional only."""
        if self.guidance:
            half = batch // 2
            states = torch.cat([region.negative_embeds.expand(half, -1, -1), region.embeds.expand(half, -1, -1)])
        else:
            states = region.embeds.expand(batch, -1, -1)
        return states.to(device=like.device, dtype=like.dtype)

    def mask(self, index, tokens, device):
        key = (index, tokens, device)
        if key not in self._masks:
            height, width = attention_grid(tokens, self.latent_size)
            self._masks[key] = box_mask(self.contexts[index].box, height, width, device)
        return self._masks[key]


class RegionalAttnProcessor:
    """An attn2's own processor, run for the global context and for each region's, mixed by the regions' masks."""

    def __init__(self, inner, state: RegionalState):
        self.inner, self.state = inner, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            return out
        batch, tokens = hidden_states.shape[:2]
        for index, region in enumerate(self.state.contexts):
            states = self.state.context(region, batch, encoder_hidden_states)
            region_out = self.inner(attn, hidden_states, states, None, *args, **kwargs)
            out = torch.where(self.state.mask(index, tokens, out.device)[None, :, None], region_out, out)
        return out


@contextmanager
def cross_attention_processors(unet, wrap):
    """Within the block every cross-attention (`attn2`) of `unet` runs `wrap(its processor, its layer name)` (the
    name without `.processor`, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`); the U-Net's own
    processors are restored afterwards. The one seam of regional prompts, layer-wise embeddings and ED-LoRA."""
    original = unet.attn_processors
    unet.set_attn_processor({name: wrap(processor, name.removesuffix(".processor"))
                             if name.endswith("attn2.processor") else processor
                             for name, processor in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


@contextmanager
def regional_attention(unet, contexts, *, latent_size, guidance):
    """Within the block, every cross-attention (`attn2`) of `unet` follows the regions (RegionContext list);
    `latent_size` (height, width) of the latents, `guidance`: whether the batch is classifier-free guidance's
    [unconditional, conditional]. The U-Net's own processors are restored afterwards."""
    if not contexts:
        yield
        return
    state = RegionalState(contexts, latent_size, guidance)
    with cross_attention_processors(unet, lambda processor, _layer: RegionalAttnProcessor(processor, state)):
        yield


def encode_regions(models, pipeline, regions, negative_prompt, *, expand, clip_skip=None, max_token_length=None,
                   device="cpu") -> list[RegionContext]:
    """Each Region's prompt encoded as the family encodes a prompt for sampling (SD1.x/2.x: the training text path;
    SDXL: its pipeline's encode_prompt), with the run's negative prompt as its unconditional half."""
    contexts = []
    for region in regions:
        inputs = models.family.prompt_inputs(models, region.prompt, negative_prompt, expand=expand,
                                             clip_skip=clip_skip, max_token_length=max_token_length, device=device)
        if "prompt_embeds" in inputs:
            embeds, negative = inputs["prompt_embeds"], inputs["negative_prompt_embeds"]
        else:  # the family passes text: the pipeline's own encoding, as its __call__ would do it
            embeds, negative = pipeline.encode_prompt(prompt=inputs["prompt"],
                                                      negative_prompt=inputs["negative_prompt"], device=device,
                                                      num_images_per_prompt=1, do_classifier_free_guidance=True)[:2]
        contexts.append(RegionContext(embeds, negative, region.box))
    return contexts
