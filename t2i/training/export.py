"""A trained generator in a folder that other tools read without t2i's checkpoint format:

``model.safetensors`` (the generator's weights, the frozen word vectors ``text.vectors``
included; safetensors holds tensors only, so loading it runs no code), ``config.json``
(format, t2i config, epoch, metrics, the data facts generation needs) and ``vocab.json``
(the words, row i of ``text.vectors`` is word i). Written with
``t2i export``; ``generate``, ``evaluate`` and ``serve`` load the folder like a checkpoint.
"""

from __future__ import annotations

import json

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from t2i import storage

FORMAT = "t2i-export/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"


def is_export(location: str) -> bool:
    """A folder written by :func:`write` (its weights file is there)."""
    return storage.is_dir(location) and storage.is_file(storage.join(location, WEIGHTS))


def write(state: dict, out: str) -> list[str]:
    """Write a checkpoint's generator (``state`` as read from ``model.pt``) to ``out``.
    ``config.json`` goes last: a folder without it is an interrupted export, never read."""
    weights = {name: tensor.detach().clone().contiguous() for name, tensor in state["model"].items()}
    info = {"format": FORMAT, "config": state["config"], "epoch": state["epoch"], "metrics": state["metrics"],
            "data": state["data"]}
    written = [storage.write_bytes(storage.join(out, WEIGHTS), save_safetensors(weights, metadata={"format": "pt"})),
               storage.write_text(storage.join(out, VOCAB), json.dumps(state["vocab"])),
               storage.write_text(storage.join(out, CONFIG), json.dumps(info, indent=1))]
    return written


def read(folder: str) -> dict:
    """The exported folder as the dict ``model.pt`` holds (no training state), for the same
    checks and loading path; raises ValueError naming what is missing or unreadable."""
    for name in (CONFIG, VOCAB):
        if not storage.is_file(storage.join(folder, name)):
            raise ValueError(f"{name} is missing (an interrupted export? run `t2i export` again)")
    try:
        info = json.loads(storage.read_text(storage.join(folder, CONFIG)))
        words = json.loads(storage.read_text(storage.join(folder, VOCAB)))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{CONFIG} or {VOCAB} is not valid JSON: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{CONFIG} does not say format {FORMAT!r}")
    try:
        weights = load_safetensors(storage.read_bytes(storage.join(folder, WEIGHTS)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
        raise ValueError(f"{WEIGHTS} is not a readable safetensors file: {type(exc).__name__}: {str(exc)[:200]}") from None
    return {**{key: info.get(key) for key in ("format", "config", "epoch", "metrics", "data")},
            "model": weights, "vocab": words, "training": {}}
