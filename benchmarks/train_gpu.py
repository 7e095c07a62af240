"""Train one config on one GPU for a fixed time, with the Ray Train worker's own step, outside Ray.

    python benchmarks/train_gpu.py --config gan_gpu --data data/f8k --minutes 6 --out runs/gpu/gan_gpu
        [--set optim.ema_decay=0.999] [--checkpoints 2]

For a GPU machine that has PyTorch but not Ray (`t2i train --set train.use_gpu=true` is the
way to train where Ray is installed). The step, the cached shard, the per-(seed, epoch) draws
and the checkpoint format are the worker's (bench_gpu's ``make_worker``); what Ray adds and
this leaves out is the per-epoch dev pass (so no best-epoch selection: the last epoch is
saved), the sample grids and the run files. Two epochs are timed first; ``train.epochs`` is
then set to what fits in ``--minutes`` (at most the config's), so a schedule ends where the run
does. Writes ``OUT/model.pt`` (+ meta.json; ``t2i evaluate --checkpoint OUT`` scores it;
with ``optim.ema_decay`` the average, and the trained weights in ``OUT/trained/``),
``--checkpoints`` earlier ones as ``OUT/epoch_NNN/``, and ``OUT/epochs.jsonl`` (seconds and
mean training terms per epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import torch
from bench_gpu import make_worker, sync

from t2i import config as config_lib
from t2i.data.feed import epoch_seed
from t2i.training import checkpoint as ckpt_lib
from t2i.training.optim import extend_schedule

CALIBRATION_EPOCHS = 2
OVERRUN = 1.1  # stop early past 110% of --minutes


def run_epoch(worker, epoch: int, device: torch.device) -> dict:
    """One epoch as ``train_func`` runs it: seeds from (seed, epoch, rank 0), every full batch."""
    cfg = worker.cfg
    torch.manual_seed(epoch_seed(cfg.train.seed, epoch, 0))
    worker.family.train(True)
    sums: dict[str, torch.Tensor] = {}
    steps, started = 0, time.perf_counter()
    n = len(worker.cache)
    for batch in worker.cache.epoch_batches(cfg.data.batch_size, cfg.train.seed, epoch, 0):
        terms = worker.step(batch, epoch + steps * cfg.data.batch_size / n)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.float()
        steps += 1
    sync(device)
    seconds = time.perf_counter() - started
    worker.family.end_epoch(-float(epoch))  # no dev metric here: epoch-driven schedules only ("plateau" never decays)
    return {"epoch": epoch, "seconds": round(seconds, 3), "steps": steps,
            "images_per_s": round(steps * cfg.data.batch_size / seconds, 1),
            **{f"train_{k}": round(float(v) / max(steps, 1), 5) for k, v in sums.items()}}


def save(worker, root: Path, folder: Path, epoch: int, epochs: int, record: dict) -> None:
    """The generator (averaged, where the config averages) as a t2i checkpoint, without the
    discriminator and optimizer state (not resumable; a third of the size)."""
    manifest = worker.manifest  # read (and its shards checksummed) once, by make_worker
    cfg = config_lib.apply(config_lib.from_dict(worker.cfg.to_dict()), {"train": {"epochs": epochs}})
    folder.mkdir(parents=True, exist_ok=True)
    data = {"dataset": manifest["dataset"], "path": str(root), "image_size": manifest["image_size"],
            "max_words": manifest["max_words"], "embedding": manifest["embedding"], "mode": "cache"}
    metrics = {"selection": -float(epoch), "selected_by": "latest epoch",
               **{k: v for k, v in record.items() if k.startswith("train_")}}
    ckpt_lib.save(folder, model=worker.family.generator, cfg=cfg, vocab=worker.vocab, epoch=epoch,
                  metrics=metrics, data=data)
    if getattr(worker.family, "ema", None) is not None:  # the trained weights too, to score both
        (folder / "trained").mkdir(exist_ok=True)
        trained_cfg = config_lib.apply(config_lib.from_dict(cfg.to_dict()), {"optim": {"ema_decay": 0.0}})
        ckpt_lib.save(folder / "trained", model=worker.family.model, cfg=trained_cfg, vocab=worker.vocab,
                      epoch=epoch, metrics=metrics, data=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config name or .toml file")
    parser.add_argument("--data", required=True, help="a prepared dataset folder")
    parser.add_argument("--minutes", type=float, required=True, help="training time budget")
    parser.add_argument("--out", required=True, help="folder for model.pt and epochs.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--checkpoints", type=int, default=0, help="earlier checkpoints, evenly spaced")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device, root, out = torch.device(args.device), Path(args.data), Path(args.out)
    torch.backends.cudnn.benchmark = True
    cfg = config_lib.load(args.config, [f"data.path={root}", *args.set])
    started = time.perf_counter()
    worker = make_worker(cfg, root, device)
    print(f"{args.config}: {len(worker.cache)} images cached on {device} in {time.perf_counter() - started:.1f} s; "
          f"bf16 {worker.bf16}; batch {cfg.data.batch_size}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "epochs.jsonl").open("w")
    budget_s, epochs, keep = args.minutes * 60, cfg.train.epochs, set()
    train_started = time.perf_counter()
    epoch = 0
    while epoch < epochs:
        record = run_epoch(worker, epoch, device)
        record["elapsed_s"] = round(time.perf_counter() - train_started, 1)
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)
        if epoch + 1 == CALIBRATION_EPOCHS:  # the first epoch includes cuDNN's autotuning
            per_epoch = record["seconds"]
            epochs = max(CALIBRATION_EPOCHS, min(epochs, math.floor((budget_s - record["elapsed_s"]) / per_epoch)
                                                 + CALIBRATION_EPOCHS))
            for scheduler in worker.family.schedulers.values():
                extend_schedule(scheduler, epochs)
            keep = {epochs * (i + 1) // (args.checkpoints + 1) - 1 for i in range(args.checkpoints)}
            print(f"{per_epoch:.2f} s per epoch: training {epochs} epochs "
                  f"(config: {cfg.train.epochs}) in {args.minutes} min", flush=True)
        if epoch + 1 > CALIBRATION_EPOCHS and epoch + 1 < epochs and record["elapsed_s"] > budget_s * OVERRUN:
            print(f"over the budget after epoch {epoch}: stopping here", flush=True)  # e.g. a shared GPU slowed
            epochs = epoch + 1
        if epoch in keep:
            save(worker, root, out / f"epoch_{epoch:03d}", epoch, epochs, record)
        epoch += 1
    save(worker, root, out, epoch - 1, epochs, record)
    summary = {"config": args.config, "overrides": args.set, "epochs": epochs, "config_epochs": cfg.train.epochs,
               "train_s": round(time.perf_counter() - train_started, 1), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "bf16": worker.bf16}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
