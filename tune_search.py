"""Hyperparameter sweep with Ray Tune: `python tune_search.py [--config FILE] [--set k=v ...]`.

The sweep file (default configs/sweeps/default.toml) names a base training config and a [space] of
hyperparameters. Running the same command again resumes an interrupted sweep. The last line
printed is one JSON object: best hyperparameters, metric, config file and checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from t2i import config as config_lib
from t2i.cli import EntryScript, run_job

SCRIPT = EntryScript(
    description=__doc__.splitlines()[0],
    default_config=Path(__file__).resolve().parent / "configs" / "sweeps" / "default.toml",
    config_help="sweep file: [search] and [space] tables",
    set_help="search.<option>=... or any training key for every trial (repeatable)",
    smoke_help="2 tiny trials, to check the setup",
    smoke=("search.num_samples=2", "search.name=smoke-sweep", *config_lib.SMOKE_TEST))


def main(argv: list[str] | None = None) -> int:
    args, overrides = SCRIPT.parse(argv)

    def work() -> dict:
        from t2i.runtime import tune as sweep  # noqa: PLC0415 - keep --help fast

        search, base = sweep.load_search(args.config, overrides)
        return sweep.run(search, base)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
