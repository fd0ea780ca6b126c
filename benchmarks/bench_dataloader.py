"""Images/s of the training DataLoader at 512 px with buckets, on generated images (CPU only).

    python benchmarks/bench_dataloader.py --images 64 --workers 0 2 --json loader.json

Writes JPEG and PNG photos-sized images of mixed aspect ratios to a temp folder (kohya layout), then
times full epochs of LoRADataset + BucketBatchSampler + DataLoader(collate_fn) after one warm-up batch.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import BucketBatchSampler, LoRADataset, collate_fn  # noqa: E402

SIZES = [(1024, 768), (768, 1024), (1024, 1024), (1216, 832), (832, 1216), (1536, 1024)]


def make_images(folder: Path, count: int, extension: str):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        # smooth gradients plus noise: compresses like a photo, not like pure noise or a flat colour
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}{extension}", quality=92)
        (folder / f"img{i}.txt").write_text(f"tag{i}, photo, sks")


def time_loader(train_dir, workers, batch_size, epochs):
    dataset = LoRADataset(train_dir, resolution=512, enable_bucket=True, flip_aug=True, shuffle_caption=True)
    sampler = BucketBatchSampler(dataset, batch_size=batch_size, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    next(iter(loader))  # start the workers
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch + 1)
        for batch in loader:
            seen += batch["images"].shape[0]
    return seen / (time.perf_counter() - start), dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per format")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=[".jpg", ".png"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as temp:
        for extension in args.formats:
            train = Path(temp) / extension.strip(".") / "train"
            make_images(train / "1_bench", args.images, extension)
            for workers in args.workers:
                rate, dataset = time_loader(train, workers, args.batch_size, args.epochs)
                results.append({"format": extension, "workers": workers, "images_per_s": round(rate, 1),
                                "batch_size": args.batch_size, "images": args.images,
                                "buckets": [list(b) for b in dataset.buckets]})
    print(f"DataLoader at 512 px with buckets, flip_aug, shuffle_caption; {os.cpu_count()} CPUs, "
          f"source images {SIZES[0][0]}x{SIZES[0][1]} to {SIZES[-1][0]}x{SIZES[-1][1]}")
    print(f"{'format':<8}{'workers':>8}{'images/s':>12}")
    for row in results:
        print(f"{row['format']:<8}{row['workers']:>8}{row['images_per_s']:>12.1f}")
    if args.json:
        info = {"benchmark": "dataloader", "resolution": 512, "cpus": os.cpu_count(), "torch": torch.__version__,
                "results": results}
        Path(args.json).write_text(json.dumps(info, indent=2))
    return results


if __name__ == "__main__":
    main()
