"""Text-image dual encoders trained once per prepared dataset and cached beside it.

Two roles, two separately trained networks (other seed, other width):

* the **judge** scores R-precision in ``t2i evaluate``; no generator ever trains against it;
* the **alignment-loss encoder** gives the ``gan`` family AttnGAN's DAMSM-style sentence loss
  (Xu et al. 2018) when ``loss.align_weight > 0``.

A generator optimised against the very encoder that scores it inflates that score (TISE,
Dinh et al. 2021), hence a second encoder for the loss. Both train on the train split only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

from t2i import storage
from t2i.alignment import DualEncoder, mirror_ids, train_dual_encoder
from t2i.data import read_split_arrays


@dataclass(frozen=True)
class EncoderRole:
    file: str    # cached beside the prepared data under this name
    seed: int
    width: int   # image CNN channels (32-64-128-256 for 32)
    purpose: str


JUDGE = EncoderRole("alignment_judge.pt", seed=0, width=32, purpose="alignment judge")
ALIGNMENT_LOSS = EncoderRole("alignment_loss_encoder.pt", seed=1, width=48,
                             purpose="alignment-loss encoder (gan loss.align_weight)")


def build(role: EncoderRole, vectors: np.ndarray, state: dict | None = None) -> DualEncoder:
    """A frozen encoder in eval mode (``state``: its weights)."""
    model = DualEncoder(vectors, width=role.width)
    if state is not None:
        model.load_state_dict(state)
    model.requires_grad_(False)
    return model.eval()


# Bumped when training changes: "mirror" = flips swap left/right in the caption (older
# caches were trained with flips that taught the encoders to ignore them, and retrain).
TRAINING_VERSION = "mirror"


def _fingerprint(role: EncoderRole, manifest: dict) -> str:
    shards = "".join(s["sha256"] for s in manifest["splits"]["train"]["shards"])
    return f"{shards}/seed={role.seed}/width={role.width}/{TRAINING_VERSION}"


def load_or_train(role: EncoderRole, root: str, manifest: dict, vocab, train: dict | None = None,
                  log=print) -> DualEncoder:
    """The ``role`` encoder for this prepared dataset: read from its cache file when that
    was trained on the same train shards with the same settings, else trained (on
    ``train``, the train split's arrays, read here when not given) and cached."""
    path = storage.join(root, role.file)
    fingerprint = _fingerprint(role, manifest)
    if storage.is_file(path):
        state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        if state.get("fingerprint") == fingerprint:
            return build(role, vocab.vectors, state["model"])
    log(f"training the {role.purpose} on the train split (cached afterwards in {path})")
    if train is None:
        train = read_split_arrays(root, manifest, "train")
    model = train_dual_encoder(train["images"], train["word_ids"], train["caption_image"], vocab.vectors,
                               mirror_ids(vocab.words), seed=role.seed, width=role.width, log=log)
    buffer = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "model": model.state_dict()}, buffer)
    try:
        storage.write_bytes(path, buffer.getvalue())
    except OSError as exc:  # a read-only dataset folder: still usable, uncached
        log(f"could not cache the {role.purpose} at {path}: {exc}")
    return build(role, vocab.vectors, model.state_dict())
