"""Per-run metrics where common tools read them, and a loss-curve picture.

Every epoch, rank 0 rewrites three files in the run folder (local or URI):
``metrics.jsonl`` (one JSON object per epoch), ``metrics.csv`` (the same as a table, for
spreadsheets and pandas) and ``samples/loss_curve.png`` beside the sample grids. The
files are rewritten whole, not appended, because object stores cannot append; a resumed
run drops the rows of epochs it is about to redo, so each epoch appears once.
"""

from __future__ import annotations

import io
import json

from t2i import storage

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
LOSS_CURVE = "samples/loss_curve.png"


def read_history(run_dir: str) -> list[dict]:
    path = storage.join(run_dir, METRICS_JSONL)
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def record_epoch(run_dir: str, metrics: dict) -> list[dict]:
    """Add this epoch's metrics to the run's history files; returns the history."""
    history = [row for row in read_history(run_dir) if row.get("epoch", -1) < metrics["epoch"]]
    history.append(dict(metrics))
    storage.write_text(storage.join(run_dir, METRICS_JSONL), "".join(json.dumps(r) + "\n" for r in history))
    storage.write_csv(storage.join(run_dir, METRICS_CSV), history)
    storage.write_bytes(storage.join(run_dir, LOSS_CURVE), loss_curve_png(history))
    return history


def loss_curve_png(history: list[dict]) -> bytes:
    """Loss per epoch (train and every evaluation split) and the reconstruction MSE."""
    import matplotlib  # noqa: PLC0415 - only rank 0 draws, once per epoch

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    epochs = [row["epoch"] + 1 for row in history]
    # "train_loss", "dev_loss", ... (not the gan's "train_d_loss": that is a term, not a split)
    splits = [key[: -len("_loss")] for key in history[-1] if key.endswith("_loss") and key.count("_") == 1]
    figure = Figure(figsize=(8, 3.2), dpi=100)
    loss_axes, mse_axes = figure.subplots(1, 2)
    for split in splits:
        style = {"marker": "o", "markersize": 3}
        loss_axes.plot(epochs, [row.get(f"{split}_loss") for row in history], label=split, **style)
        if f"{split}_mse" in history[-1]:
            mse_axes.plot(epochs, [row.get(f"{split}_mse") for row in history], label=f"{split} reconstruction",
                          **style)
        if f"{split}_gen_mse" in history[-1]:  # the checkpoint-selection metric
            mse_axes.plot(epochs, [row.get(f"{split}_gen_mse") for row in history], linestyle="--",
                          label=f"{split} from caption alone", **style)
    loss_axes.set(title="loss (VAE: negative ELBO; gan: G loss)", xlabel="epoch")
    mse_axes.set(title="MSE per pixel", xlabel="epoch")
    for axes in (loss_axes, mse_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
