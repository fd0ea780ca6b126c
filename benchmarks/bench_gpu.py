"""The Python stages of benchmarks/gpu_check.sh: one LoRA training step measured on one GPU, two LoRA files
compared, the environment, and the summary table with the targets beside the figures.

    python benchmarks/bench_gpu.py env --json env.json
    python benchmarks/bench_gpu.py step --variant ours --batch 8 --resolution 512 --dtype bf16 --json ours.json
    python benchmarks/bench_gpu.py step --variant peft ...                        # diffusers + peft, same step
    python benchmarks/bench_gpu.py step --family sdxl --variant ours-checkpointing --resolution 1024 --rank 8
    python benchmarks/bench_gpu.py compare a.safetensors b.safetensors --json resume.json
    python benchmarks/bench_gpu.py summary OUT_DIR                                 # the table, and summary.json
    python benchmarks/bench_gpu.py step --quick --device cpu --resolution 64      # tiny U-Net on a CPU (dry mode)

The step is bench_train_step.build()'s (base in the --dtype, LoRA parameters in fp32, forward under autocast, MSE,
backward, AdamW; kohya's default U-Net targets on both sides), one variant per process so that each has its own
peak memory. Timed: `--warmup` steps (the first one alone: a compiled variant compiles there), then `--steps` steps
each synchronised (the median) and `--steps` more back to back with one synchronisation at the end (the pace, s/step).
MFU = the step's FLOPs as FlopCounterMode counts them (forward + backward, no gradients for frozen weights) / the
pace / a bf16 matmul's rate measured in the same process (8192^2 on a GPU).
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bts  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402

GIB = 2**30
TARGETS = {"mfu": 0.40, "time_vs_peft": 0.85, "sdxl_peak_gib": 8.0, "resume_rel_diff": 1e-3}


# -- stages ----------------------------------------------------------------------------------------------------------


def environment() -> dict:
    """Versions and the device: what the figures ran on (the packages' versions from their metadata: importing
    diffusers alone takes 9 CPU seconds)."""
    from importlib import metadata

    info = common.machine()
    for name in ("diffusers", "transformers", "accelerate", "peft", "safetensors"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(cuda_version=torch.version.cuda, device=props.name, capability=f"{props.major}.{props.minor}",
                    device_memory_gib=round(props.total_memory / GIB, 1), bf16=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    return info


def measure_step(args) -> dict:
    device = torch.device(args.device)
    dtype = bts.DTYPES[args.dtype]
    variant = bts.VARIANTS[args.variant]
    start = time.perf_counter()
    step, count_flops, n_params, lora_dtypes = bts.build(variant, args.quick, dtype, device, args.rank,
                                                         args.resolution, batch=args.batch, family=args.family,
                                                         compile_backend=args.compile_backend)
    info = {"variant": args.variant, "family": args.family, "quick": args.quick, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_name(),
            "batch": args.batch, "resolution": args.resolution, "rank": args.rank, "dtype": args.dtype,
            "lora_params": n_params, "lora_dtypes": lora_dtypes, "build_s": time.perf_counter() - start,
            "weights_bytes": allocated(device), "options": variant}
    if variant.get("compile"):
        info["compile_backend"] = args.compile_backend
        info["dynamo_disabled"] = os.environ.get("TORCHDYNAMO_DISABLE") == "1"  # the dry run's
    info["first_step_s"] = common.timed(step, device)  # a compiled variant compiles here
    if device.type == "cuda":  # the optimizer's state is made in the first step: its peak may be the run's
        info["first_step_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    for _ in range(args.warmup - 1):
        step()
    with common.PeakMemory(device) as peak:
        synced = [common.timed(step, device) for _ in range(args.steps)]
        common.sync(device)
        begin = time.perf_counter()
        for _ in range(args.steps):
            step()
        common.sync(device)
        pace = (time.perf_counter() - begin) / args.steps
    info.update(step_s=synced, median_s=common.median(synced), pace_s=pace, images_per_s=args.batch / pace,
                peak_bytes=peak.peak)
    if device.type == "cuda":
        info["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    if not args.no_flops:
        info["forward_flops"], info["step_flops"] = count_flops()
        size = 8192 if device.type == "cuda" else 512
        info["matmul_flops_per_s"] = bts.matmul_peak(dtype, device, size=size, repeats=10)
        info["matmul_size"] = size
        info["mfu"] = info["step_flops"] / pace / info["matmul_flops_per_s"]
    print(step_line(info), flush=True)
    return info


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else common.rss_bytes()


def step_line(info: dict) -> str:
    line = (f"[{info['variant']}] {info['family']}{' tiny' if info['quick'] else ''} U-Net, {info['resolution']} px, "
            f"batch {info['batch']}, {info['dtype']}, rank {info['rank']} ({info['lora_params']:,} LoRA params) on "
            f"{info['device_name']}: {info['pace_s']:.4f} s/step ({info['images_per_s']:.1f} img/s; median synced "
            f"{info['median_s']:.4f}; first step {info['first_step_s']:.1f} s), peak {info['peak_bytes'] / GIB:.2f} "
            f"GiB (weights {info['weights_bytes'] / GIB:.2f})")
    if "mfu" in info:
        line += (f"; {info['step_flops'] / 1e12:.3g} TFLOP counted per step, matmul "
                 f"{info['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s: MFU {100 * info['mfu']:.1f} %")
    return line


def compare_files(path_a, path_b) -> dict:
    """How far apart two LoRA files are: tensors bit-equal, and the learned part's relative difference."""
    from safetensors.torch import load_file

    for path in (path_a, path_b):
        if not Path(path).is_file():
            raise SystemExit(f"compare: {path} is not a file (did the run that writes it end?)")
    a, b = load_file(path_a), load_file(path_b)
    if a.keys() != b.keys():
        raise SystemExit(f"compare: {path_a} and {path_b} hold different tensors")
    equal = sum(torch.equal(a[k], b[k]) for k in a)
    ups = [k for k in a if "lora_up" in k] or list(a)
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in ups) ** 0.5
    norm = sum(float(a[k].double().square().sum()) for k in ups) ** 0.5
    result = {"tensors": len(a), "bit_equal": equal, "rel_diff": diff / norm if norm else diff,
              "max_abs_diff": max(float((a[k].double() - b[k].double()).abs().max()) for k in a)}
    print(f"{equal}/{len(a)} tensors bit-equal; learned part ||A-B|| / ||A|| {result['rel_diff']:.3e}; max |A-B| "
          f"{result['max_abs_diff']:.3e}", flush=True)
    return result


# -- the summary -----------------------------------------------------------------------------------------------------


def read_stages(out: Path) -> dict:
    """stages.jsonl, one line per stage as gpu_check.sh ran it: {name, rc, seconds, limit} or {name, skipped}."""
    stages = {}
    path = out / "stages.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        stages[record["name"]] = record
    return stages


def read_json(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_figures(out: Path, name: str) -> dict | None:
    """What train_lora.py printed in <name>.log: steps, seconds, the steady pace and the last validation line."""
    try:
        text = (out / f"{name}.log").read_text(errors="replace").replace("\r", "\n")
    except OSError:
        return None
    done = re.search(r"done: (\d+) steps in ([\d.]+)s(?: \(([\d.]+) s/step after the first\))?", text)
    if not done:
        return None
    figures = {"steps": int(done.group(1)), "seconds": float(done.group(2))}
    if done.group(3):
        figures["pace_s"] = float(done.group(3))
    validations = re.findall(r"^epoch \d+ \(step \d+\): (.+)$", text, re.M)
    if validations:
        figures["validation"] = validations[-1].strip()
    return figures


def status(stages: dict, name: str) -> str:
    record = stages.get(name)
    if record is None:
        return "not run"
    if record.get("skipped"):
        return f"skipped ({record['skipped']})"
    if record["rc"] == 0:
        return f"ok ({record['seconds']:.0f} s)"
    cause = "time limit" if record["rc"] in (124, 137) else f"rc {record['rc']}"
    return f"FAILED: {cause} after {record['seconds']:.0f} s, see {name}.log"


def met(value, target, lower_is_better=True) -> str:
    if value is None:
        return "-"
    return "yes" if (value <= target if lower_is_better else value >= target) else "NO"


def summarize(out: Path) -> dict:
    """The figures of every stage, with the targets beside them: printed as one table, written as summary.json."""
    stages = read_stages(out)
    env = read_json(out, "env") or {}
    ours, peft, compiled, sdxl = (read_json(out, n) for n in ("step_ours", "step_peft", "step_compile", "sdxl"))
    resume = read_json(out, "resume_compare")
    rows = []  # [check, figure, target, met, stage status]

    def add(check, figure, target="", verdict="", stage=None):
        rows.append([check, figure, target, verdict, status(stages, stage) if stage else ""])

    quickstart = train_figures(out, "quickstart")
    add("quickstart (examples/quickstart/config.toml)", train_line(quickstart), "runs", "", "quickstart")
    if ours:
        add(f"SD1.5 step, ours: {ours['resolution']} px, batch {ours['batch']}, {ours['dtype']}",
            f"{ours['pace_s']:.4f} s/step, {ours['images_per_s']:.1f} img/s, peak {ours['peak_bytes'] / GIB:.2f} GiB",
            "", "", "step_ours")
        if "mfu" in ours:
            add("  MFU (counted fwd+bwd FLOPs / s/step / measured matmul rate)",
                f"{100 * ours['mfu']:.1f} % ({ours['step_flops'] / 1e12:.3g} TFLOP, matmul "
                f"{ours['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s)", f">= {100 * TARGETS['mfu']:.0f} %",
                met(ours["mfu"], TARGETS["mfu"], lower_is_better=False))
    else:
        add("SD1.5 step, ours", "-", "", "", "step_ours")
    if peft:
        add("SD1.5 step, diffusers + peft",
            f"{peft['pace_s']:.4f} s/step, peak {peft['peak_bytes'] / GIB:.2f} GiB", "", "", "step_peft")
    else:
        add("SD1.5 step, diffusers + peft", "-", "", "", "step_peft")
    time_ratio = ours["pace_s"] / peft["pace_s"] if ours and peft else None
    add("  time ours / peft", f"{time_ratio:.3f}x" if time_ratio else "-", f"<= {TARGETS['time_vs_peft']}x",
        met(time_ratio, TARGETS["time_vs_peft"]))
    if ours and peft:
        add("  peak memory ours / peft", f"{ours['peak_bytes'] / peft['peak_bytes']:.3f}x")
    if compiled:
        speedup = f", {ours['pace_s'] / compiled['pace_s']:.2f}x eager" if ours else ""
        mfu = (f", MFU {100 * ours['step_flops'] / compiled['pace_s'] / ours['matmul_flops_per_s']:.1f} %"
               if ours and "mfu" in ours else "")
        backend = "dynamo off: dry run" if compiled.get("dynamo_disabled") else compiled.get("compile_backend")
        add(f"SD1.5 step, ours + torch.compile ({backend})",
            f"{compiled['pace_s']:.4f} s/step{speedup}{mfu}; first step (compiling) {compiled['first_step_s']:.0f} s",
            "", "", "step_compile")
    else:
        add("SD1.5 step, ours + torch.compile", "-", "", "", "step_compile")
    # the larger of the first step's peak (the optimizer's state is made there) and the timed steps'
    sdxl_peak = max(sdxl["peak_bytes"], sdxl.get("first_step_peak_bytes", 0)) / GIB if sdxl else None
    add(f"SDXL LoRA step{' ' + str(sdxl['resolution']) + ' px' if sdxl else ''}, checkpointing, U-Net only, "
        f"cached text: peak allocated",
        f"{sdxl_peak:.2f} GiB (reserved {sdxl.get('peak_reserved_bytes', 0) / GIB:.2f}), {sdxl['pace_s']:.3f} s/step"
        if sdxl else "-", f"<= {TARGETS['sdxl_peak_gib']:g} GiB", met(sdxl_peak, TARGETS["sdxl_peak_gib"]), "sdxl")
    offload = read_json(out, "sdxl_offload")
    offload_peak = max(offload["peak_bytes"], offload.get("first_step_peak_bytes", 0)) / GIB if offload else None
    add("  the same with --cpu_offload_checkpointing (saved tensors in pinned CPU memory)",
        f"{offload_peak:.2f} GiB, {offload['pace_s']:.3f} s/step"
        + (f" ({offload_peak / sdxl_peak:.2f}x the memory, {offload['pace_s'] / sdxl['pace_s']:.2f}x the time)"
           if sdxl else "") if offload else "-", "", "", "sdxl_offload")
    for name, title in (("fp16", "fp16 short run (GradScaler), validation + samples"),
                        ("bf16", "bf16 short run with a saved state")):
        add(title, train_line(train_figures(out, name)), "runs", "", name)
    add("resume from the saved state (final LoRA vs the uninterrupted bf16 run)",
        train_line(train_figures(out, "resume")), "runs", "", "resume")
    rel = resume["rel_diff"] if resume else None
    add("  resumed == uninterrupted",
        f"{resume['bit_equal']}/{resume['tensors']} tensors bit-equal, rel. diff {rel:.2e}" if resume else "-",
        f"rel <= {TARGETS['resume_rel_diff']:g}", met(rel, TARGETS["resume_rel_diff"]), "resume_compare")

    device = env.get("device") or env.get("cpu", "?")
    title = (f"gpu_check on {device} (torch {env.get('torch')}, CUDA {env.get('cuda_version')}, diffusers "
             f"{env.get('diffusers')}, peft {env.get('peft')})")
    if env.get("dry"):
        title += ": DRY RUN on the CPU, tiny sizes (tests the plumbing; no figure here means anything)"
    print_left_aligned(title, ["check", "figure", "target", "met", "stage"], rows)
    summary = {"environment": env, "stages": stages, "targets": TARGETS, "step_ours": ours, "step_peft": peft,
               "step_compile": compiled, "sdxl": sdxl, "sdxl_offload": offload, "resume_compare": resume,
               "train_runs": {n: train_figures(out, n) for n in ("quickstart", "fp16", "bf16", "resume")},
               "time_vs_peft": time_ratio, "table": rows,
               "not_ok": sorted(name for name, record in stages.items() if record.get("rc") != 0)}
    common.write_json(out / "summary.json", summary)
    if summary["not_ok"]:
        print(f"not run to the end: {', '.join(summary['not_ok'])}")
    return summary


def print_left_aligned(title: str, header: list[str], rows: list[list[str]]):
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    for n, row in enumerate([header] + rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))


def train_line(figures: dict | None) -> str:
    if not figures:
        return "-"
    line = f"{figures['steps']} steps in {figures['seconds']:.0f} s"
    if "pace_s" in figures:
        line += f" ({figures['pace_s']:.3f} s/step)"
    if "validation" in figures:
        line += f"; last validation: {figures['validation']}"
    return line


# -- the command line ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="versions and the device")
    env.add_argument("--dry", action="store_true", help="mark the figures as a dry run's")
    env.add_argument("--json")
    step = commands.add_parser("step", help="one variant's LoRA training step")
    step.add_argument("--variant", default="ours", choices=list(bts.VARIANTS))
    step.add_argument("--family", default="v1", choices=["v1", "sdxl"])
    step.add_argument("--quick", action="store_true", help="the tiny U-Net of the family (dry mode)")
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    step.add_argument("--batch", type=int, default=8)
    step.add_argument("--resolution", type=int, default=512)
    step.add_argument("--rank", type=int, default=16)
    step.add_argument("--dtype", default="bf16", choices=list(bts.DTYPES))
    step.add_argument("--warmup", type=int, default=3)
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--compile_backend", default="inductor", help="torch.compile's backend (compile variants)")
    step.add_argument("--no_flops", action="store_true", help="no FLOP count, no matmul rate, no MFU")
    step.add_argument("--json")
    compare = commands.add_parser("compare", help="two LoRA files: bit-equal tensors and the relative difference")
    compare.add_argument("files", nargs=2)
    compare.add_argument("--json")
    summary = commands.add_parser("summary", help="the table of gpu_check.sh's output folder, and summary.json")
    summary.add_argument("out")
    args = parser.parse_args(argv)

    if args.command == "summary":
        return 1 if summarize(Path(args.out))["not_ok"] else 0
    if args.command == "env":
        result = dict(environment(), dry=args.dry)
        print(json.dumps(result))
    elif args.command == "step":
        for name in ("warmup", "steps", "batch", "resolution"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
        result = measure_step(args)
    else:
        result = compare_files(*args.files)
    common.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
