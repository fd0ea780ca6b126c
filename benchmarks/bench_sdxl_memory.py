"""Memory and time of one LoRA training step on a full-size SDXL U-Net (2.6 B parameters), on this machine.

    python benchmarks/bench_sdxl_memory.py --json sdxl.json       # 1024 px, bf16, rank 8, gradient checkpointing
    python benchmarks/bench_sdxl_memory.py --quick                # builtin:tiny-xl's U-Net at 64 px, seconds

The U-Net is built from the shipped config (lora_diffusion/assets/sdxl/unet/config.json) with random weights,
straight in bf16 (no fp32 copy; nothing is downloaded). kohya's SDXL targets get a LoRA (rank 8 = alpha; 722
modules, parameters in fp32 as the trainer keeps them); gradient checkpointing is on, as `--gradient_checkpointing`
sets it. One step, as train_lora.py takes it with `--mixed_precision bf16 --network_train_unet_only
--cache_text_encoder_outputs` and cached latents: forward under autocast(bf16) with SDXL's conditioning (a
2048-wide context of 77 tokens, the 1280-wide pooled embedding, the size/crop time ids) on 128x128 latents, MSE,
backward, AdamW.

The step runs in a child process. This one watches the child's resident memory and stops it before it takes more
than the memory available at the start less a margin (`--margin_gib`), so a step that does not fit is reported, not
swapped or killed by the kernel. Printed: the weights alone (bytes of the tensors, and the process's resident memory
once they are built), the peak resident memory over the step and over the whole process (resource.getrusage), and
the step time.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GIB = 2**30


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def sizes(quick: bool, rank: int) -> dict:
    """Bytes of the bf16 weights and of the LoRA's fp32 parameters, gradients and AdamW states, from the config on
    the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from lora_diffusion import create_network

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(common.unet_config(quick, "sdxl"))
    network = create_network(unet, None, rank=rank, alpha=rank)
    lora = sum(p.numel() for p in network.parameters())
    params = sum(p.numel() for p in unet.parameters()) - lora
    return {"unet_params": params, "weights_bytes": params * 2, "lora_params": lora, "lora_modules":
            len(network.unet_layers), "lora_state_bytes": lora * 4 * 4}  # parameter, gradient, two AdamW moments


# -- the child: build, one step, report ----------------------------------------------------------------------------


def reply(data: dict):
    print("@@" + json.dumps(data), flush=True)


def child(args):
    import diffusers  # noqa: F401 - imported before the first figure, which is then the runtime's own

    from lora_diffusion import create_network

    common.set_threads(args.threads)
    reply({"phase": "started", "rss": common.rss_bytes()})
    start = time.perf_counter()
    unet = common.build_unet(args.quick, dtype=torch.bfloat16, family="sdxl")
    reply({"phase": "weights", "rss": common.rss_bytes(), "build_s": time.perf_counter() - start})
    network = create_network(unet, None, rank=args.rank, alpha=args.rank)
    unet.enable_gradient_checkpointing()
    unet.train()  # diffusers only checkpoints in training mode
    latents, timesteps, context = common.unet_inputs(unet, args.resolution, dtype=torch.bfloat16)
    config = unet.config
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = args.resolution
    added = {"text_embeds": torch.randn(1, pooled_width, generator=torch.Generator().manual_seed(1)).bfloat16(),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.bfloat16)}
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    before = common.rss_bytes()
    reply({"phase": "ready", "rss": before})
    times = {}
    with common.PeakMemory("cpu") as peak:
        begin = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = unet(latents, timesteps, context, added_cond_kwargs=added).sample
        loss = F.mse_loss(prediction.float(), target)
        times["forward_s"] = time.perf_counter() - begin
        loss.backward()
        ups = [p for name, p in network.named_parameters() if "lora_up" in name]
        with_gradient = sum(p.grad is not None and p.grad.abs().sum().item() > 0 for p in ups)  # checkpointing kept
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["step_s"] = time.perf_counter() - begin
    reply({"phase": "done", "rss_before_step": before, "peak_step": peak.peak, "loss": loss.item(),
           "peak_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ups_with_gradient":
           with_gradient, "ups": len(ups), **times})


# -- the parent: budget, watch, report ------------------------------------------------------------------------------


def watch(command, env, budget: int) -> tuple[dict, int | None]:
    """Run the child, reading its replies; kill it when its resident memory passes `budget`. Returns (the last
    reply of each phase, the RSS that stopped it or None)."""
    replies, stopped = {}, None
    page = os.sysconf("SC_PAGE_SIZE")
    with common.child(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        statm = Path(f"/proc/{process.pid}/statm")

        def guard():
            nonlocal stopped
            while process.poll() is None:
                try:
                    rss = int(statm.read_text().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    return
                if rss > budget:
                    stopped = rss
                    common.stop(process, grace=0)  # the whole group, at once: it is past the budget
                    return
                time.sleep(0.05)

        thread = threading.Thread(target=guard, daemon=True)
        thread.start()
        for line in process.stdout:
            if line.startswith("@@"):
                data = json.loads(line[2:])
                replies[data["phase"]] = data
                print(f"  {data['phase']}: resident {data.get('rss', data.get('peak_step', 0)) / GIB:.2f} GiB",
                      file=sys.stderr, flush=True)
        process.wait()
        thread.join()
    if stopped is None and process.returncode != 0:
        raise RuntimeError(f"the step's process exited with {process.returncode} (see its error above)")
    return replies, stopped


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="builtin:tiny-xl's U-Net at 64 px (a smoke test)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--margin_gib", type=float, default=1.5,
                        help="memory left to the rest of the machine: the step stops above MemAvailable - this")
    parser.add_argument("--json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.resolution = min(args.resolution, 64)
    if args.child:
        return child(args)

    need = sizes(args.quick, args.rank)
    available = available_bytes()
    budget = int(available - args.margin_gib * GIB)
    result = {"machine": common.machine(), "load_before": common.loadavg(), "busy": common.other_busy_processes(),
              "resolution": args.resolution, "rank": args.rank, "threads": args.threads, "quick": args.quick,
              "available_bytes": available, "budget_bytes": budget, **need}
    title = (f"SDXL U-Net{' (tiny)' if args.quick else ''}: {need['unet_params']:,} parameters in bf16, "
             f"{args.resolution}x{args.resolution} px ({args.resolution // 8}x{args.resolution // 8} latents), batch "
             f"1, LoRA rank {args.rank} on {need['lora_modules']} modules ({need['lora_params']:,} fp32 parameters), "
             f"gradient checkpointing, AdamW, {args.threads} threads (load before {result['load_before']:.2f})")
    print(title)
    if need["weights_bytes"] + need["lora_state_bytes"] > budget:
        result["aborted"] = (f"the weights alone need {need['weights_bytes'] / GIB:.2f} GiB; {budget / GIB:.2f} GiB "
                             f"may be used here ({available / GIB:.2f} GiB available less {args.margin_gib} GiB)")
    else:
        command = [sys.executable, __file__, "--child", "--resolution", str(args.resolution), "--rank",
                   str(args.rank), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        replies, stopped = watch(command, env, budget)
        result.update(replies.get("done", {}))
        if "weights" in replies:
            result.update(rss_started=replies["started"]["rss"], rss_weights=replies["weights"]["rss"],
                          build_s=replies["weights"]["build_s"])
        if stopped is not None:
            result["aborted"] = (f"stopped at {stopped / GIB:.2f} GiB resident, past the {budget / GIB:.2f} GiB that "
                                 f"may be used here ({available / GIB:.2f} GiB available less {args.margin_gib} "
                                 f"GiB): the step does not fit")
    print(f"weights alone: {need['weights_bytes'] / GIB:.2f} GiB of bf16 tensors"
          + (f"; the process holds {result['rss_weights'] / GIB:.2f} GiB once they are built "
             f"({result['rss_started'] / GIB:.2f} GiB before: Python, torch, diffusers; built in "
             f"{result['build_s']:.0f} s)" if "rss_weights" in result else ""))
    if "aborted" in result:
        print(f"aborted: {result['aborted']}")
    else:
        print(f"one training step: {result['step_s']:.1f} s (forward {result['forward_s']:.1f} s, backward + AdamW "
              f"{result['step_s'] - result['forward_s']:.1f} s); peak resident memory over the step "
              f"{result['peak_step'] / GIB:.2f} GiB, over the whole process (ru_maxrss) "
              f"{result['peak_process'] / GIB:.2f} GiB; {result['ups_with_gradient']} of {result['ups']} lora_up "
              f"tensors got a gradient")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 2 if "aborted" in result else 0


if __name__ == "__main__":
    sys.exit(main())
