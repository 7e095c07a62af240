"""Train the text-to-image VAE on Ray: `python train_job.py [--config FILE] [--set k=v ...]`.

With no --data / data.path it prepares the built-in shapes set (cached) and trains on it.
On a cluster: `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . --
python train_job.py --data s3://bucket/f8k --set train.storage_path=s3://bucket/runs` (cluster/README.md).
The last line printed is one JSON object: run dir, best and latest checkpoints, metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

from t2i import config as config_lib
from t2i.cli import EntryScript, run_job

SCRIPT = EntryScript(
    description=__doc__.splitlines()[0],
    default_config=Path(__file__).resolve().parent / "configs" / "shapes.toml",
    config_help="TOML config file (default: configs/shapes.toml, the built-in data)",
    set_help="override one config key, e.g. --set optim.lr=3e-4 (repeatable)",
    smoke_help="a tiny 2-epoch run to check the setup",
    # Its own run name: a smoke test never resumes (or collides with) the default run's folder.
    smoke=("train.name=smoke-test", *config_lib.SMOKE_TEST))


def main(argv: list[str] | None = None) -> int:
    args, overrides = SCRIPT.parse(argv)

    def work() -> dict:
        cfg = config_lib.load(args.config, overrides)
        from t2i.training.driver import fit  # noqa: PLC0415 - config errors should not wait for Ray's import

        return fit(cfg)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
