"""Compute efficiency of the training step on this CPU: what a performance engineer would try.

Each variant runs bench_train's plain loop (t2i's training step over the train split in
memory, no Ray) for a few epochs and reports steady images/s and achieved FLOP/s / this
CPU's fp32 matmul FLOP/s (same threads). FLOPs per image come from torch's FlopCounterMode
on the eager model (a compiled step does the same arithmetic). All in one run:

    python benchmarks/bench_compute.py [--config configs/shapes.toml] [--n 3000] [--epochs 3]

Variants: the default (channels-last tensors and weights, Adam with foreach), NCHW
(PyTorch's default layout), fused Adam,
torch.compile (inductor; needs a C++ compiler), larger batches (64, 128: a different
training recipe, so only kept if the loss allows), and one thread instead of all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_train import matmul_flops, plain_loop  # noqa: E402

from t2i import config as config_lib  # noqa: E402
from t2i.prepare import prepare_shapes  # noqa: E402
from t2i.train import usable_cpus  # noqa: E402


def run_variant(config: str, root: Path, epochs: int, threads: int, batch: int | None = None,
                compile_nets: bool = False, fused: bool = False, channels_last: bool = True) -> dict:
    cfg = config_lib.load(config, [f"data.batch_size={batch}"] if batch else [])
    prepare = (lambda net: torch.compile(net)) if compile_nets else None
    if fused:  # Adam(fused=True): one kernel per step for all parameters (CPU support since torch 2.4)
        original = torch.optim.Adam

        class FusedAdam(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "fused": True, "foreach": None})

        torch.optim.Adam = FusedAdam
    try:
        result = plain_loop(cfg, root, epochs, threads, prepare, channels_last)
    finally:
        if fused:
            torch.optim.Adam = original
    result["flop_per_image"] = result["flop_per_step"] / cfg.data.batch_size
    result["batch_size"] = cfg.data.batch_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "shapes.toml"))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    threads = usable_cpus()
    variants = {
        "default": {}, "NCHW": {"channels_last": False}, "fused Adam": {"fused": True}, "torch.compile": {"compile_nets": True},
        "batch 64": {"batch": 64}, "batch 128": {"batch": 128},
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "shapes"
        prepare_shapes(root, n=args.n, seed=0)
        matmul = {threads: matmul_flops(threads), 1: matmul_flops(1)}
        for name, kwargs in variants.items():
            if not args.only or name in args.only:
                results[name] = run_variant(args.config, root, args.epochs, threads, **kwargs)
        if not args.only or "1 thread" in args.only:
            results["1 thread"] = run_variant(args.config, root, args.epochs, 1)
    eager_flops = {r["batch_size"]: r["flop_per_image"] for name, r in results.items() if name != "torch.compile"}
    print(f"{'variant':<14} {'batch':>5} {'images/s':>9} {'GFLOP/s':>8} {'efficiency':>10}")
    summary = {}
    for name, r in results.items():
        t = 1 if name == "1 thread" else threads
        flops = eager_flops.get(r["batch_size"], r["flop_per_image"]) * r["images_per_s"]
        summary[name] = {"images_per_s": r["images_per_s"], "efficiency": flops / matmul[t], "batch": r["batch_size"],
                         "threads": t}
        print(f"{name:<14} {r['batch_size']:>5} {r['images_per_s']:>9.0f} {flops / 1e9:>8.1f} {flops / matmul[t]:>10.3f}")
    print(f"matmul fp32: {matmul[threads] / 1e9:.1f} GFLOP/s ({threads} threads), {matmul[1] / 1e9:.1f} (1 thread)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
