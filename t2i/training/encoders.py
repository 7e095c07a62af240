"""Text-image dual encoders trained once per prepared dataset and cached beside it.

Two roles, two separately trained networks (other seed, other width):

* the **judge** scores R-precision in ``t2i evaluate``; no generator ever trains against it;
* the **alignment-loss encoder** gives the ``gan`` family AttnGAN's DAMSM-style sentence loss
  (Xu et al. 2018) when ``loss.align_weight > 0``.

A generator optimised against the very encoder that scores it inflates that score (TISE,
Dinh et al. 2021), hence a second encoder for the loss. Both train on the train split only.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from t2i import storage
from t2i.console import progress
from t2i.data.dataset import read_split_arrays, to_float
from t2i.models.dual_encoder import DualEncoder, contrastive_loss


@dataclass(frozen=True)
class EncoderRecipe:
    epochs: int = 6        # passes over the train images (one of each image's captions per pass)
    batch: int = 128       # pairs per contrastive batch (the negatives of each pair)
    lr: float = 1e-3       # Adam
    shift: int = 0         # random translation by up to this many pixels (edge-replicated), besides the flip
    cosine: bool = False   # learning rate on a cosine from lr down to 0


@dataclass(frozen=True)
class EncoderRole:
    file: str    # cached beside the prepared data under this name
    seed: int
    width: int   # image CNN channels (32-64-128-256 for 32)
    purpose: str
    tower: str = "strided"  # DualEncoder's image tower
    recipe: EncoderRecipe = EncoderRecipe()


# The judge must be stronger than the real photos' level it measures against (a weak judge
# scores good and real images alike), and another network from the alignment-loss encoder.
JUDGE = EncoderRole("alignment_judge.pt", seed=0, width=24, purpose="alignment judge", tower="deep",
                    recipe=EncoderRecipe(epochs=50, shift=4, cosine=True))
ALIGNMENT_LOSS = EncoderRole("alignment_loss_encoder.pt", seed=1, width=48,
                             purpose="alignment-loss encoder (gan loss.align_weight)")


# Words a horizontal flip turns into each other: a mirrored image must get the mirrored
# caption, or flip augmentation teaches the encoder that "left" and "right" mean the same.
MIRRORED_WORDS = (("left", "right"),)


def mirror_ids(words: list[str]) -> np.ndarray | None:
    """Word-id map for a horizontally flipped image's caption (left <-> right), or None when
    the vocabulary has one word of a pair but not the other: then no image may be flipped."""
    index = {w: i for i, w in enumerate(words)}
    mapping = np.arange(len(words))
    for a, b in MIRRORED_WORDS:
        if (a in index) != (b in index):
            return None
        if a in index:
            mapping[index[a]], mapping[index[b]] = index[b], index[a]
    return mapping


def shift_images(images: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """The batch moved by up to ``shift`` pixels each way (one draw per batch), edges replicated."""
    if shift <= 0:
        return images
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (shift,) * 4, mode="replicate")
    dx, dy = rng.integers(0, 2 * shift + 1, 2)
    return padded[:, :, dy: dy + height, dx: dx + width]


def train_dual_encoder(images: np.ndarray, caption_ids: np.ndarray, caption_image: np.ndarray,
                       vectors: np.ndarray, mirror: np.ndarray | None, recipe: EncoderRecipe = EncoderRecipe(),
                       seed: int = 0, width: int = 32, tower: str = "strided", log=print,
                       device: str = "cpu") -> DualEncoder:
    """images (N, H, W, 3) uint8; caption_ids (M, L); caption_image (M,) index into images;
    mirror: :func:`mirror_ids` of the vocabulary (None: no flip augmentation). Returns the
    model in eval mode on the CPU."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DualEncoder(vectors, width=width, tower=tower).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    batch, epochs = recipe.batch, recipe.epochs
    total_steps = max(1, epochs * (len(images) // batch))
    if recipe.cosine:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    by_image = [[] for _ in range(len(images))]
    for row, img in enumerate(caption_image):
        by_image[img].append(row)
    for epoch in progress(range(epochs), "train dual encoder", unit="epoch"):
        order = rng.permutation(len(images))
        total = 0.0
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start: start + batch]
            caps = np.array([by_image[i][rng.integers(len(by_image[i]))] for i in idx])
            # Flip augmentation keeps the judge from memorising exact pixels; the caption is
            # mirrored with the image.
            imgs, ids = to_float(images[idx]), caption_ids[caps]
            if mirror is not None and rng.random() < 0.5:
                imgs, ids = imgs.flip(3), mirror[ids]
            imgs = shift_images(imgs, recipe.shift, rng)
            loss = contrastive_loss(model.embed_images(imgs.to(device)),
                                    model.embed_text(torch.as_tensor(ids).long().to(device)), model.log_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if recipe.cosine:
                scheduler.step()
            with torch.no_grad():
                model.log_scale.clamp_(max=math.log(100.0))
            total += loss.item()
        log(f"dual encoder epoch {epoch}: contrastive loss {total / max(1, len(order) // batch):.3f}")
    return model.cpu().eval()


def build(role: EncoderRole, vectors: np.ndarray, state: dict | None = None) -> DualEncoder:
    """A frozen encoder in eval mode (``state``: its weights)."""
    model = DualEncoder(vectors, width=role.width, tower=role.tower)
    if state is not None:
        model.load_state_dict(state)
    model.requires_grad_(False)
    return model.eval()


# Part of every cache's fingerprint: bumped when training changes, so older caches retrain.
TRAINING_VERSION = "mirror"


def _fingerprint(role: EncoderRole, manifest: dict) -> str:
    shards = "".join(s["sha256"] for s in manifest["splits"]["train"]["shards"])
    recipe = "" if role.recipe == EncoderRecipe() and role.tower == "strided" else f"/{role.tower}/{role.recipe}"
    return f"{shards}/seed={role.seed}/width={role.width}/{TRAINING_VERSION}{recipe}"


def read_cached(role: EncoderRole, root: str, manifest: dict) -> dict | None:
    """The ``role`` encoder's weights cached beside the prepared data, if they were trained
    on these train shards with these settings (None otherwise)."""
    path = storage.join(root, role.file)
    if not storage.is_file(path):
        return None
    state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    return state["model"] if state.get("fingerprint") == _fingerprint(role, manifest) else None


def load_or_train(role: EncoderRole, root: str, manifest: dict, vocab, train: dict | None = None,
                  log=print, device: str = "cpu") -> DualEncoder:
    """The ``role`` encoder for this prepared dataset: read from its cache file when that
    was trained on the same train shards with the same settings, else trained (on
    ``train``, the train split's arrays, read here when not given) and cached (written
    whole: a reader never sees half a file)."""
    cached = read_cached(role, root, manifest)
    if cached is not None:
        return build(role, vocab.vectors, cached)
    path = storage.join(root, role.file)
    log(f"training the {role.purpose} on the train split (cached afterwards in {path})")
    if train is None:
        train = read_split_arrays(root, manifest, "train")
    model = train_dual_encoder(train["images"], train["word_ids"], train["caption_image"], vocab.vectors,
                               mirror_ids(vocab.words), recipe=role.recipe, seed=role.seed, width=role.width,
                               tower=role.tower, log=log, device=device)
    buffer = io.BytesIO()
    torch.save({"fingerprint": _fingerprint(role, manifest), "model": model.state_dict()}, buffer)
    try:
        storage.write_bytes(path, buffer.getvalue())
    except OSError as exc:  # a read-only dataset folder: still usable, uncached
        log(f"could not cache the {role.purpose} at {path}: {exc}")
    return build(role, vocab.vectors, model.state_dict())


def cache_key(role: EncoderRole, manifest: dict) -> str:
    """A short name for one role's encoder of one prepared dataset."""
    return hashlib.sha256(_fingerprint(role, manifest).encode()).hexdigest()[:16]
