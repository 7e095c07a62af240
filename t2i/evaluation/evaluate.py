"""Honest evaluation of a checkpoint on an image-level split, beside trivial baselines.

For every (image, caption) pair of the split the model generates from the caption alone
(never seeing the image): its deterministic output (prior mean) and ``samples`` random
draws. Reported for the model and for two baselines that ignore the image too -- the train
mean image, and the mean of the train images whose captions are the k nearest by GloVe
embedding -- are MSE (the seed's metric), PSNR, SSIM, sharpness (variance of the
Laplacian / that of the real images), diversity, R-precision from an independent dual
encoder trained on the train split only, and on the shapes set attribute accuracy read
from the pixels (test and `novel` splits).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from t2i import storage
from t2i.console import progress
from t2i.data import shapes
from t2i.data.dataset import DatasetError, load_manifest, load_vocabulary, read_split_arrays, to_float
from t2i.data.text import Vocabulary
from t2i.evaluation import metrics
from t2i.evaluation.distribution import judge_distances, spectrum_check
from t2i.evaluation.judges import PixelNeighbourJudge, r_precision
from t2i.training import checkpoint as ckpt_lib
from t2i.training import encoders
from t2i.training.losses import gaussian_kl

KNN = 50
GENERATE_BATCH = 256


def remap_ids(word_ids: np.ndarray, data_words: list[str], model_index: dict[str, int]) -> np.ndarray:
    """Data-vocabulary ids -> the checkpoint's vocabulary ids (unknown words -> padding)."""
    table = np.array([model_index.get(w, 0) for w in data_words], dtype=np.int64)
    return table[word_ids]


def image_metrics(generated: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mse": metrics.mse(generated, truth), "psnr": metrics.psnr(generated, truth),
            "ssim": metrics.ssim(generated, truth), "sharpness": metrics.laplacian_variance(generated)}


class Accumulator:
    """Per-item metric values gathered batch by batch, averaged at the end."""

    def __init__(self):
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, prefix: str, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.values.setdefault(f"{prefix}{k}", []).append(v.detach().float().cpu())

    def means(self) -> dict[str, float]:
        return {k: float(torch.cat(v).mean()) for k, v in self.values.items()}


def knn_baseline(train: dict, query_embeddings: np.ndarray, k: int = KNN, batch: int = 512) -> np.ndarray:
    """For each query caption: the mean of the train images whose captions are nearest
    (cosine, GloVe means), counting each image once. Returns (M, H, W, 3) float32 in [0, 1]."""
    keys = train["embeddings"] / np.linalg.norm(train["embeddings"], axis=1, keepdims=True).clip(1e-8)
    images = train["images"].astype(np.float32) / 255.0
    out = np.empty((len(query_embeddings), *images.shape[1:]), dtype=np.float32)
    for start in range(0, len(query_embeddings), batch):
        q = query_embeddings[start: start + batch]
        q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-8)
        order = np.argsort(-(q @ keys.T), axis=1)[:, : 4 * k]
        for row, ranked in enumerate(order):
            seen = list(dict.fromkeys(train["caption_image"][ranked]))[:k]
            out[start + row] = images[seen].mean(axis=0)
    return out


def nearest_train_distance(images: torch.Tensor, train_images: np.ndarray | torch.Tensor,
                           batch: int = 512) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) RMS pixel distance to the nearest train image.
    ``train_images``: uint8 (M, H, W, 3), or already (M, H*W*3) floats in [0, 1].

    The copy check: a generator that redraws training photos lands much nearer to them than
    unseen real test photos do, so its median is compared with the real test images' median."""
    train = train_images if torch.is_tensor(train_images) else to_float(train_images).flatten(1)
    train_sq = train.pow(2).sum(1)
    out = torch.empty(len(images))
    for start in range(0, len(images), batch):
        q = images[start: start + batch].float().flatten(1)
        d2 = q.pow(2).sum(1, keepdim=True) + train_sq[None] - 2 * q @ train.t()
        # The expansion finds the neighbour fast but cancels in float32 (a copy read ~5e-5,
        # not 0); the distance to the neighbour found is taken directly.
        nearest = train[d2.argmin(1)]
        out[start: start + len(q)] = (q - nearest).pow(2).mean(1).sqrt()
    return out


def copy_check(generated: dict[str, torch.Tensor], real: torch.Tensor, train_images: np.ndarray | torch.Tensor) -> dict:
    """Median nearest-train distance of each generated set, of the real (held-out) images,
    and their ratio (about 1 or more: no copying; far below 1: training images redrawn)."""
    # once for every set compared; uint8 (M, H, W, 3) or floats (M, 3, H, W) in [0, 1]
    train = (train_images if torch.is_tensor(train_images) else to_float(train_images)).flatten(1)
    real_median = float(nearest_train_distance(real, train).median())
    result = {"real_median": real_median}
    for name, images in generated.items():
        median = float(nearest_train_distance(images, train).median())
        result[f"{name}_median"] = median
        result[f"{name}_ratio"] = median / max(real_median, 1e-12)
    return result


def shapes_accuracy(images: torch.Tensor, attributes: dict[str, list[str]], caption_image: np.ndarray) -> dict:
    """Attribute accuracy of generated images (one per caption row) read from the pixels."""
    tiles = images.permute(0, 2, 3, 1).numpy()
    hits = dict.fromkeys(("color", "shape", "size", "position"), 0)
    all_right = 0
    for tile, img in progress(zip(tiles, caption_image), "read shapes", total=len(tiles), unit="img"):
        found = shapes.analyse(tile)
        right = [found[k] == attributes[k][img] for k in hits]
        for k, ok in zip(hits, right):
            hits[k] += ok
        all_right += all(right)
    n = max(len(tiles), 1)
    return {**{k: v / n for k, v in hits.items()}, "all": all_right / n}


@torch.no_grad()
def generate_for(model, ids: np.ndarray, samples: int, seed: int, batch: int = GENERATE_BATCH):
    """Deterministic outputs (M, 3, H, W) and ``samples`` draws (M, samples, 3, H, W), in batches."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, len(ids), batch):
        chunk = torch.as_tensor(ids[start: start + batch]).long()
        mean = model.sample(chunk, n=1, deterministic=True)[:, 0]
        draws = model.sample(chunk, n=samples, generator=generator) if samples else None
        yield start, mean, draws


@dataclass(frozen=True)
class EvaluationSettings:
    samples: int = 3     # random draws per caption besides the deterministic image
    seed: int = 0        # noise, pair subsets and R-precision's distractors
    max_pairs: int = 0   # score a random subset of (image, caption) pairs (0 = all)


@dataclass(frozen=True)
class EvaluationContext:
    """What every split of one evaluation shares: the checkpoint, the data and its train
    split (baselines, copy check), and the judges."""
    loaded: ckpt_lib.LoadedCheckpoint
    root: str
    manifest: dict
    vocab: Vocabulary
    train: dict                          # read_split_arrays of the train split
    train_images: torch.Tensor           # its images as floats (N, 3, H, W), converted once
    judge: torch.nn.Module               # the CNN dual encoder (t2i.training.encoders.JUDGE)
    pixel_judge: PixelNeighbourJudge
    mean_image: torch.Tensor             # (3, H, W): the mean-image baseline
    settings: EvaluationSettings

    @property
    def is_shapes(self) -> bool:
        return self.manifest["dataset"] == "shapes"


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             settings: EvaluationSettings = EvaluationSettings(), log=print) -> dict:
    started = time.perf_counter()
    checkpoint = ckpt_lib.model_file(checkpoint)  # a run folder -> its best checkpoint
    loaded = ckpt_lib.load(checkpoint)
    root = storage.absolute(data)
    manifest = load_manifest(root)
    vocab = load_vocabulary(root)
    train = read_split_arrays(root, manifest, "train")
    context = EvaluationContext(
        loaded=loaded, root=root, manifest=manifest, vocab=vocab, train=train,
        train_images=to_float(train["images"]).contiguous(),  # contiguous: flatten(1) is a view
        judge=encoders.load_or_train(encoders.JUDGE, root, manifest, vocab, train, log),
        pixel_judge=PixelNeighbourJudge(train["images"], train["embeddings"], train["caption_image"], vocab.vectors),
        mean_image=torch.as_tensor(train["images"].astype(np.float32).mean(axis=0) / 255.0).permute(2, 0, 1),
        settings=settings)
    splits = [split] + (["novel"] if context.is_shapes and split != "novel" and "novel" in manifest["splits"] else [])
    result = {"checkpoint": str(checkpoint), "data": str(root), "dataset": manifest["dataset"],
              "model": loaded.config.model.family, "epoch": loaded.state["epoch"], "splits": {}}
    for name in splits:
        result["splits"][name] = score_split(context, name)
    result["seconds"] = time.perf_counter() - started
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def score_split(context: EvaluationContext, split: str) -> dict:
    """Every metric of the model and the baselines on one split (see the module's doc)."""
    loaded, root, manifest, train = context.loaded, context.root, context.manifest, context.train
    samples, seed, max_pairs = context.settings.samples, context.settings.seed, context.settings.max_pairs
    is_shapes, vocab, mean_image = context.is_shapes, context.vocab, context.mean_image
    if split not in manifest["splits"]:
        raise DatasetError(f"split {split!r} not in {root}; it has {sorted(manifest['splits'])}")
    part = read_split_arrays(root, manifest, split, attributes=is_shapes)
    if max_pairs:
        keep = np.random.default_rng(seed).permutation(len(part["word_ids"]))[:max_pairs]
        keep.sort()
        for key in ("word_ids", "embeddings", "caption_image"):
            part[key] = part[key][keep]
    ids = remap_ids(part["word_ids"], vocab.words, loaded.vocab.index)
    truth_all = to_float(part["images"])
    acc = Accumulator()
    generated = torch.empty(len(ids), *truth_all.shape[1:])
    sampled_first = torch.empty_like(generated)
    torch.manual_seed(seed)
    batches = generate_for(loaded.model, ids, samples, seed)
    for start, mean, draws in progress(batches, f"generate {split}", total=-(-len(ids) // GENERATE_BATCH), unit="batch"):
        truth = truth_all[part["caption_image"][start: start + len(mean)]]
        if loaded.model.has_elbo:  # its training objective on test pairs (posterior sample)
            with torch.no_grad():
                o = loaded.model(truth, torch.as_tensor(ids[start: start + len(mean)]).long())
            acc.add("model_elbo/", {"mse": metrics.mse(o.recon, truth),
                                    "kl": gaussian_kl(o.mu, o.logvar, o.prior_mu, o.prior_logvar).sum(1)})
        generated[start: start + len(mean)] = mean
        acc.add("model_mean/", image_metrics(mean, truth))
        if draws is not None:
            sampled_first[start: start + len(mean)] = draws[:, 0]
            for j in range(draws.shape[1]):
                acc.add("model_sample/", image_metrics(draws[:, j], truth))
            acc.add("model_sample/", {"diversity": metrics.pairwise_diversity(draws)})
    knn = torch.as_tensor(knn_baseline(train, part["embeddings"])).permute(0, 3, 1, 2)
    truth = truth_all[part["caption_image"]]
    acc.add("baseline_mean_image/", image_metrics(mean_image.expand_as(truth), truth))
    acc.add(f"baseline_knn{KNN}/", image_metrics(knn, truth))
    acc.add("real/", {"sharpness": metrics.laplacian_variance(truth_all)})
    table = _nest(acc.means())
    real_sharp = table.pop("real")["sharpness"]
    for row in table.values():
        if "sharpness" not in row:
            continue
        row["sharpness_ratio"] = row.pop("sharpness") / real_sharp
    rp = {"real": truth, "model_mean": generated, f"baseline_knn{KNN}": knn,
          "baseline_mean_image": mean_image.expand_as(truth)}
    if samples:
        rp["model_sample"] = sampled_first
    judge, pixel_judge = context.judge, context.pixel_judge  # the pixel-neighbour judge beside the CNN
    for name, images in rp.items():
        table.setdefault(name, {}).update(r_precision(judge, images, part["word_ids"], part["caption_image"], seed=seed))
        pixel = r_precision(pixel_judge, images, part["word_ids"], part["caption_image"], seed=seed)
        table[name]["r_precision_pixel"], table[name]["r_precision_pixel_std"] = pixel["r_precision"], pixel["r_precision_std"]
    generated = {"model_mean": generated, **({"model_sample": sampled_first} if samples else {})}
    copies = copy_check(generated, truth_all, context.train_images)
    distribution = set_distances(context, truth_all, {**generated, f"baseline_knn{KNN}": knn})
    if is_shapes:
        for name in ("real", "model_mean", "model_sample", f"baseline_knn{KNN}"):
            if name in rp:
                table[name]["attributes"] = shapes_accuracy(rp[name], part["attributes"], part["caption_image"])
    return {"pairs": len(ids), "images": len(part["images"]),
            "images_scored": len(np.unique(part["caption_image"])),  # a random subset of pairs misses some
            "results": table, "copy_check": copies, "distribution": distribution}


def set_distances(context: EvaluationContext, real: torch.Tensor, sets: dict[str, torch.Tensor]) -> dict:
    """Judge Fréchet / kernel distances and the power-spectrum check (as drawn, and Hann-windowed)
    of each image set against the split's real images, with real train images as the floor
    (``real_train``)."""
    sets = {**sets, "real_train": context.train_images}
    distances = judge_distances(context.judge, real, sets)
    spectra = {prefix: spectrum_check(real, sets, windowed) for prefix, windowed in
               (("spectrum_", False), ("spectrum_windowed_", True))}
    return {name: {**distances[name], **{prefix + k: v for prefix, check in spectra.items() for k, v in check[name].items()}}
            for name in sets}


def _nest(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    nested: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        group, metric = key.split("/", 1)
        nested.setdefault(group, {})[metric] = value
    return nested
