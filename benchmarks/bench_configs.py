"""What a run of each photo config costs: its training step measured on this CPU, scaled to
its data set's images per epoch and its epochs, and extrapolated to one GPU on paper.
Trainable parameters are the generator's plus, for the gan, the discriminator's (the frozen GloVe
table is a buffer, not counted).

For every config, bench_gpu's step (the worker's cached-shard loop, one worker, the
config's own batch size, this machine's threads) runs ``--steps`` timed steps on a prepared
Flickr8k (64x64 like every photo set here, so the step does not depend on which set).
One epoch draws one caption per training image, so its images are the training split's:
Flickr8k 6,000 (official split), Flickr30k 29,000 (Karpathy's), MS-COCO 2014 78,644
(train2014's 82,783 less the 1-in-20 dev carve-out). Printed per config: images/s and
time per epoch per worker here, the whole run's time, FLOPs per training image (torch's
FlopCounterMode), and GPU time per epoch at an H200's dense bf16 peak (989 TFLOP/s; a floor no
run reaches) and at 10% of it (an assumption: no GPU has run t2i yet). These models are
small: at 64x64 a GPU epoch is so few FLOPs that per-step overheads (kernel launches, the
optimizer, the feed), not arithmetic, will set its time, so the steps per epoch are printed
too. The per-epoch dev evaluation (a forward pass, ~1/3 of a step per image) is not included.

    python benchmarks/bench_configs.py [--data data/f8k] [--steps 6] [--configs gan_gpu.toml ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
import torch
from bench_gpu import PEAK_BF16_TFLOPS, bench_family, prepare

from t2i import config as config_lib
from t2i.models import build_discriminator, build_model, count_parameters

TRAIN_IMAGES = {"flickr8k": 6_000, "flickr30k": 29_000, "coco": 78_644}
CONFIGS = {"gan.toml": "flickr8k", "cvae.toml": "flickr8k", "gan_gpu.toml": "flickr8k", "gan_flickr30k.toml": "flickr30k",
           "cvae_flickr30k.toml": "flickr30k", "gan_coco.toml": "coco", "cvae_coco.toml": "coco"}
ASSUMED_MFU = 0.10


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "data" / "f8k"), help="a prepared Flickr8k (default: prepare one)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per config (after 5 warm-up steps)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS),
                        help="only these configs (default: all)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    root = Path(args.data)
    if not (root / "manifest.json").is_file():
        root = prepare(root)
    peak = PEAK_BF16_TFLOPS["H200"] * 1e12
    rows = []
    for name in args.configs:
        dataset = CONFIGS[name]
        cfg = config_lib.load(REPO / "t2i" / "configs" / name)
        step = bench_family(REPO / "t2i" / "configs" / name, root, torch.device("cpu"), cfg.data.batch_size, 1,
                            args.steps)
        images = TRAIN_IMAGES[dataset]
        vectors = np.zeros((10_000, 50), np.float32)  # the frozen word table: not counted
        networks = [build_model(cfg.model, vectors)] + ([build_discriminator(cfg.model, vectors)]
                                                          if cfg.model.family == "gan" else [])
        epoch_s = images / step["images_per_s"]
        flops_per_image = step["flops_per_step"] / cfg.data.batch_size
        rows.append({"config": name, "dataset": dataset, "params_m": sum(map(count_parameters, networks)) / 1e6, "train_images": images, "epochs": cfg.train.epochs,
                     "batch": cfg.data.batch_size, "steps_per_epoch": -(-images // cfg.data.batch_size),
                     "cpu_images_per_s": step["images_per_s"], "cpu_epoch_s": epoch_s,
                     "cpu_run_s": epoch_s * cfg.train.epochs, "gflops_per_image": flops_per_image / 1e9,
                     "gpu_epoch_s_at_peak": flops_per_image * images / peak,
                     "gpu_epoch_s_at_assumed_mfu": flops_per_image * images / (peak * ASSUMED_MFU)})
        r = rows[-1]
        print(f"{name:22s} {dataset:9s} {r['params_m']:.1f}M parameters, {images:>6,} images x {r['epochs']:>3} "
              f"epochs, batch {r['batch']:>3}: "
              f"{r['cpu_images_per_s']:6.1f} images/s here -> {hours(epoch_s)} per epoch, {hours(r['cpu_run_s'])} "
              f"per run; {r['gflops_per_image']:.2f} GFLOP/image, {r['steps_per_epoch']} steps/epoch -> H200 epoch "
              f"{r['gpu_epoch_s_at_peak']:.3f} s at peak, {r['gpu_epoch_s_at_assumed_mfu']:.2f} s at "
              f"{ASSUMED_MFU:.0%} MFU", flush=True)
    print(json.dumps(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
