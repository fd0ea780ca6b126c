"""Data loading against the trainer's consumption: images/s of the dataset at 512 px with buckets (from
bench_dataloader.py) next to the images/s one training step at 512 px eats (from a bench_train_step.py JSON).

    python benchmarks/bench_train_step.py --json step.json
    python benchmarks/bench_data.py --step_json step.json --json data.json
    python benchmarks/bench_data.py --quick

The loader keeps up when its images/s is above the trainer's; the headroom is their ratio.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dataloader  # noqa: E402
import common  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, one epoch (a smoke test)")
    parser.add_argument("--step_json", help="bench_train_step.py output: its first variant's s/step is consumption")
    parser.add_argument("--consumption", type=float, help="or: the trainer's images/s, given directly")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--images", type=int, default=24, help="images per format")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    consumption, source = args.consumption, "given"
    if args.step_json:
        step = json.loads(Path(args.step_json).read_text())
        first = next(iter(step["results"]))
        consumption = 1.0 / step["results"][first]["median_s"]
        source = f"{first}, {step['resolution']} px, batch 1 ({args.step_json})"
    loader_argv = ["--images", str(4 if args.quick else args.images), "--epochs", "1" if args.quick else "2",
                   "--batch_size", "1", "--workers", *map(str, args.workers)]
    results = bench_dataloader.main(loader_argv)

    rows = [[r["format"], r["workers"], r["images_per_s"], consumption or float("nan"),
             r["images_per_s"] / consumption if consumption else float("nan")] for r in results]
    common.print_table(f"Loader vs trainer at 512 px, batch 1 (trainer: {source})",
                       ["format", "workers", "loader images/s", "trainer images/s", "headroom x"], rows)
    common.write_json(args.json, {"benchmark": "data", "machine": common.machine(), "quick": args.quick,
                                  "consumption_images_per_s": consumption, "consumption_source": source,
                                  "loader": results})
    return rows


if __name__ == "__main__":
    main()
