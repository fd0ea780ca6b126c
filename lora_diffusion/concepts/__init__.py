"""Multi-concept research pieces (Mix-of-Show's workflow, docs/research.md): gradient fusion of concept LoRAs
(fusion.py, the `fuse` tool in tools/fuse.py), the baselines it is compared with (baselines.py: TIES, DARE; stacking
and weighted merges are generate and tools/merge), and layer-wise token embeddings (layerwise.py, P+). Regional
prompts are in models/regional.py; the two-object world and its judge in world/scenes.py and world/quality.py."""
