"""Forward time of a LoRA-injected U-Net (unmerged and merged) against the bare U-Net, ranks 4 to 128.

    python benchmarks/bench_lora_overhead.py --json overhead.json              # SD1.5 U-Net, 512 px, bf16
    python benchmarks/bench_lora_overhead.py --ranks 16 --resolution 256 --repeats 5
    python benchmarks/bench_lora_overhead.py --quick

Inference as a pipeline runs it: no_grad, the base and the LoRA both in --dtype (the network is cast after loading),
no autocast. kohya's default U-Net targets (192 modules on SD1.5). The three forwards alternate (bare, unmerged,
merged, bare, ...) after a warm-up of each; merging and unmerging between calls is not timed.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny U-Net (a smoke test)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64, 128])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution = min(args.resolution, 64)
    common.set_threads(args.threads)
    from lora_diffusion import create_network

    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    start_load = common.loadavg()
    unet = common.build_unet(args.quick, dtype=dtype, device=device)
    latents, timesteps, context = common.unet_inputs(unet, args.resolution, dtype=dtype, device=device)

    @torch.no_grad()
    def forward():
        return common.timed(lambda: unet(latents, timesteps, context), device)

    rows, loads = [], []
    for rank in args.ranks:
        network = create_network(unet, None, rank=rank, alpha=rank)
        for layer in network.children():  # a trained LoRA: up is not zero (zeros would still be multiplied)
            torch.nn.init.normal_(layer.lora_up.weight, std=0.01)
        network.to(dtype).eval()

        def unmerged():
            network.unmerge()
            return forward()

        def merged():
            network.merge()
            return forward()

        def bare():
            network.unmerge()
            network.set_multiplier(0.0)  # the layer returns the base output untouched: the bare U-Net
            seconds = forward()
            network.set_multiplier(1.0)
            return seconds

        times = common.alternate({"bare": bare, "unmerged": unmerged, "merged": merged}, args.repeats, warmup=1)
        loads += times["_load"]
        network.remove()
        b, u, m = (common.median(times[k]) for k in ("bare", "unmerged", "merged"))
        rows.append({"rank": rank, "bare_s": b, "unmerged_s": u, "merged_s": m, "unmerged_overhead": u / b - 1,
                     "merged_overhead": m / b - 1, "raw": times})
    # a check that "bare" is the bare model: the same forward with no network at all
    bare_no_network = common.median([forward() for _ in range(max(1, args.repeats // 2))])

    size = "tiny" if args.quick else "SD1.5"
    common.print_table(
        f"U-Net forward with LoRA, {size}, {args.resolution} px, batch 1, {args.dtype}, {args.device}, "
        f"{args.threads} threads; median of {args.repeats}; load {start_load:.2f} at start, "
        f"{min(loads):.2f}-{max(loads):.2f} during",
        ["rank", "bare s", "unmerged s", "merged s", "unmerged overhead %", "merged overhead %"],
        [[r["rank"], r["bare_s"], r["unmerged_s"], r["merged_s"], 100 * r["unmerged_overhead"],
          100 * r["merged_overhead"]] for r in rows])
    print(f"bare U-Net with no LoRA modules at all: {bare_no_network:.3g} s")
    common.write_json(args.json, {"benchmark": "lora_overhead", "machine": common.machine(), "quick": args.quick,
                                  "resolution": args.resolution, "dtype": args.dtype, "repeats": args.repeats,
                                  "load_start": start_load, "load_during": loads,
                                  "bare_no_network_s": bare_no_network, "results": rows})
    return rows


if __name__ == "__main__":
    main()
