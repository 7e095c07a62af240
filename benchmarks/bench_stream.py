"""Streaming at 100x Flickr8k: a worker's memory stays flat and the feed keeps ahead of training.

Flickr8k's train split is repeated by reference (hard links, no extra disk) ``--times`` over:
600,000 images and ~7 GB of shards at 100x. With ``data.cache_mb=1``, below one shard's size
(~12 MB), the worker streams at 1x too, so both sizes take the same path. All in one run:

1. Memory: peak PSS of the Ray Train worker process and of the whole job (driver and every
   Ray process), sampled every 0.5 s while train_job.py trains a tiny model (the feed sets
   the pace, the worst case for its buffers): through the whole 1x epoch, and through the
   first ``--window`` seconds of the 100x epoch (on 2 cores a 100x epoch streams ~160
   images/s: an hour), then Ctrl-C. Printed: 100x / 1x (goal <= 1.1), and the 100x job's
   peak in the second half of its window / the first half (memory that grows with the data
   read would show here).
2. Feed headroom: images/s of the streamed feed alone (Ray Data read + caption draw,
   consumed by nothing, batch 64) over the first ``--feed-batches`` batches of the 100x
   epoch / training images/s of the Flickr configs' steps on this CPU (bench_gpu's step,
   their own batch sizes; goal >= 5).

    python benchmarks/bench_stream.py [--data data/f8k] [--times 100] [--window 300]

``--data`` is a prepared Flickr8k (default ``data/f8k``, prepared from
../shared/data/flickr8k when absent; the gan configs' alignment encoder is cached there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch
from bench_gpu import bench_family
from bench_train import feed_batches_per_s, peak_job_pss_mb, replicate

from t2i import config as config_lib
from t2i.data.dataset import load_manifest
from t2i.data.prepare import prepare_flickr8k

TINY = ["model.width=8", "model.hidden=64", "model.latent_dim=8", "data.samples_per_prompt=1", "data.cache_mb=1"]
STEP_CONFIGS = ("gan.toml", "gan_flickr30k.toml", "cvae_flickr30k.toml")
FEED_BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "f8k"))
    parser.add_argument("--flickr8k", default=str(REPO.parent / "shared" / "data" / "flickr8k"))
    parser.add_argument("--times", type=int, default=100)
    parser.add_argument("--window", type=float, default=300, help="seconds of the 100x epoch to sample")
    parser.add_argument("--feed-batches", type=int, default=2000, help="batches of the 100x feed to time")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per config")
    parser.add_argument("--parts", nargs="+", choices=["memory", "feed"], default=["memory", "feed"])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="t2i-bench-stream-") as tmp:
        tmp = Path(tmp)
        root = Path(args.data)
        if not (root / "manifest.json").is_file():
            root = tmp / "f8k"
            prepare_flickr8k(args.flickr8k, root)
        big = replicate(root, tmp / f"f8k-x{args.times}", args.times)
        shard_mb = max(s["bytes"] for s in load_manifest(root, False)["splits"]["train"]["shards"]) / 2 ** 20
        images = {k: load_manifest(r, False)["splits"]["train"]["images"] for k, r in (("1x", root), ("big", big))}
        print(f"train images: {images['1x']:,} (1x), {images['big']:,} ({args.times}x); largest shard "
              f"{shard_mb:.1f} MB, data.cache_mb=1: streamed", flush=True)

        result = {"times": args.times, "train_images": images, "shard_mb": shard_mb}
        if "memory" in args.parts:
            result.update(memory_part(args, root, big, tmp))
        if "feed" in args.parts:
            result.update(feed_part(args, root, big))
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def memory_part(args, root: Path, big: Path, tmp: Path) -> dict:
    memory = {}
    for label, data, window in (("1x", root, None), ("big", big, args.window)):
        memory[label] = peak_job_pss_mb(data, tmp / f"runs-{label}", TINY, window)
        print(f"memory {label}: {memory[label]['sampled_s']:.0f} s sampled; peak PSS train worker "
              f"{memory[label]['train_worker']:.0f} MB, whole job {memory[label]['job']:.0f} MB (first half "
              f"{memory[label]['job_first_half']:.0f}, second half {memory[label]['job_second_half']:.0f})",
              flush=True)
    worker_ratio = memory["big"]["train_worker"] / memory["1x"]["train_worker"]
    job_ratio = memory["big"]["job"] / memory["1x"]["job"]
    growth = memory["big"]["job_second_half"] / memory["big"]["job_first_half"]
    print(f"memory {args.times}x/1x: train worker {worker_ratio:.3f}, whole job {job_ratio:.3f} (goal <= 1.1); "
          f"{args.times}x second half / first half {growth:.3f}")
    return {"memory": memory, "memory_ratio_train_worker": worker_ratio, "memory_ratio_job": job_ratio,
            "memory_growth": growth}


def feed_part(args, root: Path, big: Path) -> dict:
    feed_cfg = config_lib.load(None, [f"data.batch_size={FEED_BATCH}"])
    started = time.perf_counter()
    feed_images_per_s = feed_batches_per_s(feed_cfg, big, epochs=1, max_batches=args.feed_batches) * FEED_BATCH
    print(f"feed alone, first {args.feed_batches} batches of {args.times}x: {feed_images_per_s:,.0f} images/s "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    torch.set_num_threads(2)
    steps = []
    for name in STEP_CONFIGS:
        batch = config_lib.load(REPO / "t2i" / "configs" / name).data.batch_size
        step = bench_family(REPO / "t2i" / "configs" / name, root, torch.device("cpu"), batch, 1, args.steps)
        steps.append({"config": name, "batch": batch, "train_images_per_s": step["images_per_s"],
                      "feed_headroom": feed_images_per_s / step["images_per_s"]})
        print(f"{name}: training {step['images_per_s']:.1f} images/s (batch {batch}); feed / training = "
              f"{steps[-1]['feed_headroom']:.0f}x (goal >= 5)", flush=True)
    return {"feed_images_per_s": feed_images_per_s, "steps": steps}


if __name__ == "__main__":
    main()
