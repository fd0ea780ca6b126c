"""One LoRA training step on an SD1.5-architecture U-Net: ours (LoRALayer) against diffusers + peft.

    python benchmarks/bench_train_step.py --json step.json                  # 512 px, batch 1, rank 16, bf16
    python benchmarks/bench_train_step.py --variants ours ours-channels-last peft --repeats 3
    python benchmarks/bench_train_step.py --quick                           # tiny U-Net, seconds

Each variant lives in its own worker process (its own model, its own peak memory); the parent asks them for one
step at a time, A B A B, after a warm-up step. A step is forward (under torch.autocast in bf16, as accelerate does
for --mixed_precision bf16), MSE loss, backward, AdamW. Both sides: the frozen base in bf16, the LoRA parameters in
fp32 (master weights for AdamW), kohya's default U-Net targets (192 modules on SD1.5), rank 16, alpha 16.

What each side does in one LoRA module:
  ours: base(x) in bf16; under autocast the rank-16 branch runs on x as it is (bf16), scaled at rank width.
  peft: base(x) in bf16; casts x to the adapter dtype (fp32, a copy of every input), then lora_B(lora_A(x)) (autocast
        casts back to bf16 for the matmuls), * scaling at full output width, and a final .to(result dtype).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# name -> options; "impl" is ours or peft
VARIANTS = {
    "ours": {"impl": "ours"},
    "peft": {"impl": "peft"},
    "peft-bf16-adapter": {"impl": "peft", "adapter_dtype": "bf16"},  # diffusers' script leaves bf16 LoRA in bf16
    "bare": {"impl": "bare"},  # no LoRA; the input requires grad so the whole backward runs (a lower bound)
    "ours-channels-last": {"impl": "ours", "channels_last": True},
    "ours-checkpointing": {"impl": "ours", "checkpointing": True},
    # --cpu_offload_checkpointing: what the checkpointed backward keeps waits in (pinned) CPU memory
    "ours-checkpointing-offload": {"impl": "ours", "checkpointing": True, "offload": True},
    "ours-math-sdpa": {"impl": "ours", "sdpa": "math"},
    "ours-compile": {"impl": "ours", "compile": True},
    "ours-no-autocast": {"impl": "ours", "autocast": False},
    "peft-diffusers-targets": {"impl": "peft", "targets": "diffusers"},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- the worker: one model, steps on request -------------------------------------------------------------------


def build(variant: dict, quick: bool, dtype, device, rank: int, resolution: int, batch: int = 1,
          family: str = "v1", compile_backend: str = "inductor"):
    """(step, count_flops, LoRA parameter count, their dtypes) for one variant on a U-Net of `family` (v1: SD1.5,
    sdxl: SDXL base, with its pooled embedding and size/crop ids as cached text outputs give them)."""
    unet = common.build_unet(quick, dtype=dtype, device=device, family=family)
    if variant["impl"] == "ours":
        from lora_diffusion import create_network

        network = create_network(unet, None, rank=rank, alpha=rank)
        params = list(network.parameters())
        params = [p for p in params if p.requires_grad]
    elif variant["impl"] == "peft":
        from peft import LoraConfig

        targets = common.DIFFUSERS_TARGETS if variant.get("targets") == "diffusers" else common.KOHYA_UNET_REGEX
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
        params = [p for p in unet.parameters() if p.requires_grad]
        adapter_dtype = DTYPES[variant.get("adapter_dtype", "fp32")]
        for p in params:
            p.data = p.data.to(adapter_dtype)  # diffusers' cast_training_params
    else:
        params = [torch.zeros((), device=device, requires_grad=True)]
    if variant.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    if variant.get("checkpointing"):
        unet.enable_gradient_checkpointing()
        unet.train()
    if variant.get("offload"):
        from lora_diffusion.models.offload import offload_saved_tensors

        offload_saved_tensors(unet)
    if variant.get("sdpa") == "math":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    latents, timesteps, context = common.unet_inputs(unet, resolution, batch_size=batch, dtype=dtype, device=device)
    added = common.sdxl_added_conditioning(unet, resolution, batch, dtype, device) if family == "sdxl" else None
    target = torch.randn_like(latents, dtype=torch.float32)
    forward = torch.compile(unet, backend=compile_backend) if variant.get("compile") else unet
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    use_autocast = variant.get("autocast", True) and dtype != torch.float32

    def predict(model, sample):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=use_autocast):
            return model(sample, timesteps, context, added_cond_kwargs=added).sample

    def step():
        sample = latents.requires_grad_(True) if variant["impl"] == "bare" else latents
        loss = F.mse_loss(predict(forward, sample).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def count_flops():
        """FLOPs of the forward alone and of the step's forward + backward as it runs (LoRA-only gradients: the
        frozen weights get none, so the backward is less than the usual 2x forward)."""
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            predict(unet, latents)
        forward_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            step()
        return forward_flops, counter.get_total_flops()

    n_params = sum(p.numel() for p in params)
    lora_dtypes = sorted({str(p.dtype) for p in params})
    return step, count_flops, n_params, lora_dtypes


def worker(args):
    common.set_threads(args.threads)
    variant = VARIANTS[args.worker]
    device = torch.device(args.device)
    step, count_flops, n_params, lora_dtypes = build(variant, args.quick, DTYPES[args.dtype], device, args.rank,
                                                     args.resolution, batch=args.batch)
    reply({"ready": True, "lora_params": n_params, "lora_dtypes": lora_dtypes, "rss": common.rss_bytes()})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            before = common.rss_bytes()
            with common.PeakMemory(device) as peak:
                seconds = common.timed(step, device)
            reply({"seconds": seconds, "peak_step": peak.peak, "rss_before": before,
                   "peak_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                   if device.type == "cpu" else peak.peak})
        elif command == "flops":
            forward_flops, step_flops = count_flops()
            reply({"flops": forward_flops, "step_flops": step_flops})
        elif command == "quit":
            return


def reply(data: dict):
    print("@@" + json.dumps(data), flush=True)


class Worker:
    def __init__(self, name, args):
        command = [sys.executable, __file__, "--worker", name, "--dtype", args.dtype, "--rank", str(args.rank),
                   "--resolution", str(args.resolution), "--batch", str(args.batch), "--threads", str(args.threads),
                   "--device", args.device]
        if args.quick:
            command.append("--quick")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TORCHINDUCTOR_COMPILE_THREADS="1")
        self.name = name
        self.process = common.start(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            self.info = self.read()
        except BaseException:
            common.stop(self.process)
            raise

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker {self.name} exited with {self.process.wait()}")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self, grace=60.0):
        """Ask the worker to quit; its process group is ended after `grace` seconds in any case."""
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        common.stop(self.process)


# -- the parent: alternate, report ----------------------------------------------------------------------------


def matmul_peak(dtype, device="cpu", size=2048, repeats=5) -> float:
    """FLOP/s of a square matmul, best of `repeats`: an estimate of the achievable peak."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = min(common.timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * size**3 / best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny U-Net (a smoke test)")
    parser.add_argument("--variants", nargs="+", default=["ours", "peft"], choices=list(VARIANTS))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max_load", type=float, help="before each timed step wait (<= 60 s) for a lower load")
    parser.add_argument("--no_flops", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.resolution = min(args.resolution, 64)
    common.set_threads(args.threads)

    start_load, busy = common.loadavg(), common.other_busy_processes()
    workers = {}
    try:
        for name in args.variants:  # one at a time: two model loads at once would fight over 2 cores
            workers[name] = Worker(name, args)
        runs = {name: (lambda w=w: w.ask("step")) for name, w in workers.items()}
        results = common.alternate(runs, args.repeats, warmup=args.warmup, max_load=args.max_load)
        flops = None if args.no_flops else workers[args.variants[0]].ask("flops")
    finally:
        for w in workers.values():
            w.close()

    rows, table = {}, []
    base = args.variants[0]
    for name in args.variants:
        steps = results[name]
        rows[name] = {
            "seconds": [s["seconds"] for s in steps],
            "median_s": common.median([s["seconds"] for s in steps]),
            "peak_process_bytes": max(s["peak_process"] for s in steps),
            "model_rss_bytes": workers[name].info["rss"],
            "step_memory_bytes": max(s["peak_step"] for s in steps) - workers[name].info["rss"],
            "lora_params": workers[name].info["lora_params"], "lora_dtypes": workers[name].info["lora_dtypes"],
            "options": VARIANTS[name],
        }
    ref = rows.get("peft") or rows[args.variants[-1]]
    for name, row in rows.items():
        table.append([name, row["median_s"], min(row["seconds"]), common.gib(row["peak_process_bytes"]),
                      common.gib(row["step_memory_bytes"]), row["median_s"] / ref["median_s"],
                      min(row["seconds"]) / min(ref["seconds"]), row["peak_process_bytes"] / ref["peak_process_bytes"],
                      row["step_memory_bytes"] / ref["step_memory_bytes"], row["lora_params"],
                      ",".join(d.replace("torch.", "") for d in row["lora_dtypes"])])
    size = "tiny" if args.quick else "SD1.5"
    common.print_table(
        f"LoRA training step, {size} U-Net, {args.resolution} px, batch {args.batch}, rank {args.rank}, base "
        f"{args.dtype}, {args.device}, {args.threads} threads; {args.repeats} alternations after {args.warmup} "
        f"warm-up; "
        f"load {start_load:.2f} at start, {min(results['_load']):.2f}-{max(results['_load']):.2f} during",
        ["variant", "s/step (median)", "s/step (best)", "peak GiB", "step GiB", "time / ref", "best / ref",
         "peak / ref", "step mem / ref",
         "LoRA params", "LoRA dtype"], table)
    print(f"ref = {'peft' if 'peft' in rows else args.variants[-1]}; peak = process peak "
          f"({'max allocated' if args.device == 'cuda' else 'RSS'}); step mem = peak during the steps minus the "
          f"memory after building the model (activations, gradients, optimizer state)")
    info = {"benchmark": "train_step", "machine": common.machine(), "quick": args.quick,
            "resolution": args.resolution, "batch": args.batch, "rank": args.rank, "dtype": args.dtype,
            "repeats": args.repeats,
            "load_start": start_load, "load_during": results["_load"], "busy_processes": busy, "results": rows}
    if flops:
        peak = matmul_peak(DTYPES[args.dtype], args.device)
        forward_flops, step_flops = flops["flops"], flops["step_flops"]
        median_s, best_s = rows[base]["median_s"], min(rows[base]["seconds"])
        info.update(forward_flops=forward_flops, step_flops=step_flops, matmul_peak_flops=peak,
                    mfu_counted=step_flops / median_s / peak, mfu_3x_forward=3 * forward_flops / median_s / peak,
                    mfu_counted_best=step_flops / best_s / peak)
        print(f"\nU-Net forward {forward_flops / 1e9:.0f} GFLOP; the step as counted (forward + backward, "
              f"no frozen-weight grads) {step_flops / 1e9:.0f} GFLOP; "
              f"the usual 3x forward {3 * forward_flops / 1e9:.0f}"
              f" GFLOP.\n{args.dtype} matmul (2048^2) peak {peak / 1e9:.0f} GFLOP/s. {base} at the median "
              f"{median_s:.3g} s: {step_flops / median_s / 1e9:.0f} GFLOP/s counted = MFU "
              f"{100 * info['mfu_counted']:.0f} % ({100 * info['mfu_3x_forward']:.0f} % by 3x forward); at the best "
              f"{best_s:.3g} s: {100 * info['mfu_counted_best']:.0f} %")
    common.write_json(args.json, info)
    return info


if __name__ == "__main__":
    main()
