"""A feature network for the shapes world, shipped with the package: FID and KID on `builtin:mini` images without
downloading Inception (which has never seen this world and would measure mostly blur).

A small CNN trained on rendered scenes (all four shapes, every colour pair, blurred and noisy like generated
images) to tell shape, colour and background and to read size and position; its 64 pooled features are what
FID/KID compare.

    features = load_world_features()           # nn.Module: uint8 images [N, 3, H, W] -> [N, 64]
    python -m lora_diffusion.world.features    # retrain it (about 5 minutes on one CPU core) and write the asset
"""

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lora_diffusion.formats.io import atomic_write

from . import scenes as world

WEIGHTS = Path(__file__).parents[1] / "assets" / "world_features.safetensors"
FEATURES = 64


class WorldFeatures(nn.Module):
    """uint8 (0-255) or float (0-1) RGB images [N, 3, H, W] of any size -> [N, FEATURES] (resized to 64 px)."""

    num_features = FEATURES

    def __init__(self):
        super().__init__()
        widths = (3, 32, 64, 128, 128)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in widths[1:])
        self.project = nn.Linear(widths[-1], FEATURES)
        n = len(world.SHAPES) + 2 * len(world.COLORS) + 3
        self.heads = nn.Linear(FEATURES, n)  # training only: shape, colour, background logits; size, cx, cy

    def forward(self, images):
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (64, 64):
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        x = x * 2 - 1
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        return self.project(x.mean((2, 3)))


def load_world_features(path=WEIGHTS) -> WorldFeatures:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: the world feature network is missing; rebuild it with "
                                f"`python -m lora_diffusion.world.features`")
    net = WorldFeatures()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


def training_batch(rng, nrng, n):
    pairs = world.color_pairs() + world.color_pairs(held_out=True)
    scenes = [world.sample_scene(rng, shapes=world.SHAPES, pairs=pairs) for _ in range(n)]
    images = []
    for scene in scenes:
        image = world.render(scene, 64, noise=rng.uniform(0, 12), rng=nrng)
        if rng.random() < 0.7:
            from PIL import ImageFilter

            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.0)))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    targets = torch.tensor([(world.SHAPES.index(s.shape), world.COLORS.index(s.color),
                             world.COLORS.index(s.background)) for s in scenes])
    geometry = torch.tensor([(s.size, s.cx, s.cy) for s in scenes], dtype=torch.float32)
    return torch.stack(images), targets, geometry


def train(steps=2000, batch_size=64, seed=0, out=WEIGHTS):
    from safetensors.torch import save
    from tqdm.auto import tqdm


    torch.manual_seed(seed)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    net = WorldFeatures()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    n_shape, n_color = len(world.SHAPES), len(world.COLORS)
    for _ in (bar := tqdm(range(steps), desc="world features")):
        images, targets, geometry = training_batch(rng, nrng, batch_size)
        out_all = net.heads(net(images))
        shape, color, background, geo = out_all.split([n_shape, n_color, n_color, 3], dim=1)
        loss = (F.cross_entropy(shape, targets[:, 0]) + F.cross_entropy(color, targets[:, 1])
                + F.cross_entropy(background, targets[:, 2]) + 10 * F.mse_loss(geo, geometry))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        images, targets, _ = training_batch(random.Random(seed + 1), np.random.default_rng(seed + 1), 512)
        shape, color, background, _ = net.heads(net(images)).split([n_shape, n_color, n_color, 3], dim=1)
        accuracy = [(logits.argmax(1) == targets[:, i]).float().mean().item()
                    for i, logits in enumerate((shape, color, background))]
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    metadata = {"accuracy_shape_color_background": str(accuracy), "steps": str(steps)}
    atomic_write(out, lambda f: f.write(save(state, metadata=metadata)))
    print(f"wrote {out}: held-out renders read right: shape {accuracy[0]:.1%}, colour {accuracy[1]:.1%}, "
          f"background {accuracy[2]:.1%}")
    return net, accuracy


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="train the world feature network used for world-FID/KID")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.steps)
