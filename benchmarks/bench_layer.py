"""One LoRA module, forward + backward under bf16 autocast, on SD1.5 shapes: the ways to compute the branch.

    python benchmarks/bench_layer.py --json layer.json
    python benchmarks/bench_layer.py --quick

The levers of lora_diffusion/core/adapters.py, each as a small function of (layer, x), timed A B C ... after a warm-up:
  scale_output  out + up(down(x)) * scale          (a full-size product, then a full-size sum)
  scale_rank    out + up(down(x) * scale)          (the scale on the rank-r tensor, r << out features)
  inplace_add   out.add_(up(down(x) * scale))      (no new full-size tensor for the sum)
  addmm_fused   out.addmm_(down(x) * scale, up^T)  (the up projection accumulates into the base output: no
                                                   full-size delta tensor at all)
  peft_like     x.to(fp32), out + up(down(x)) * scale, .to(out dtype)   (what peft's Linear does)
  layer         LoRALayer.forward as it is in the package now
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# (name, tokens, in, out): SD1.5 at 512 px, the largest level (64x64 = 4096 tokens, 320 channels) and the ff
SHAPES = [("attn to_q 320", 4096, 320, 320), ("ff.net.0.proj 320->2560", 4096, 320, 2560),
          ("ff.net.2 1280->320", 4096, 1280, 320), ("attn2 to_k 768->640 (77 tokens)", 77, 768, 640)]


def scale_output(layer, x):
    return layer.base.forward(x) + layer.lora_up(layer.lora_down(x)) * layer.scaling


def scale_rank(layer, x):
    return layer.base.forward(x) + layer.lora_up(layer.lora_down(x) * layer.scaling)


def inplace_add(layer, x):
    return layer.base.forward(x).add_(layer.lora_up(layer.lora_down(x) * layer.scaling))


def addmm_fused(layer, x):
    out = layer.base.forward(x)
    h = layer.lora_down(x) * layer.scaling
    up = layer.lora_up.weight.to(h.dtype)  # autocast does not cast for an in-place op
    return out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), up.t()).view(out.shape)


def peft_like(layer, x):
    out = layer.base.forward(x)
    dtype = out.dtype
    return (out + layer.lora_up(layer.lora_down(x.to(torch.float32))) * layer.scaling).to(dtype)


def package_layer(layer, x):
    return layer(x)


VARIANTS = {"scale_output": scale_output, "scale_rank": scale_rank, "inplace_add": inplace_add,
            "addmm_fused": addmm_fused, "peft_like": peft_like, "layer": package_layer}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    from lora_diffusion.core.adapters import LoRALayer

    shapes = [(n, t // 16, i // 4, o // 4) for n, t, i, o in SHAPES] if args.quick else SHAPES
    repeats = 2 if args.quick else args.repeats
    rows, loads = [], []
    for name, tokens, in_dim, out_dim in shapes:
        base = nn.Linear(in_dim, out_dim).to(torch.bfloat16).requires_grad_(False)
        layer = LoRALayer(base, rank=args.rank).apply_to()
        nn.init.normal_(layer.lora_up.weight, std=0.01)
        x = torch.randn(2, tokens, in_dim, dtype=torch.bfloat16, requires_grad=True)  # batch 2: CFG-free training

        def run(fn):
            def once():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = fn(layer, x * 1)  # x * 1: a fresh non-leaf input, as inside a network
                out.float().sum().backward()
                layer.zero_grad(set_to_none=True)
                x.grad = None

            def timed():
                return common.timed(lambda: [once() for _ in range(5)]) / 5
            return timed

        def bare():
            def once():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = layer.base.forward(x * 1)
                out.float().sum().backward()
                x.grad = None
            return common.timed(lambda: [once() for _ in range(5)]) / 5

        times = common.alternate({"bare": bare, **{k: run(f) for k, f in VARIANTS.items()}}, repeats, warmup=1)
        loads += times.pop("_load")
        medians = {k: common.median(v) for k, v in times.items()}
        rows.append({"shape": name, "tokens": tokens, "in": in_dim, "out": out_dim, "ms": medians})

    header = ["module (batch 2)"] + ["bare ms"] + [f"{k} ms" for k in VARIANTS]
    common.print_table(f"One LoRA Linear, rank {args.rank}, bf16 base, fp32 LoRA, autocast bf16, forward+backward; "
                       f"median of {repeats}; load {min(loads):.2f}-{max(loads):.2f}",
                       header, [[r["shape"]] + [1000 * r["ms"][k] for k in ["bare", *VARIANTS]] for r in rows])
    common.write_json(args.json, {"benchmark": "layer", "machine": common.machine(), "rank": args.rank,
                                  "load_during": loads, "results": rows})
    return rows


if __name__ == "__main__":
    main()
