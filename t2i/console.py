"""What a person reads while a job runs: a line saying what runs where, one line per
epoch, a last line before the JSON summary (pure formatting; no Ray here).

``t2i.runtime.relay`` relays each epoch's metrics from Ray's processes to the driver and keeps
Ray's own output quiet unless ``--verbose`` (or ``T2I_VERBOSE=1``) is given; ``t2i.tune``
prints trial epochs the same way.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

VERBOSE_ENV = "T2I_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Entry scripts' ``--verbose``: the environment carries it to Ray's processes too."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def progress(iterable, desc: str, total: int | None = None, unit: str = "it"):
    """A tqdm bar on stderr for work outside training that takes more than a few seconds;
    off when stderr is not a terminal (CI logs, pipes), so only people see it."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=None, leave=False,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------- lines
def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.4g}"


# Shown when present, in this order: (metric key, label).
EPOCH_FIELDS = (("train_loss", "train loss"), ("dev_loss", "dev loss"), ("dev_mse", "dev MSE"),
                ("dev_gen_mse", "dev MSE from caption"))


def epoch_line(metrics: dict, epochs: int) -> str:
    """``epoch 3/8 | train loss 73.9 | dev loss 73.9 | ... | 112 img/s | 52s | ETA 4m20s``;
    the ETA assumes the remaining epochs take as long as this one."""
    done = int(metrics["epoch"]) + 1
    parts = [f"epoch {done}/{epochs}"]
    parts += [f"{label} {_number(metrics[key])}" for key, label in EPOCH_FIELDS if key in metrics]
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.0f} img/s")
    if "epoch_s" in metrics:
        parts.append(duration(metrics["epoch_s"]))
        parts.append(f"ETA {duration(metrics['epoch_s'] * max(0, epochs - done))}")
    return " | ".join(parts)


def failure_line(failed: dict) -> str:
    """Workers that raised or died (rank -> first line of the error)."""
    ranks = "; ".join(f"rank {rank}: {error}" for rank, error in sorted(failed.items()))
    return (f"t2i: worker failure ({ranks}); Ray Train restarts the workers from the latest checkpoint "
            "while train.max_failures allows")


def run_line(facts: dict) -> str:
    """The first line of a run: what trains on what, where, and where it writes."""
    workers = facts["workers"]
    where = "in this process (local mode)" if workers == 0 else (
        f"{workers} worker{'s' if workers > 1 else ''} x {facts['cpus_per_worker']:g} CPU"
        + (f" ({facts['cpus_reason']})" if facts.get("cpus_reason") else ""))
    share = facts.get("gpus_per_worker", 0)
    device = f"{share:g} GPU each" if facts["device"] == "GPU" and 0 < share < 1 else facts["device"]
    return (f"t2i: {facts['family']} ({facts['parameters'] / 1e6:.2f}M parameters) on {facts['dataset']} "
            f"({facts['train_images']:,} train images) | {where} on {device} | data: "
            f"{facts['data_mode']} | epochs {facts['start_epoch'] + 1}-{facts['epochs']} -> {facts['run_dir']}")


def summary_line(summary: dict, seconds: float) -> str:
    """The last line before the JSON summary."""
    if summary.get("error"):
        return f"t2i: run stopped after {summary['epochs_done']} epoch(s) ({duration(seconds)}): {summary['error']}"
    best = summary.get("best_checkpoint") or "none"
    return (f"t2i: {summary['epochs_done']} epoch(s) done in {duration(seconds)}; best checkpoint {best}; "
            f"sample grids in {summary['samples']}")
