"""Multi-concept research pieces (Mix-of-Show's workflow, docs/research.md): ED-LoRA training (edlora.py: layer-wise
embeddings in a run, the attention loss, the norm freeze; the trainer's --layerwise_embeddings), gradient fusion of
concept LoRAs (fusion.py, the `fuse` tool in tools/fuse.py), the baselines it is compared with (baselines.py: TIES,
DARE; stacking and weighted merges are generate and tools/merge), and layer-wise token embeddings (layerwise.py,
P+). Regional prompts are in models/regional.py; the two-object world and its judge in world/scenes.py and
world/quality.py.

The ED-LoRA and layer-wise names are importable from here; fusion and baselines from their modules."""

from .edlora import (
    ConceptAttention,
    ConceptAttnProcessor,
    LayerwiseTokenEmbeddings,
    attention_loss,
    attention_term,
    concept_attention,
    mean_norm,
    norm_freeze,
)
from .layerwise import (
    LayerwiseEmbeddings,
    cross_attention_layers,
    layerwise_attention,
    layerwise_pipeline_call,
    load_layerwise_into_pipeline,
)

__all__ = ["ConceptAttention", "ConceptAttnProcessor", "LayerwiseEmbeddings", "LayerwiseTokenEmbeddings",
           "attention_loss", "attention_term", "concept_attention", "cross_attention_layers", "layerwise_attention",
           "layerwise_pipeline_call", "load_layerwise_into_pipeline", "mean_norm", "norm_freeze"]
