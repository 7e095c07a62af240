"""Judges of text-image alignment and R-precision (AttnGAN protocol).

R-precision (Xu et al. 2018, "AttnGAN"): each image ranks its true caption among 99 random
captions of other images; we report the top-1 rate, mean and std over 10 bins of the items.
Two judges score it: a CNN dual encoder trained on the train split only
(``t2i.training.encoders.JUDGE``; no generator ever trains against it) and
:class:`PixelNeighbourJudge`, which has no features to fool.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from t2i.data.dataset import to_float
from t2i.models.dual_encoder import DualEncoder


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
def r_precision(model: DualEncoder | PixelNeighbourJudge, images: torch.Tensor, caption_ids: np.ndarray, caption_image: np.ndarray,
                n_candidates: int = 100, bins: int = 10, seed: int = 0) -> dict[str, float]:
    """Item i = (images[i], caption row i). images: (M, 3, H, W) float, one per caption row;
    caption_image: (M,) source image of each caption. ``chance`` is the expected hit rate
    of a random ranking over the pools actually drawn (1/100 unless a split is small).
    ``model``: a judge in eval mode (``t2i.training.encoders.build`` returns one)."""
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
