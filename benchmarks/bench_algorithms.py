"""Parameter count and CPU training-step time per algorithm (lora, locon, loha, lokr, dora), side by side.

    python benchmarks/bench_algorithms.py              # the builtin:mini U-Net config, 32x32 latents, batch 2
    python benchmarks/bench_algorithms.py --quick      # tiny-sd config, 8x8 latents: seconds

A step is the U-Net's forward and backward (MSE on the output) with the network's parameters trainable, in fp32.
`lora` is kohya's networks.lora (the attention modules, no convs); the others have LyCORIS' targets (network_module
lycoris.kohya: also the ResNet and sampler convs, conv_in/conv_out, the time embedding). Rank 8 / alpha 4 on Linear
and 1x1 convs, conv rank 4 / alpha 2 on 3x3 convs, LoKr factor 8. The steps alternate between algorithms after a
warm-up round, so a busy moment hurts them alike.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lora_diffusion import create_network  # noqa: E402

ALGORITHMS = {
    "lora": dict(),  # kohya networks.lora
    "locon": dict(algo="locon", conv_rank=4, conv_alpha=2),
    "loha": dict(algo="loha", conv_rank=4, conv_alpha=2),
    "lokr": dict(algo="lokr", conv_rank=4, conv_alpha=2, factor=8),
    "dora": dict(algo="locon", conv_rank=4, conv_alpha=2, dora_wd=True),
}


def build_unet(config: Path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config)).requires_grad_(False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    config = ROOT / "lora_diffusion" / "assets" / ("tiny-sd" if args.quick else "mini") / "unet"
    size = 8 if args.quick else 32
    unet = build_unet(config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([10, 500])
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    networks = {}
    for name, options in ALGORITHMS.items():
        network = create_network(unet, None, rank=8, alpha=4, **options)
        for n, p in network.named_parameters():  # a trained network: no factor at zero
            if "dora_scale" not in n:
                p.data.normal_(0, 0.02)
        network.remove()
        networks[name] = network

    def step(network):
        network.apply_to()
        loss = unet(x, t, context).sample.square().mean()
        loss.backward()
        network.remove()
        network.zero_grad(set_to_none=True)

    times = {name: [] for name in networks}
    for repeat in range(args.repeats + 1):
        for name, network in networks.items():
            start = time.perf_counter()
            step(network)
            if repeat:  # the first round is the warm-up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["lora"])
    print(f"U-Net {config.parent.name}, latents {size}x{size}, batch 2, fp32, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternations")
    print(f"{'algorithm':10} {'modules':>8} {'parameters':>11} {'s/step (median)':>16} {'time / lora':>12}")
    for name, network in networks.items():
        params = sum(p.numel() for p in network.parameters())
        median = statistics.median(times[name])
        print(f"{name:10} {len(network.layers()):8d} {params:11,d} {median:16.3f} {median / base:12.2f}")


if __name__ == "__main__":
    main()
