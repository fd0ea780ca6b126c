"""Write the ED-LoRA example's images: 8 rings of the shapes world (a shape builtin:mini has never seen) at 64 px,
each an RGBA PNG whose alpha is the ring's mask (the subject mask of --alpha_mask), captioned with the concept's
token. Run from the repository root: python examples/mix_of_show/make_data.py (the files are in the repository)."""

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from lora_diffusion.world.scenes import caption, render, sample_scene

FOLDER = Path(__file__).parent / "data" / "10_ring"


def main(count=8, seed=0):
    FOLDER.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = sample_scene(rng, shapes=("ring",))
        image = np.asarray(render(scene))
        mask = np.asarray(render(replace(scene, color="white", background="black")).convert("L"))
        alpha = ((mask.astype(np.float32) - 20) / (245 - 20) * 255).clip(0, 255).astype(np.uint8)
        stem = f"{index:02d}_{scene.color}_ring"
        Image.fromarray(np.dstack([image, alpha]), "RGBA").save(FOLDER / f"{stem}.png")
        (FOLDER / f"{stem}.txt").write_text(caption(scene).replace(" ring ", " <ring> ") + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
