"""A paper estimate of data-parallel scaling: gradient bytes per step against compute per step.

For each shipped config at its own batch size per worker, one training step is counted here
on the CPU (torch's FlopCounterMode: forward + backward of every network the family trains)
and its gradient all-reduce is sized (fp32 gradients of every trainable parameter; DDP
all-reduces them whatever autocast computes in). Then, for an A10G node (AWS g5, 10 Gbit/s
between nodes) and an H100 node (AWS p5, 3,200 Gbit/s EFA), it prints:

  compute ms  = FLOPs / (dense bf16 peak x UTILISATION)   -- an assumption, not a measurement
  allreduce ms = 2 (N - 1) / N x gradient bytes / link bandwidth (ring all-reduce), N = 8

More workers pay off while the all-reduce hides behind the backward pass (DDP overlaps them),
i.e. while ``allreduce / compute`` stays well below 1. Nothing here runs on a GPU or a
network: it is arithmetic on counted FLOPs and bytes, to read beside measured runs.

    python benchmarks/scaling_estimate.py [--utilisation 0.2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from t2i import config as config_lib
from t2i.training import encoders
from t2i.training.families import make_family

CONFIGS = ("shapes.toml", "seed_model1.toml", "cvae.toml", "gan.toml")
VOCAB = 8_000  # about Flickr8k's (the frozen word table is a buffer: no gradient, no FLOPs to speak of)
# name: (dense bf16 peak TFLOP/s from the vendor data sheet, link between nodes in Gbit/s)
GPUS = {"A10G (g5, 10 Gbit/s)": (70.0, 10.0), "H100 (p5, 3200 Gbit/s EFA)": (989.0, 3200.0)}
WORKERS = 8


def step_cost(config_file: str) -> dict:
    cfg = config_lib.load(REPO / "t2i" / "configs" / config_file)
    vectors = np.random.default_rng(0).standard_normal((VOCAB, 50)).astype(np.float32)
    aligner = encoders.build(encoders.ALIGNMENT_LOSS, vectors) if cfg.loss.align_weight > 0 else None
    torch.manual_seed(0)
    family = make_family(cfg, vectors, aligner)
    family.wrap(lambda net: net)
    batch = cfg.data.batch_size
    images = torch.rand(batch, 3, 64, 64)
    word_ids = torch.randint(1, VOCAB, (batch, 16))
    with FlopCounterMode(display=False) as counter:
        family.train_step(images, word_ids, 1.0)
    params = sum(p.numel() for net in family.networks().values() for p in net.parameters() if p.requires_grad)
    return {"config": config_file, "family": cfg.model.family, "batch": batch, "params": params,
            "grad_bytes": 4 * params, "flops": counter.get_total_flops()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utilisation", type=float, default=0.2,
                        help="assumed fraction of the dense bf16 peak a step reaches (default 0.2)")
    args = parser.parse_args()
    print(f"| config | family | batch/worker | trained params | gradient MB | GFLOP/step | GPU | compute ms "
          f"(at {args.utilisation:.0%} of peak) | all-reduce ms (N={WORKERS}) | all-reduce / compute |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config_file in CONFIGS:
        cost = step_cost(config_file)
        for gpu, (tflops, gbits) in GPUS.items():
            compute_ms = cost["flops"] / (tflops * 1e12 * args.utilisation) * 1e3
            allreduce_ms = 2 * (WORKERS - 1) / WORKERS * cost["grad_bytes"] / (gbits * 1e9 / 8) * 1e3
            print(f"| {cost['config']} | {cost['family']} | {cost['batch']} | {cost['params'] / 1e6:.2f}M "
                  f"| {cost['grad_bytes'] / 1e6:.1f} | {cost['flops'] / 1e9:.1f} | {gpu} | {compute_ms:.2f} "
                  f"| {allreduce_ms:.2f} | {allreduce_ms / compute_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
