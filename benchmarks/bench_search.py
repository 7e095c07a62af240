"""Random search vs Optuna (TPE) vs BOHB on the shapes job, with the same budget each.

Every algorithm gets the default sweep's space (t2i/configs/sweeps/default.toml), the same
number of trials, the same epochs per trial and the same early stopping rung sizes (ASHA
for random and Optuna, BOHB's own HyperBand), on the same prepared shapes set. Prints one
line per algorithm: the best dev_gen_mse any trial reached, the epochs all its trials
trained (what the budget bought), and wall time; then the winner. One seed, one data
set: a small sample (see docs/benchmarks.md for what it can and cannot show).

    python benchmarks/bench_search.py [--trials 8] [--epochs 4] [--shapes-n 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from t2i.data.prepare import prepare_shapes
from t2i.runtime.tune import load_search, run

ALGORITHMS = ("random", "optuna", "bohb")


def sweep(algorithm: str, data: Path, storage: Path, args: argparse.Namespace) -> dict:
    search, base = load_search("default", [
        f"search.algorithm={algorithm}", f"search.name={algorithm}", f"search.num_samples={args.trials}",
        f"search.seed={args.seed}", f"train.epochs={args.epochs}", f"data.path={data}",
        f"train.storage_path={storage}", "data.samples_per_prompt=2"])
    started = time.perf_counter()
    summary = run(search, base)
    seconds = time.perf_counter() - started
    with open(summary["table"]) as table:
        rows = list(csv.DictReader(table))
    return {"algorithm": algorithm, "best_dev_gen_mse": summary["best_metric"], "trials": len(rows),
            "epochs_trained": sum(int(r["epochs"]) for r in rows), "seconds": round(seconds, 1),
            "best_hyperparameters": summary["best_hyperparameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per algorithm")
    parser.add_argument("--epochs", type=int, default=4, help="most epochs one trial trains")
    parser.add_argument("--shapes-n", type=int, default=1500, help="images in the shapes set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "shapes"
        prepare_shapes(data, n=args.shapes_n, seed=0)
        results = [sweep(algorithm, data, Path(folder) / "runs", args) for algorithm in args.algorithms]
    for result in results:
        print(json.dumps(result))
    best = min(results, key=lambda r: r["best_dev_gen_mse"])
    print(f"best dev_gen_mse: {best['algorithm']} ({best['best_dev_gen_mse']:.5f}); "
          + ", ".join(f"{r['algorithm']} {r['best_dev_gen_mse']:.5f} in {r['epochs_trained']} epochs, {r['seconds']:.0f} s"
                      for r in results))


if __name__ == "__main__":
    main()
