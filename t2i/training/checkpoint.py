"""Checkpoints: one ``model.pt`` holding config + vocabulary + the generator's weights
(``model``) + the rest of the training state (``training``: other networks such as a GAN's
discriminator, every optimizer and scheduler, from ``t2i.training.families``) + epoch + metrics, so
generation rebuilds the model from the file alone.

Loaded with ``torch.load(weights_only=True)``: only tensors and plain containers, never
arbitrary pickled objects. Each checkpoint folder also holds ``meta.json`` (epoch +
metrics), so finding a run's latest or best checkpoint reads a few bytes per checkpoint,
not every weight (which matters when runs live in s3:// or gs://). Paths may be URIs.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2i import config as config_lib
from t2i import storage
from t2i.data.text import PAD, Vocabulary
from t2i.errors import T2IError
from t2i.models import TextToImage, build_model
from t2i.training import export as export_lib
from t2i.training.families import unwrap

FORMAT = "t2i-checkpoint/2"
FILENAME = "model.pt"
META = "meta.json"


class CheckpointError(T2IError):
    """A checkpoint that is missing, corrupt, foreign or incompatible."""


@dataclass
class LoadedCheckpoint:
    model: TextToImage
    vocab: Vocabulary
    config: config_lib.Config
    state: dict  # the raw dict: optimizer, scheduler, epoch, metrics, data


def save(path: str | Path, *, model: torch.nn.Module, cfg: config_lib.Config, vocab: Vocabulary,
         epoch: int, metrics: dict, training: dict | None = None, data: dict | None = None) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "vocab": list(vocab.words),
        "model": unwrap(model).state_dict(),
        "training": training or {"networks": {}, "optimizers": {}, "schedulers": {}},
        "epoch": int(epoch),
        "metrics": {k: v if isinstance(v, str) else float(v) for k, v in metrics.items()},  # selected_by: a name
        "data": data or {},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    model_bytes = tmp.stat().st_size
    tmp.replace(path)  # never leave a half-written model.pt (or meta.json) behind
    # Enough to rank, select and check a resume without reading the weights (runs in s3://).
    meta = {"format": FORMAT, "epoch": state["epoch"], "metrics": state["metrics"], "data": state["data"],
            "config": state["config"], "vocab_digest": vocab.digest(), "model_bytes": model_bytes}
    meta_tmp = path.parent / f".{META}.tmp"
    meta_tmp.write_text(json.dumps(meta))
    meta_tmp.replace(path.parent / META)
    return path


# What checkpoints are ranked by (lower is better): every epoch reports it, and
# ``selected_by`` names its source (t2i.training.families.Family.selection).
SELECTION_METRIC = "selection"


def state_digest(state) -> str:
    """A SHA-256 over nested dicts/lists of tensors and plain values, independent of tensor
    memory layout (channels-last weights hash like contiguous ones): equal digests mean an
    equal restored state."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        elif torch.is_tensor(value):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(value).encode())

    feed(state)
    return digest.hexdigest()


def model_file(location: str | Path) -> str:
    """``model.pt`` itself, given the file, its checkpoint folder, or a run folder (then the
    best checkpoint by :data:`SELECTION_METRIC`, the latest among ties); an exported folder
    (``t2i export``) is its own model file."""
    location = str(location)
    if not storage.is_dir(location) or export_lib.is_export(location):
        return location
    if storage.is_file(storage.join(location, FILENAME)):
        return storage.join(location, FILENAME)
    best = best_in_run(location)
    return best if best else storage.join(location, FILENAME)


def best_in_run(run_dir: str | Path) -> str | None:
    """The ``model.pt`` with the lowest selection metric under a run folder, or None."""
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        return None
    return min(checkpoints, key=lambda c: (c[1].get(SELECTION_METRIC, float("inf")), -c[0]))[2]


def read_state(path: str | Path) -> dict:
    """The raw checkpoint dict, with clear errors for missing, corrupt or foreign files."""
    path = model_file(path)
    if export_lib.is_export(path):
        try:
            return export_lib.read(path)
        except ValueError as exc:
            raise CheckpointError(f"{path} is a damaged t2i export: {exc}") from None
    if not storage.is_file(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if storage.is_uri(path):
            source = io.BytesIO(storage.read_bytes(path))
            state = torch.load(source, map_location="cpu", weights_only=True)
        else:  # mmap: only the tensors actually used are read from disk
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): "
                              f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a t2i checkpoint (expected format {FORMAT!r})")
    return state


def structure_problem(state: dict) -> str | None:
    """What is wrong with a checkpoint dict's structure (None when nothing): the parts every
    reader uses, with the types and shapes they need."""
    if not isinstance(state.get("config"), dict) or not all(isinstance(v, dict) for v in state["config"].values()):
        return "'config' is missing or not a table of sections"
    words = state.get("vocab")
    if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
        return "'vocab' is missing or not a list of words"
    if words[0] != PAD:
        return f"its vocabulary starts with {words[0][:20]!r}, not the padding token {PAD!r}"
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        return "'model' is missing or not a table of tensors"
    vectors = weights.get("text.vectors")
    if vectors is None or vectors.dim() != 2 or not vectors.is_floating_point():
        return "'model' has no 2-D word-vector table 'text.vectors'"
    if vectors.shape[0] != len(words):
        return f"its vocabulary has {len(words)} words but its word table {vectors.shape[0]} rows"
    if not isinstance(state.get("epoch"), int) or state["epoch"] < 0:
        return "'epoch' is missing or not a whole number >= 0"
    for key in ("metrics", "data", "training"):
        if not isinstance(state.get(key), dict):
            return f"'{key}' is missing or not a table"
    max_words = state["data"].get("max_words", 32)
    if isinstance(max_words, bool) or not isinstance(max_words, int) or not 1 <= max_words <= 1024:
        return f"data.max_words is {max_words!r}, not a caption length from 1 to 1024"
    return None


def _weights_mismatch(exc: RuntimeError) -> str:
    """load_state_dict's multi-line listing, as one line: how many keys are missing,
    unexpected or of another shape, with an example of each."""
    text = str(exc)
    parts = []
    for label, marker in (("missing", "Missing key(s) in state_dict: "), ("unexpected", "Unexpected key(s) in state_dict: ")):
        if marker in text:
            keys = text.split(marker, 1)[1].split(".\n", 1)[0].split(". ", 1)[0].split(", ")
            parts.append(f"{len(keys)} {label} (e.g. {keys[0].strip()})")
    shapes = text.count("size mismatch for ")
    if shapes:
        example = text.split("size mismatch for ", 1)[1].split(":", 1)[0]
        parts.append(f"{shapes} of another shape (e.g. {example})")
    return ", ".join(parts) or text.strip().splitlines()[0][:200]


def load(path: str | Path) -> LoadedCheckpoint:
    state = read_state(path)
    problem = structure_problem(state)
    if problem:
        raise CheckpointError(f"{model_file(path)} is a damaged t2i checkpoint: {problem}")
    try:
        cfg = config_lib.from_dict(state["config"])
    except config_lib.ConfigError as exc:
        raise CheckpointError(f"{model_file(path)}: its stored config is not valid: {exc}") from None
    words = state["vocab"]
    vectors = state["model"]["text.vectors"].float().numpy()
    model = build_model(cfg.model, np.zeros_like(vectors))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{model_file(path)}: its weights do not fit the model its config describes "
                              f"({cfg.model.family}, width {cfg.model.width}): {_weights_mismatch(exc)}") from None
    model.eval()
    return LoadedCheckpoint(model, Vocabulary(words, vectors), cfg, state)


def export(checkpoint: str | Path, out: str) -> dict:
    """``t2i export``: the checkpoint's generator as safetensors + config + vocabulary in
    ``out`` (t2i.training.export), checked to load the same model before it is written."""
    source = model_file(checkpoint)
    if storage.is_dir(out) and storage.list_names(out):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new --out folder")
    loaded = load(source)  # the whole checkpoint is valid and builds its model
    written = export_lib.write(loaded.state, str(out))
    back = load(str(out))
    if state_digest(back.model.state_dict()) != state_digest(loaded.model.state_dict()):
        raise CheckpointError(f"{out}: the exported weights do not read back equal to {source}")
    return {"out": str(out), "files": written, "source": source, "epoch": loaded.state["epoch"],
            "family": loaded.config.model.family, "selection": loaded.state["metrics"].get(SELECTION_METRIC)}


def check_compatible(state: dict, cfg: config_lib.Config, where: str) -> None:
    """Resuming needs the same model; anything else would silently reinitialise layers."""
    # A key added since the checkpoint was written reads as its default: the behaviour it had.
    saved = {**config_lib.Config().to_dict()["model"], **state["config"]["model"]}
    wanted = cfg.to_dict()["model"]
    diffs = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diffs:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"{where} was trained with a different model config ({shown}); "
                              "use a new train.name or the original config")
    # An optimizer's state only fits the same optimizer (RMSprop's state in Adam died with
    # KeyError: 'betas' in every retry); the schedule's state likewise.
    saved_optim, wanted_optim = state["config"].get("optim", {}), cfg.to_dict()["optim"]
    diffs = {k: (saved_optim.get(k), wanted_optim[k]) for k in RESUME_FIXED_OPTIM
             if saved_optim.get(k) != wanted_optim[k]}
    if diffs:
        shown = ", ".join(f"optim.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"{where} cannot continue with another optimizer or schedule ({shown}); "
                              "use a new train.name, or the original setting to continue")


RESUME_FIXED_OPTIM = ("name", "schedule")  # learning rates and betas may change on resume


def check_resumable(model_path: str, cfg: config_lib.Config, vocab: Vocabulary | None, data: str) -> dict:
    """The checkpoint a run would resume from, checked from its ``meta.json`` and the weight
    file's size alone (the weights are read only to explain a vocabulary mismatch): same
    model, optimizer and schedule, and, given the data's ``vocab``, the same vocabulary.
    Returns the meta (or, for a checkpoint whose meta lacks these, the whole state)."""
    meta = read_meta(model_path)
    if not {"config", "vocab_digest", "model_bytes"} <= meta.keys():
        state = read_state(model_path)
        check_compatible(state, cfg, model_path)
        if vocab is not None:
            check_same_vocabulary(state, vocab, data, model_path)
        return state
    found = storage.size(model_path)
    if found != meta["model_bytes"]:
        raise CheckpointError(f"{model_path} is not a readable checkpoint (corrupt or truncated?): it has "
                              f"{found} bytes, its {META} says {meta['model_bytes']}")
    check_compatible(meta, cfg, model_path)
    if vocab is not None and meta["vocab_digest"] != vocab.digest():
        check_same_vocabulary(read_state(model_path), vocab, data, model_path)
    return meta


def check_same_vocabulary(state: dict, vocab: Vocabulary, data: str, where: str) -> None:
    """Word ids index the checkpoint's frozen word vectors: resuming on data with another
    vocabulary (or other vectors for it) would silently pair ids with other words' vectors."""
    words = list(state["vocab"])
    if words != list(vocab.words):
        differ = sorted(set(words) ^ set(vocab.words))[:5]
        raise CheckpointError(f"{where} was trained on another vocabulary ({len(words)} words) than {data} "
                              f"({len(vocab.words)} words; e.g. {', '.join(differ) or 'same words, other order'}); "
                              "use a new train.name, or the data it was trained on")
    vectors = state["model"].get("text.vectors")  # the generator's frozen word table
    if vectors is not None and (tuple(vectors.shape) != vocab.vectors.shape
                                or not np.allclose(vectors.numpy(), vocab.vectors, atol=1e-6)):
        raise CheckpointError(f"{where} was trained with other word vectors than {data} (another GloVe file?); "
                              "use a new train.name, or the data it was trained on")


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, dict, str]]:
    """(epoch, metrics, model.pt location) of every checkpoint under a run, oldest first."""
    found = []
    for entry in storage.list_names(run_dir):
        if not entry.startswith("checkpoint_"):
            continue
        folder = storage.join(run_dir, entry)
        meta_path = storage.join(folder, META)
        if not storage.is_file(meta_path):
            continue  # a folder Ray is still uploading, or an unrelated one
        meta = read_meta(storage.join(folder, FILENAME))
        if not isinstance(meta.get("epoch"), int) or not isinstance(meta.get("metrics"), dict):
            raise CheckpointError(f"{meta_path} has no 'epoch' and 'metrics'; remove that checkpoint folder "
                                  "or restore the file")
        found.append((meta["epoch"], dict(meta["metrics"]), storage.join(folder, FILENAME)))
    return sorted(found, key=lambda item: item[0])


def read_meta(model_path: str) -> dict:
    """The small ``meta.json`` beside a ``model.pt`` ({} if it is missing)."""
    path = storage.join(storage.parent(model_path), META)
    if not storage.is_file(path):
        return {}
    try:
        meta = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); remove that checkpoint folder or restore "
                              "the file") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object; remove that checkpoint folder or restore the file")
    return meta


def latest_in_run(run_dir: str | Path) -> str | None:
    """The newest ``model.pt`` (by epoch) under a run directory, or None."""
    checkpoints = run_checkpoints(run_dir)
    return checkpoints[-1][2] if checkpoints else None
