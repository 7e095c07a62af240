"""Text-image alignment judge: a small dual encoder and R-precision (AttnGAN protocol).

The judge (image CNN + caption encoder, CLIP-style symmetric InfoNCE loss, Radford et al.
2021) is trained on the **train split only** and never shares weights or losses with a
generator. R-precision (Xu et al. 2018, "AttnGAN"): each image ranks its true caption
among 99 random captions of other images; we report the top-1 rate, mean and std over 10
bins of the items.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2i.console import progress
from t2i.models.blocks import CaptionEncoder


class DualEncoder(nn.Module):
    def __init__(self, vectors: np.ndarray, dim: int = 128, width: int = 32):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, inplace=True)]
        self.image = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], dim))
        self.text_encoder = CaptionEncoder(vectors.shape[0], vectors.shape[1], "pool", 256)
        self.text_encoder.vectors.copy_(torch.as_tensor(vectors))
        self.text = nn.Sequential(self.text_encoder, nn.Linear(self.text_encoder.out_dim, dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def embed_text(self, word_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(word_ids), dim=-1)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image, caption) pairs."""
    logits = log_scale.exp() * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def to_float(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float().div(255.0)


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


def train_dual_encoder(images: np.ndarray, caption_ids: np.ndarray, caption_image: np.ndarray,
                       vectors: np.ndarray, mirror: np.ndarray | None, epochs: int = 6, batch: int = 128,
                       seed: int = 0, width: int = 32, log=print) -> DualEncoder:
    """images (N, H, W, 3) uint8; caption_ids (M, L); caption_image (M,) index into images;
    mirror: :func:`mirror_ids` of the vocabulary (None: no flip augmentation)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DualEncoder(vectors, width=width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
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
            loss = contrastive_loss(model.embed_images(imgs), model.embed_text(torch.as_tensor(ids).long()),
                                    model.log_scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.log_scale.clamp_(max=math.log(100.0))
            total += loss.item()
        log(f"dual encoder epoch {epoch}: contrastive loss {total / max(1, len(order) // batch):.3f}")
    return model.eval()


def alignment_loss(encoder: DualEncoder, images: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """AttnGAN's DAMSM sentence loss (Xu et al. 2018, eq. 10-11) with a frozen encoder: each
    generated image must pick out its own caption among the batch's, and each caption its
    image (symmetric InfoNCE at the encoder's learned temperature; AttnGAN's gamma_3 = 10).
    Gradients reach the images only."""
    return contrastive_loss(encoder.embed_images(images), encoder.embed_text(word_ids), encoder.log_scale)


class PixelNeighbourJudge:
    """A second judge that nothing was trained against and that has no features to fool:
    an image "describes" the captions of its ``k`` nearest train images, compared as 16x16
    thumbnails (pixel distance), averaged as GloVe means; a caption is its GloVe mean.

    It reads colour and layout only, so its ceiling (real images) is low, but a generator
    cannot raise its score without drawing images that look like the right train photos.
    Used beside the CNN judge because a generator trained with an alignment loss from a
    similar encoder can move a CNN judge more than the images warrant (TISE, Dinh et al. 2021).
    """

    THUMB = 4  # 64x64 -> 16x16

    def __init__(self, train_images: np.ndarray, caption_embeddings: np.ndarray, caption_image: np.ndarray,
                 vectors: np.ndarray, k: int = 20):
        self.k = k
        self.thumbs = self._thumb(to_float(train_images))
        self.thumbs_sq = self.thumbs.pow(2).sum(1)  # once, not per scored chunk
        sums = np.zeros((len(train_images), caption_embeddings.shape[1]), dtype=np.float64)
        np.add.at(sums, caption_image, caption_embeddings)
        counts = np.bincount(caption_image, minlength=len(train_images)).clip(min=1)[:, None]
        self.described = torch.as_tensor(sums / counts, dtype=torch.float32)
        self.vectors = torch.as_tensor(vectors, dtype=torch.float32)

    def _thumb(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.float(), self.THUMB).flatten(1)

    def eval(self):
        return self

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        q = self._thumb(images)
        d2 = q.pow(2).sum(1, keepdim=True) + self.thumbs_sq[None] - 2 * q @ self.thumbs.t()
        nearest = d2.topk(self.k, dim=1, largest=False).indices
        return F.normalize(self.described[nearest].mean(1), dim=-1)

    def embed_text(self, word_ids: torch.Tensor) -> torch.Tensor:
        known = (word_ids > 0).float()[..., None]  # id 0 pads (and stands for unknown words)
        means = (self.vectors[word_ids] * known).sum(1) / known.sum(1).clamp(min=1)
        return F.normalize(means, dim=-1)


def distractor_pools(caption_ids: np.ndarray, caption_image: np.ndarray, n_candidates: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """For each caption row i: up to ``n_candidates - 1`` other rows, drawn without
    replacement, none describing i's image and none with i's exact text (a distractor that
    reads like the true caption would make the item unanswerable)."""
    _, text_of = np.unique(np.asarray(caption_ids), axis=0, return_inverse=True)
    text_of = text_of.reshape(-1)
    m = len(caption_ids)
    pools = []
    for i in range(m):
        want = n_candidates - 1
        draw = rng.choice(m, size=min(m, 2 * want + 8), replace=False)
        ok = draw[(caption_image[draw] != caption_image[i]) & (text_of[draw] != text_of[i])][:want]
        if len(ok) < want:  # a small or repetitive split: take every eligible row, in random order
            eligible = np.flatnonzero((caption_image != caption_image[i]) & (text_of != text_of[i]))
            ok = rng.permutation(eligible)[:want]
        pools.append(ok)
    return pools


def ranks_first(scores: np.ndarray) -> bool:
    """scores[0] is the true caption's: a hit only when it beats every distractor (a tie
    is a miss, so a judge that scores everything alike gets nothing)."""
    return bool(len(scores) > 1 and scores[0] > scores[1:].max())


@torch.no_grad()
def r_precision(model: DualEncoder, images: torch.Tensor, caption_ids: np.ndarray, caption_image: np.ndarray,
                n_candidates: int = 100, bins: int = 10, seed: int = 0) -> dict[str, float]:
    """Item i = (images[i], caption row i). images: (M, 3, H, W) float, one per caption row;
    caption_image: (M,) source image of each caption. ``chance`` is the expected hit rate
    of a random ranking over the pools actually drawn (1/100 unless a split is small)."""
    model.eval()
    emb_img = torch.cat([model.embed_images(images[s: s + 512]) for s in range(0, len(images), 512)])
    ids = torch.from_numpy(np.array(caption_ids, dtype=np.int64))
    emb_txt = torch.cat([model.embed_text(ids[s: s + 1024]) for s in range(0, len(ids), 1024)])
    rng = np.random.default_rng(seed)
    pools = distractor_pools(caption_ids, np.asarray(caption_image), n_candidates, rng)
    hits = np.zeros(len(pools), dtype=bool)
    for i, others in enumerate(pools):
        candidates = np.concatenate([[i], others])
        hits[i] = ranks_first((emb_txt[candidates] @ emb_img[i]).numpy())
    per_bin = [b.mean() for b in np.array_split(hits[rng.permutation(len(hits))], bins) if len(b)]
    return {"r_precision": float(np.mean(per_bin)), "r_precision_std": float(np.std(per_bin)),
            "chance": float(np.mean([1.0 / (len(p) + 1) for p in pools]))}
