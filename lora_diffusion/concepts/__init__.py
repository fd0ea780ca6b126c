"""Multi-concept research pieces (Mix-of-Show's workflow, docs/research.md): gradient fusion of concept LoRAs
(fusion.py). Regional prompts are in models/regional.py; the two-object world and its judge in world/scenes.py."""
