"""Prepared Parquet -> Ray Datasets -> batches of (image uint8, word ids).

Datasets are built on the driver and streamed to the workers; a worker keeps its share in
memory only when it fits ``data.cache_mb`` (:class:`EpochFeed`). Training shows each image
once per epoch with one of its captions, drawn per (seed, epoch, image), so all captions
get used; evaluation rows expand to every (image, caption) pair, like the seed's test set.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.train import DataConfig as RayDataConfig

from t2i.data.dataset import caption_rows, decode_images, shard_paths

TRAIN_COLUMNS = ["image", "word_ids", "image_id"]  # the id fixes caption draws and cache order
EVAL_COLUMNS = ["image", "word_ids"]
STREAM_BLOCK_BYTES = 16 * 2 ** 20  # Ray Data's block size for t2i's reads (see build_datasets)
SMALL_CLUSTER_STORE_BYTES = 256 * 2 ** 20  # Ray Data's object-store budget where its CPUs are capped


def image_keys(image_ids) -> np.ndarray:
    """A stable 64-bit key per image id (CRC-32 of the id, the same in every process and
    run; Python's ``hash`` of a string is salted per process)."""
    return np.fromiter((zlib.crc32(str(i).encode()) for i in image_ids), np.uint64, count=len(image_ids))


def caption_draws(keys: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Uniform [0, 1) numbers, one per image key, fixed by (seed, epoch, image): which of its
    captions an image shows this epoch. Tied to the image rather than to its place in a
    stream, so streaming and cached feeds, any number of workers and a resumed run all pick
    the same captions. (SplitMix64's finaliser, Steele et al. 2014, as a counter-based RNG.)"""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) ^ np.uint64(epoch_seed(seed, epoch, 0) % 2 ** 64)
        z = (z + np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def pick_rows(offsets: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Caption row per image from its ``offsets`` range and its draw in [0, 1)."""
    counts = np.diff(offsets)
    return offsets[:-1] + np.minimum((draws * counts).astype(np.int64), counts - 1)


def train_batch(table: pa.Table, image_size: int, seed: int, epoch: int) -> dict[str, torch.Tensor]:
    """A streamed batch of train rows (image, every caption, image id) -> tensors of the
    images and the caption each image shows this epoch (:func:`caption_draws`)."""
    offsets, rows = caption_rows(table.column("word_ids"))
    pick = pick_rows(offsets, caption_draws(image_keys(table.column("image_id").to_pylist()), seed, epoch))
    images = decode_images(table.column("image"), image_size)
    return {"image": torch.from_numpy(images.copy()), "word_ids": torch.from_numpy(rows[pick - offsets[0]])}


def eval_caption_rows(offsets: np.ndarray, per_image: int) -> np.ndarray:
    """Which caption rows evaluation scores: all (``per_image`` 0), or ``per_image`` of each
    image's captions taken in turn (image i starts at its caption i mod count), so that a
    split is scored on a mix of its caption styles, the same rows every epoch."""
    counts = np.diff(offsets)
    if per_image <= 0:
        return np.arange(offsets[0], offsets[-1])
    take = np.minimum(counts, per_image)
    image = np.repeat(np.arange(len(counts)), take)
    within = np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take)
    return offsets[image] + (image + within) % counts[image]


def all_captions(batch: pa.Table, image_size: int, per_image: int = 0) -> dict[str, np.ndarray]:
    """(image, caption) pairs for deterministic evaluation: every caption, or ``per_image``
    per image (:func:`eval_caption_rows`)."""
    offsets, rows = caption_rows(batch.column("word_ids"))
    picked = eval_caption_rows(offsets, per_image)
    images = decode_images(batch.column("image"), image_size)
    image_of_row = np.searchsorted(offsets, picked, side="right") - 1
    return {"image": images[image_of_row], "word_ids": rows[picked - offsets[0]]}


def worker_shard_bytes(manifest: dict, eval_splits: list[str], workers: int, eval_captions: int = 0) -> int:
    """Bytes one worker's share of the train and evaluation splits takes in memory when
    cached: pixels plus word-id rows (train: every caption; evaluation: the pairs scored),
    split evenly over the workers."""
    size, words = manifest["image_size"], manifest["max_words"]
    total = 0
    for split in ["train", *eval_splits]:
        info = manifest["splits"][split]
        if split == "train":
            total += info["images"] * size * size * 3 + info["captions"] * words * 4
        else:
            pairs = min(info["captions"], info["images"] * eval_captions) if eval_captions else info["captions"]
            total += pairs * (size * size * 3 + words * 4)
    return total // max(1, workers)


def build_datasets(root: str | Path, manifest: dict, eval_splits: list[str], data_cpu_limit: float = 0.0,
                   eval_captions: int = 0, seed: int = 0):
    """Ray Datasets for training ("train") and each evaluation split, built on the driver.

    Train rows keep all their captions and their image id: the worker draws each image's
    caption for the epoch (:func:`train_batch`, :class:`ShardCache`). The files come in
    an order seeded by ``seed`` and different every epoch (each execution reseeds)."""
    ctx = ray.data.DataContext.get_current()
    if data_cpu_limit > 0:
        # Without a cap Ray Data's tasks and the train workers fight for 2 cores and can stall.
        # Its read-ahead is capped too: the object store's pages stay resident once touched,
        # so a stream of 10x the data grew the whole job's memory with the data.
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            cpu=data_cpu_limit, object_store_memory=SMALL_CLUSTER_STORE_BYTES)
    # Ray Data coalesces what it reads into blocks of up to 128 MiB, so a streaming worker held
    # ~130 MiB of Arrow memory whatever the data's size (more than a small split's whole). With
    # 16 MiB blocks (1,300 images at 64x64) it held 20 MiB at 10x, 40x and 160x the shapes set.
    ctx.target_max_block_size = STREAM_BLOCK_BYTES
    shuffle = ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)
    datasets = {"train": ray.data.read_parquet(shard_paths(root, manifest, "train"), shuffle=shuffle)
                .select_columns(TRAIN_COLUMNS)}
    for split in eval_splits:
        datasets[split] = (ray.data.read_parquet(shard_paths(root, manifest, split))
                           .select_columns(EVAL_COLUMNS)
                           .map_batches(all_captions, fn_kwargs={"image_size": manifest["image_size"],
                                                                 "per_image": eval_captions},
                                        batch_format="pyarrow"))
    return datasets


class ShardCache:
    """One worker's share of a split, pulled from Ray Data once and kept in memory (on the
    GPU when training on one), so later epochs start no new Ray Data execution.

    Train shards keep every caption of every image (``offsets`` into ``captions``, as in
    the Parquet list column) and each image's key (:func:`image_keys`); :meth:`epoch_batches`
    reshuffles the images with a generator seeded per (seed, epoch, rank), shows each image
    with the caption :func:`caption_draws` picks for it, and drops the last partial batch
    (a batch of one breaks BatchNorm). Evaluation shards hold their (image, caption) pairs
    as they came and are served in order, all of them.
    """

    def __init__(self, images: torch.Tensor, captions: torch.Tensor, offsets: np.ndarray | None = None,
                 keys: np.ndarray | None = None):
        self.images, self.captions = images, captions
        self.offsets, self.keys = offsets, keys  # train shards only; on the host (tiny)

    @classmethod
    def from_train_tables(cls, tables, image_size: int, device) -> ShardCache:
        # Ray Data delivers the shard's files in a different order every run: sorted by image
        # id, the seeded epoch order below picks the same images in every run of one seed.
        tables = list(tables)
        if not tables:
            return cls(_to_device([], device), _to_device([], device), np.zeros(1, np.int64), np.zeros(0, np.uint64))
        table = pa.concat_tables(tables).sort_by("image_id").combine_chunks()
        starts, values = caption_rows(table.column("word_ids"))
        return cls(_to_device([decode_images(table.column("image"), image_size)], device),
                   _to_device([values[starts[0]: starts[-1]]], device), starts - starts[0],
                   image_keys(table.column("image_id").to_pylist()))

    @classmethod
    def from_eval_batches(cls, batches, device) -> ShardCache:
        batches = list(batches)
        return cls(_to_device([b["image"] for b in batches], device),
                   _to_device([b["word_ids"] for b in batches], device))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.captions))

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, rank: int):
        """Shuffled training batches ``{"image", "word_ids"}`` for one epoch."""
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
        n = len(self.images)
        order = torch.randperm(n, generator=generator).to(self.images.device)
        pick = torch.as_tensor(pick_rows(self.offsets, caption_draws(self.keys, seed, epoch))).to(self.images.device)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start: start + batch_size]
            yield {"image": self.images[idx], "word_ids": self.captions[pick[idx]]}

    def ordered_batches(self, batch_size: int):
        """Every cached evaluation pair once, in order."""
        for start in range(0, len(self.images), batch_size):
            yield {"image": self.images[start: start + batch_size], "word_ids": self.captions[start: start + batch_size]}


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One stream per (run seed, epoch, worker rank): the same seed sees the same batches,
    and a resumed run continues the stream it would have seen."""
    return (seed * 1_000_003 + epoch) * 65_537 + rank


@dataclass(frozen=True)
class FeedPlan:
    """How a worker reads its shards (decided on the driver, see ``t2i.training.driver.data_mode``)."""
    cached: bool          # pull the shards once into a ShardCache; else stream every epoch
    image_size: int
    batch_size: int       # training batch per worker
    eval_batch_size: int
    seed: int             # the run's seed: caption draws and batch order derive from it


class EpochFeed:
    """A worker's batches from its Ray Data shards (``DataIterator`` per split): streamed
    every epoch, or pulled once into a :class:`ShardCache`. Either way an epoch shows each
    image once with the same caption (:func:`caption_draws`); the cache also fixes the order
    (seeded per seed, epoch and rank); a stream's order follows Ray Data's file order
    (seeded) and a local shuffle buffer (seeded per seed, epoch and rank)."""

    def __init__(self, shards: dict, plan: FeedPlan, device, rank: int = 0, log=print):
        self.shards, self.plan, self.device, self.rank, self.log = shards, plan, device, rank, log
        self.caches: dict[str, ShardCache] = {}

    def _cache(self, split: str) -> ShardCache:
        if split not in self.caches:
            if split == "train":
                tables = self.shards[split].iter_batches(batch_size=1024, batch_format="pyarrow")
                self.caches[split] = ShardCache.from_train_tables(tables, self.plan.image_size, self.device)
            else:
                batches = self.shards[split].iter_batches(batch_size=1024, batch_format="numpy")
                self.caches[split] = ShardCache.from_eval_batches(batches, self.device)
            cache = self.caches[split]
            self.log(f"[rank {self.rank}] cached {split}: {len(cache)} rows, {cache.nbytes / 2 ** 20:.0f} MiB "
                     f"on {self.device}")
        return self.caches[split]

    def train_batches(self, epoch: int):
        plan = self.plan
        if plan.cached:
            return self._cache("train").epoch_batches(plan.batch_size, plan.seed, epoch, self.rank)
        return (train_batch(table, plan.image_size, plan.seed, epoch)
                for table in self.shards["train"].iter_batches(
                    batch_size=plan.batch_size, batch_format="pyarrow", drop_last=True,
                    local_shuffle_buffer_size=4 * plan.batch_size,
                    local_shuffle_seed=epoch_seed(plan.seed, epoch, self.rank)))

    def eval_batches(self, split: str):
        if self.plan.cached:
            return self._cache(split).ordered_batches(self.plan.eval_batch_size)
        return self.shards[split].iter_torch_batches(batch_size=self.plan.eval_batch_size)


def _to_device(parts: list, device) -> torch.Tensor:
    return torch.as_tensor(np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros(0)).to(device)


def to_model_inputs(batch: dict, device) -> tuple:
    """uint8 NHWC images -> float NCHW in [0, 1] on ``device``; ids -> long."""
    # NHWC bytes viewed as NCHW stay channels-last in memory: the layout oneDNN's (and cuDNN's)
    # fastest convolutions use (13% more images/s for the default model on 2 CPU cores).
    images = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["word_ids"].to(device, non_blocking=True).long()


class ExactEvalDataConfig(RayDataConfig):
    """Train splits evenly (DDP needs equal batches per worker); evaluation splits unevenly
    so that every dev pair is scored exactly once across the workers."""

    def __init__(self, eval_names: list[str]):
        super().__init__(datasets_to_split="all")
        self.eval_names = set(eval_names)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train V2 calls this once per dataset.
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name not in self.eval_names:
                per_rank = super().configure({name: ds}, world_size, worker_handles, worker_node_ids, **kwargs)
                for i in range(world_size):
                    output[i][name] = per_rank[i][name]
                continue
            ds = ds.copy(ds)
            ds.context.execution_options = copy.deepcopy(self.default_ingest_options())  # what Train gives the rest
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output
