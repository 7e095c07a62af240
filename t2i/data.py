"""Prepared Parquet -> Ray Datasets -> batches of (image uint8, word ids).

Datasets are built on the driver and streamed to the workers: no split is ever loaded
into memory whole. Training rows pick one of the image's captions at random each time
the dataset is iterated (every epoch), so all captions get used; evaluation rows expand
to every (image, caption) pair, like the seed's test set.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from t2i import storage
from t2i.flickr8k import DatasetError
from t2i.prepare import FORMAT, prepare_shapes
from t2i.text import Vocabulary

TRAIN_COLUMNS = ["image", "word_ids"]


def default_shapes_dir(cache_dir: str | Path, n: int, seed: int = 0) -> Path:
    return Path(cache_dir) / f"shapes-n{n}-seed{seed}"


def ensure_shapes(cache_dir: str | Path, n: int, seed: int = 0) -> Path:
    """The built-in shapes set, prepared on first use and cached."""
    out = default_shapes_dir(cache_dir, n, seed)
    if not (out / "manifest.json").is_file():
        prepare_shapes(out, n=n, seed=seed)  # never overwrites; a concurrent twin is fine
    return out


def load_manifest(root: str | Path, verify_checksums: bool = True) -> dict:
    """Read and check a prepared dataset (a folder or a URI such as ``s3://bucket/f8k``):
    manifest present, every shard there and intact."""
    root = storage.absolute(root)
    if not storage.is_dir(root):
        raise DatasetError(f"data folder not found: {root}")
    path = storage.join(root, "manifest.json")
    if not storage.is_file(path):
        contents = ", ".join(storage.list_names(root)[:5]) or "it is empty"
        raise DatasetError(f"{path} not found ({contents}); prepare the data first: "
                           "python -m t2i prepare flickr8k --src DIR --out DIR")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            file = storage.join(root, shard["file"])
            found = storage.size(file)
            if found is None:
                raise DatasetError(f"manifest/shard mismatch: {file} is listed for {split} but missing")
            if found != shard["bytes"]:
                raise DatasetError(f"manifest/shard mismatch: {file} has {found} bytes, "
                                   f"manifest says {shard['bytes']} (truncated or replaced?)")
            if verify_checksums and storage.sha256(file) != shard["sha256"]:
                raise DatasetError(f"checksum mismatch for {file}: the shard changed after preparation")
    return manifest


def load_vocabulary(root: str | Path) -> Vocabulary:
    table = pq.read_table(storage.join(storage.absolute(root), "vocab.parquet"))
    vectors = table.column("vector").combine_chunks()
    dim = vectors.type.list_size
    return Vocabulary(table.column("word").to_pylist(),
                      vectors.flatten().to_numpy().reshape(-1, dim).astype(np.float32))


def shard_paths(root: str | Path, manifest: dict, split: str) -> list[str]:
    if split not in manifest["splits"]:
        raise DatasetError(f"split {split!r} not in {root}; it has {sorted(manifest['splits'])}")
    root = storage.absolute(root)
    files = [storage.join(root, s["file"]) for s in manifest["splits"][split]["shards"]]
    if not files:
        raise DatasetError(f"split {split!r} of {root} has no images")
    return files


def decode_images(column: pa.ChunkedArray | pa.Array, size: int) -> np.ndarray:
    """Binary column of raw HWC bytes -> (N, size, size, 3) uint8 without per-row copies."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.type != pa.binary():
        array = array.cast(pa.binary())
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset: array.offset + len(array) + 1]
    expected = size * size * 3
    if len(array) and not np.all(np.diff(offsets) == expected):
        raise DatasetError(f"image bytes are not {size}x{size}x3 in a shard (wrong --size or corrupt data)")
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]: offsets[-1]]
    return data.reshape(len(array), size, size, 3)


def _caption_rows(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """list<fixed_size_list<int32, L>> -> (per-row offsets (N+1,), all rows (total, L))."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    inner = array.values
    width = inner.type.list_size
    values = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return offsets, values


def pick_caption(batch: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    """One random caption per image; fresh randomness each call, so each epoch differs."""
    offsets, rows = _caption_rows(batch.column("word_ids"))
    counts = np.diff(offsets)
    pick = offsets[:-1] + (np.random.default_rng().random(len(counts)) * counts).astype(np.int64)
    return {"image": decode_images(batch.column("image"), image_size), "word_ids": rows[pick]}


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
    offsets, rows = _caption_rows(batch.column("word_ids"))
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
                   cached: bool = False, eval_captions: int = 0):
    """Ray Datasets for training ("train") and each evaluation split, built on the driver.

    ``cached``: the train rows keep all their captions (the worker caches its shard once and
    draws a caption per image each epoch, see :class:`ShardCache`); otherwise each pass
    picks one caption per image as it streams."""
    import ray.data  # noqa: PLC0415 - Ray stays out of the non-Ray code paths

    ctx = ray.data.DataContext.get_current()
    if data_cpu_limit > 0:
        # Without a cap Ray Data's tasks and the train workers fight for 2 cores and can stall.
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=data_cpu_limit)
    size = manifest["image_size"]
    columns = TRAIN_COLUMNS + ["image_id"] if cached else TRAIN_COLUMNS  # the cache sorts by image id
    train = ray.data.read_parquet(shard_paths(root, manifest, "train"), shuffle="files").select_columns(columns)
    if not cached:
        train = train.map_batches(pick_caption, fn_kwargs={"image_size": size}, batch_format="pyarrow")
    datasets = {"train": train}
    for split in eval_splits:
        datasets[split] = (ray.data.read_parquet(shard_paths(root, manifest, split))
                           .select_columns(TRAIN_COLUMNS)
                           .map_batches(all_captions, fn_kwargs={"image_size": size, "per_image": eval_captions},
                                        batch_format="pyarrow"))
    return datasets


class ShardCache:
    """One worker's share of a split, pulled from Ray Data once and kept in memory (on the
    GPU when training on one), so later epochs start no new Ray Data execution.

    Train shards keep every caption of every image (``offsets`` into ``captions``, as in
    the Parquet list column); :meth:`epoch_batches` reshuffles the images and draws one
    caption per image, both from a generator seeded per (seed, epoch, rank), and drops the
    last partial batch (a batch of one breaks BatchNorm). Evaluation shards hold their
    (image, caption) pairs as they came and are served in order, all of them.
    """

    def __init__(self, images: torch.Tensor, captions: torch.Tensor, offsets: torch.Tensor | None):
        self.images, self.captions, self.offsets = images, captions, offsets

    @classmethod
    def from_train_tables(cls, tables, image_size: int, device) -> "ShardCache":
        # Ray Data delivers the shard's files in a different order every run: sorted by image
        # id, the seeded epoch order below picks the same images in every run of one seed.
        tables = list(tables)
        if tables and "image_id" in tables[0].column_names:
            tables = [pa.concat_tables(tables).sort_by("image_id").combine_chunks()]
        images, rows, offsets = [], [], [np.zeros(1, np.int64)]
        for table in tables:
            starts, values = _caption_rows(table.column("word_ids"))
            images.append(decode_images(table.column("image"), image_size))
            rows.append(values[starts[0]: starts[-1]])
            offsets.append(starts[1:] - starts[0] + offsets[-1][-1])
        return cls(_to_device(images, device), _to_device(rows, device),
                   torch.as_tensor(np.concatenate(offsets)).to(device))

    @classmethod
    def from_eval_batches(cls, batches, device) -> "ShardCache":
        batches = list(batches)
        return cls(_to_device([b["image"] for b in batches], device),
                   _to_device([b["word_ids"] for b in batches], device), None)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.images, self.captions, self.offsets) if t is not None)

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, rank: int):
        """Shuffled training batches ``{"image", "word_ids"}`` for one epoch."""
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
        n = len(self.images)
        order = torch.randperm(n, generator=generator).to(self.images.device)
        counts = self.offsets[1:] - self.offsets[:-1]
        draw = torch.rand(n, generator=generator).to(self.images.device)
        pick = self.offsets[:-1] + (draw * counts).long().clamp(max=counts - 1)
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


def _to_device(parts: list, device) -> torch.Tensor:
    return torch.as_tensor(np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros(0)).to(device)


def to_model_inputs(batch: dict, device) -> tuple:
    """uint8 NHWC images -> float NCHW in [0, 1] on ``device``; ids -> long."""
    # NHWC bytes viewed as NCHW stay channels-last in memory: the layout oneDNN's (and cuDNN's)
    # fastest convolutions use (13% more images/s for the default model on 2 CPU cores).
    images = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    images = images.contiguous(memory_format=torch.channels_last)
    return images, batch["word_ids"].to(device, non_blocking=True).long()


def read_split_arrays(root: str | Path, manifest: dict, split: str, attributes: bool = False) -> dict:
    """A whole split in memory, for evaluation (no Ray): images (N, H, W, 3) uint8, one row
    per caption in ``word_ids`` (M, L) / ``embeddings`` (M, d) / ``caption_image`` (M,) /
    ``captions``, and, for the shapes set, the ground-truth attributes per image."""
    columns = ["image", "word_ids", "embeddings", "captions"]
    if attributes:
        columns += ["color", "shape", "size", "position"]
    filesystem, paths = storage.filesystem_and_paths(shard_paths(root, manifest, split))
    table = pq.read_table(paths, columns=columns, filesystem=filesystem)
    offsets, ids = _caption_rows(table.column("word_ids"))
    emb_offsets, emb = _caption_rows(table.column("embeddings"))
    counts = np.diff(offsets)
    out = {
        "images": decode_images(table.column("image"), manifest["image_size"]),
        "word_ids": ids[offsets[0]: offsets[-1]],
        "embeddings": emb[emb_offsets[0]: emb_offsets[-1]].astype(np.float32),
        "caption_image": np.repeat(np.arange(len(counts)), counts),
        "captions": [c for caps in table.column("captions").to_pylist() for c in caps],
    }
    if attributes:
        out["attributes"] = {c: table.column(c).to_pylist() for c in ("color", "shape", "size", "position")}
    return out
