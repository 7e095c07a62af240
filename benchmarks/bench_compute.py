"""Compute efficiency of the training step on this CPU: what a performance engineer would try.

Each variant runs bench_train's plain loop (t2i's training step over the train split in
memory, no Ray) for a few epochs and reports steady images/s and achieved FLOP/s / this
CPU's fp32 matmul FLOP/s (same threads). FLOPs per image come from torch's FlopCounterMode
on the eager model (a compiled step does the same arithmetic). All in one run:

    python benchmarks/bench_compute.py [--config shapes] [--n 3000] [--epochs 3]

Variants: t2i's default (channels-last tensors and weights, fused Adam), NCHW (PyTorch's
default layout), Adam with foreach (PyTorch's default, t2i's before fused),
torch.compile (inductor; needs a C++ compiler), larger batches (64, 128: a different
training recipe, so only kept if the loss allows), and one thread instead of all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_train import matmul_flops, plain_loop

from t2i import config as config_lib
from t2i.data.dataset import load_vocabulary
from t2i.data.prepare import prepare_shapes
from t2i.runtime.ray_env import usable_cpus
from t2i.training.families import make_family


def run_variant(config: str, root: Path, epochs: int, threads: int, batch: int | None = None,
                compile_nets: bool = False, foreach: bool = False, channels_last: bool = True) -> dict:
    cfg = config_lib.load(config, [f"data.batch_size={batch}"] if batch else [])
    prepare = (lambda net: torch.compile(net)) if compile_nets else None
    original = torch.optim.Adam

    class ForeachAdam(original):  # a pass per elementwise op over all parameters (t2i fuses them)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "fused": None, "foreach": True})

    if foreach:
        torch.optim.Adam = ForeachAdam
    try:
        result = plain_loop(cfg, root, epochs, threads, prepare, channels_last)
    finally:
        torch.optim.Adam = original
    result["flop_per_image"] = result["flop_per_step"] / cfg.data.batch_size
    result["batch_size"] = cfg.data.batch_size
    return result


def optimizer_step_ms(config: str, vectors, threads: int, rounds: int = 3, steps: int = 200) -> dict[str, float]:
    """The parameter update alone (t2i's fused Adam vs foreach), ms per step, the default
    model's parameters with fixed gradients, interleaved rounds; the median is returned."""
    torch.set_num_threads(threads)
    cfg = config_lib.load(config)
    params = [p for p in make_family(cfg, vectors).generator.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, kernel in {"fused": {"fused": True}, "foreach": {"foreach": True}}.items():
            optimizer = torch.optim.Adam(params, lr=1e-4, **kernel)
            for _ in range(10):
                optimizer.step()
            started = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            times.setdefault(name, []).append((time.perf_counter() - started) / steps * 1000)
    return {name: statistics.median(ms) for name, ms in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "t2i" / "configs" / "shapes.toml"))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="run every variant this many times, interleaved (this machine's speed drifts by "
                             "tens of percent within minutes); the mean is reported, with min-max")
    args = parser.parse_args()
    threads = usable_cpus()
    variants = {
        "default": {}, "NCHW": {"channels_last": False}, "foreach Adam": {"foreach": True},
        "torch.compile": {"compile_nets": True},
        "batch 64": {"batch": 64}, "batch 128": {"batch": 128},
    }
    runs: dict[str, list[dict]] = {}
    chosen = [name for name in [*variants, "1 thread"] if not args.only or name in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shapes"
        prepare_shapes(root, n=args.n, seed=0)
        matmuls = {threads: [], 1: []}
        for _ in range(args.rounds):
            for t in matmuls:
                matmuls[t].append(matmul_flops(t))
            for name in chosen:
                t = 1 if name == "1 thread" else threads
                runs.setdefault(name, []).append(run_variant(args.config, root, args.epochs, t, **variants.get(name, {})))
        update_ms = optimizer_step_ms(args.config, load_vocabulary(root).vectors, threads)
    matmul = {t: sum(v) / len(v) for t, v in matmuls.items()}
    eager_flops = {r[0]["batch_size"]: r[0]["flop_per_image"] for name, r in runs.items() if name != "torch.compile"}
    print(f"{'variant':<14} {'batch':>5} {'images/s':>9} {'(min-max)':>11} {'GFLOP/s':>8} {'efficiency':>10} "
          f"{'first epoch s':>13}")
    summary = {}
    for name, rs in runs.items():
        t = 1 if name == "1 thread" else threads
        rates = [r["images_per_s"] for r in rs]
        rate = sum(rates) / len(rates)
        flops = eager_flops.get(rs[0]["batch_size"], rs[0]["flop_per_image"]) * rate
        first = sum(r["epoch_s"][0] for r in rs) / len(rs)
        summary[name] = {"images_per_s": rate, "runs": rates, "efficiency": flops / matmul[t],
                         "batch": rs[0]["batch_size"], "threads": t, "first_epoch_s": first}
        print(f"{name:<14} {rs[0]['batch_size']:>5} {rate:>9.0f} {f'{min(rates):.0f}-{max(rates):.0f}':>11} "
              f"{flops / 1e9:>8.1f} {flops / matmul[t]:>10.3f} {first:>13.1f}")
    print(f"matmul fp32: {matmul[threads] / 1e9:.1f} GFLOP/s ({threads} threads; runs "
          f"{', '.join(f'{m / 1e9:.0f}' for m in matmuls[threads])}), {matmul[1] / 1e9:.1f} (1 thread)")
    print(f"Adam's update alone, ms per step: fused (t2i's) {update_ms['fused']:.2f}, "
          f"foreach {update_ms['foreach']:.2f}")
    summary["adam_update_ms"] = update_ms
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
