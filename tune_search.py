"""Hyperparameter sweep with Ray Tune: `python tune_search.py [--config FILE] [--set k=v ...]`.

The sweep file (default configs/sweeps/default.toml) names a base training config and a [space] of
hyperparameters. Running the same command again resumes an interrupted sweep. The last line
printed is one JSON object: best hyperparameters, metric, config file and checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2i import console
from t2i.cli import run_job

DEFAULT_SEARCH = Path(__file__).resolve().parent / "configs" / "sweeps" / "default.toml"
SMOKE = ["search.num_samples=2", "search.name=smoke-sweep", "train.epochs=2", "data.shapes_n=300",
         "data.batch_size=32", "model.width=8", "model.hidden=64", "data.samples_per_prompt=2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_SEARCH), help="sweep file: [search] and [space] tables")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="search.<option>=... or any training key for every trial (repeatable)")
    parser.add_argument("--data", help="prepared dataset folder or URI (same as --set data.path=...)")
    parser.add_argument("--smoke-test", action="store_true", help="2 tiny trials, to check the setup")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own logs and progress bars (or set T2I_VERBOSE=1)")
    args = parser.parse_args(argv)
    console.set_verbose(args.verbose)
    overrides = (SMOKE if args.smoke_test else []) + args.overrides
    if args.data:
        overrides.append(f"data.path={args.data}")

    def work() -> dict:
        from t2i import tune as sweep  # noqa: PLC0415 - keep --help fast

        search, base = sweep.load_search(args.config, overrides)
        return sweep.run(search, base)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
