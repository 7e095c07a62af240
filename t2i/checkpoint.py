"""Checkpoints: one ``model.pt`` holding config + vocabulary + weights + optimizer and
scheduler state + epoch + metrics, so generation rebuilds the model from the file alone.

Loaded with ``torch.load(weights_only=True)``: only tensors and plain containers, never
arbitrary pickled objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2i import config as config_lib
from t2i.models import TextToImageVAE, build_model
from t2i.text import Vocabulary

FORMAT = "t2i-checkpoint/1"
FILENAME = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, foreign or incompatible."""


@dataclass
class LoadedCheckpoint:
    model: TextToImageVAE
    vocab: Vocabulary
    config: config_lib.Config
    state: dict  # the raw dict: optimizer, scheduler, epoch, metrics, data


def state_dict_of(model: torch.nn.Module) -> dict:
    """Weights without the DDP ``module.`` wrapper."""
    return getattr(model, "module", model).state_dict()


def save(path: str | Path, *, model: torch.nn.Module, cfg: config_lib.Config, vocab: Vocabulary,
         epoch: int, metrics: dict, optimizer=None, scheduler=None, data: dict | None = None) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "vocab": list(vocab.words),
        "model": state_dict_of(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "data": data or {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written model.pt behind
    return path


def read_state(path: str | Path) -> dict:
    """The raw checkpoint dict, with clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # mmap: finding a run's newest epoch reads a few bytes per checkpoint, not every weight.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a t2i checkpoint (expected format {FORMAT!r})")
    return state


def load(path: str | Path) -> LoadedCheckpoint:
    state = read_state(path)
    cfg = config_lib.from_dict(state["config"])
    words = state["vocab"]
    vectors = state["model"]["text.vectors"].numpy()
    model = build_model(cfg.model, np.zeros_like(vectors))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model config stored with them: {exc}") from exc
    model.eval()
    return LoadedCheckpoint(model, Vocabulary(words, vectors), cfg, state)


def check_compatible(state: dict, cfg: config_lib.Config, where: str) -> None:
    """Resuming needs the same model; anything else would silently reinitialise layers."""
    saved = state["config"]["model"]
    wanted = cfg.to_dict()["model"]
    diffs = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diffs:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"{where} was trained with a different model config ({shown}); "
                              "use a new train.name or the original config")


_EPOCH_DIR = re.compile(r"checkpoint_")


def latest_in_run(run_dir: str | Path) -> Path | None:
    """The newest ``model.pt`` (by epoch) under a run directory, or None."""
    best: tuple[int, Path] | None = None
    for path in Path(run_dir).glob("checkpoint_*/" + FILENAME):
        epoch = read_state(path)["epoch"]
        if best is None or epoch > best[0]:
            best = (epoch, path)
    return None if best is None else best[1]
