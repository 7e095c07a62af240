"""Train the text-to-image VAE on Ray: `python train_job.py [--config FILE] [--set k=v ...]`.

With no --data / data.path it prepares the built-in shapes set (cached) and trains on it.
On a cluster: `ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . --
python train_job.py --data s3://bucket/f8k --set train.storage_path=s3://bucket/runs` (cluster/README.md).
The last line printed is one JSON object: run dir, best and latest checkpoints, metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2i import config as config_lib
from t2i import console
from t2i.cli import run_job

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "shapes.toml"
# Its own run name: a smoke test never resumes (or collides with) the default run's folder.
SMOKE = ["train.name=smoke-test", "data.shapes_n=300", "data.batch_size=32", "train.epochs=2", "model.width=8",
         "model.hidden=64", "model.latent_dim=8", "data.samples_per_prompt=2"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="TOML config file (default: configs/shapes.toml, the built-in data)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--data", help="prepared dataset folder or URI (same as --set data.path=...)")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny 2-epoch run to check the setup")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own logs and progress bars (or set T2I_VERBOSE=1)")
    args = parser.parse_args(argv)
    console.set_verbose(args.verbose)
    overrides = (SMOKE if args.smoke_test else []) + args.overrides
    if args.data:
        overrides.append(f"data.path={args.data}")

    def work() -> dict:
        cfg = config_lib.load(args.config, overrides)
        from t2i.train import fit  # noqa: PLC0415 - config errors should not wait for Ray's import

        return fit(cfg)

    return run_job(work)


if __name__ == "__main__":
    sys.exit(main())
