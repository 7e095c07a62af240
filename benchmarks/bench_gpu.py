"""GPU training throughput, ready to run as is on a machine with one CUDA GPU.

    python benchmarks/bench_gpu.py [--batch 1024] [--epochs 3] [--out gpu.json] [--data PREPARED]

Prepares Flickr8k at 64x64 from ../shared/data/flickr8k (or the built-in shapes set when it
is absent) into a temporary folder, then for Model 1 (the seed_model1 config) and the gan
(the gan config, the best generative family; its alignment-loss encoder is trained first
and not timed) runs what a Ray Train worker runs with its shard cached on the GPU (the
worker's ``ShardCache``: every epoch reshuffles it and draws one caption per image there,
no host transfers): a warm-up of a few steps, then ``--epochs`` timed epochs at
``--batch`` with bf16 autocast where the GPU computes bf16 natively. Prints per family the
warm-up seconds, epoch seconds, training images/s, GPU utilisation sampled by nvidia-smi
every 100 ms, and an MFU estimate (FLOPs of one step counted by torch's FlopCounterMode x
steps/s, over the GPU's dense bf16 peak). On a CPU it runs too (``--device cpu``, for a
smoke test), with MFU against a measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import pyarrow.parquet as pq
import torch

from t2i import config as config_lib
from t2i.data.dataset import load_manifest, load_vocabulary, shard_paths
from t2i.data.feed import ShardCache, to_model_inputs
from t2i.data.prepare import prepare_flickr8k, prepare_shapes
from t2i.data.text import Vocabulary
from t2i.training import encoders
from t2i.training.families import Family, make_family

FLICKR8K = REPO.parent / "shared" / "data" / "flickr8k"
# Dense bf16 tensor-core peaks (vendor data sheets, no sparsity), by device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def prepare(out: Path) -> Path:
    if (FLICKR8K / "Flickr8k_text").is_dir():
        prepare_flickr8k(FLICKR8K, out, size=64)
    else:
        print(f"no Flickr8k at {FLICKR8K}: using the built-in shapes set", flush=True)
        prepare_shapes(out, n=20000)
    return out


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} dense bf16 data-sheet peak"
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 2048 ** 3 * 10 / (time.perf_counter() - start), f"measured fp32 matmul on {device}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuUtilisation:
    """nvidia-smi sampling every 100 ms in the background (None where there is no nvidia-smi)."""

    def __enter__(self):
        self.samples: list[float] = []
        binary = shutil.which("nvidia-smi")
        self.process = subprocess.Popen(
            [binary, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, text=True) if binary else None
        return self

    def __exit__(self, *exc):
        if self.process:
            self.process.terminate()
            out = self.process.communicate(timeout=10)[0]
            self.samples = [float(line.split(",")[0]) for line in out.split() if line.strip().replace(".", "").isdigit()]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


@dataclass
class Worker:
    """What a Ray Train worker holds for one config: its networks, its cached shard and its step."""
    cfg: config_lib.Config
    manifest: dict
    vocab: Vocabulary
    family: Family
    cache: ShardCache
    autocast: Callable[[], contextlib.AbstractContextManager]  # bf16 autocast, or a no-op
    bf16: bool

    def step(self, batch_dict: dict, progress: float) -> dict:
        images, word_ids = to_model_inputs(batch_dict, self.cache.images.device)
        return self.family.train_step(images, word_ids, progress, self.autocast)


def make_worker(cfg: config_lib.Config, root: Path, device: torch.device) -> Worker:
    """One worker as ``t2i.training.loop.train_func`` sets it up (alignment encoder frozen,
    networks channels-last, bf16 autocast where the GPU computes it natively), with the
    train split cached on ``device``; Ray itself stays out (one GPU: no DDP wrapper)."""
    manifest = load_manifest(root)
    vocab = load_vocabulary(root)
    aligner = None
    if cfg.loss.align_weight > 0:  # trained (or read from its cache) before timing, as on the driver
        aligner = encoders.load_or_train(encoders.ALIGNMENT_LOSS, str(root), manifest, vocab).to(device)
    torch.manual_seed(cfg.train.seed)
    family = make_family(cfg, vocab.vectors, aligner)
    for net in family.networks().values():
        net.to(memory_format=torch.channels_last)
    family.wrap(lambda net: net.to(device))
    family.move_frozen_helpers(device)
    tables = [pq.read_table(path) for path in shard_paths(root, manifest, "train")]
    cache = ShardCache.from_train_tables(tables, manifest["image_size"], device)
    bf16 = device.type == "cuda" and cfg.train.amp and torch.cuda.is_bf16_supported(including_emulation=False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return Worker(cfg, manifest, vocab, family, cache, autocast, bf16)


def bench_family(config_file: Path, root: Path, device: torch.device, batch: int, epochs: int,
                 max_steps: int | None = None) -> dict:
    """``epochs`` timed epochs (at most ``max_steps`` steps each) of the config's training step."""
    cfg = config_lib.load(config_file, [f"data.path={root}", f"data.batch_size={batch}"])
    worker = make_worker(cfg, root, device)
    cache, step, bf16 = worker.cache, worker.step, worker.bf16

    first = next(cache.epoch_batches(batch, 0, 0, 0))
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    started = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        step(first, 0.0)
    for _ in range(4):  # warm-up: cuDNN autotuning, allocator, first kernels
        step(first, 0.0)
    sync(device)
    warmup_s = time.perf_counter() - started
    epoch_s, images_seen = [], 0
    with GpuUtilisation() as utilisation:
        for epoch in range(epochs):
            sync(device)
            started = time.perf_counter()
            steps = 0
            for batch_dict in cache.epoch_batches(batch, 0, epoch + 1, 0):
                step(batch_dict, (epoch + 1) + steps * batch / len(cache))
                steps += 1
                if steps == max_steps:
                    break
            sync(device)
            epoch_s.append(time.perf_counter() - started)
            images_seen += steps * batch
    total = sum(epoch_s)
    peak, peak_source = peak_flops(device)
    steps_per_s = images_seen / batch / total
    return {"config": config_file.name, "family": cfg.model.family, "train_images": len(cache), "batch": batch,
            "bf16": bf16, "warmup_s": round(warmup_s, 2), "epoch_s": [round(s, 3) for s in epoch_s],
            "images_per_s": round(images_seen / total, 1),
            "gpu_utilisation_pct": utilisation.mean, "flops_per_step": counter.get_total_flops(),
            "mfu": counter.get_total_flops() * steps_per_s / peak, "peak_flops": peak, "peak_source": peak_source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024, help="training batch (GPU-sized)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per family")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=["seed_model1.toml", "gan.toml"])
    parser.add_argument("--data", help="an already prepared dataset folder (default: prepare one)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="t2i-bench-gpu-") as tmp:
        root = Path(args.data) if args.data else prepare(Path(tmp) / "data")
        for name in args.configs:
            result = bench_family(REPO / "t2i" / "configs" / name, root, device, args.batch, args.epochs)
            results.append(result)
            util = f"{result['gpu_utilisation_pct']:.0f}%" if result["gpu_utilisation_pct"] is not None else "n/a"
            print(f"{name}: {result['train_images']} images, batch {args.batch}, bf16 {result['bf16']} | warm-up "
                  f"{result['warmup_s']} s | epochs {result['epoch_s']} s | {result['images_per_s']:,.0f} images/s | "
                  f"GPU util {util} | MFU {result['mfu']:.3f} ({result['peak_source']})", flush=True)
    goal = 15000
    print(f"goal >= {goal:,} images/s: " + ", ".join(f"{r['config']} {'met' if r['images_per_s'] >= goal else 'not met'}"
                                                    for r in results))
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
