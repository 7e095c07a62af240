"""The prepared-data contract, read side: a folder (or URI) of Parquet shards, ``vocab.parquet``
and ``manifest.json`` as ``t2i.data.prepare`` writes them.

Everything here reads: the manifest (checked against the shards), the vocabulary, the
shard list of a split, raw image bytes and caption rows, a whole split for evaluation.
No Ray, and nothing of the writer: the read path never prepares data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from t2i import storage
from t2i.data.text import Vocabulary
from t2i.errors import T2IError

if TYPE_CHECKING:
    import torch

FORMAT = "t2i-prepared/1"


class DatasetError(T2IError):
    """Data that cannot be prepared or read (missing folder or file, unreadable layout,
    shards that do not match their manifest)."""


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


def caption_rows(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """list<fixed_size_list<int32, L>> -> (per-row offsets (N+1,), all rows (total, L))."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    inner = array.values
    width = inner.type.list_size
    values = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return offsets, values


def read_split_arrays(root: str | Path, manifest: dict, split: str, attributes: bool = False) -> dict:
    """A whole split in memory, for evaluation (no Ray): images (N, H, W, 3) uint8, one row
    per caption in ``word_ids`` (M, L) / ``embeddings`` (M, d) / ``caption_image`` (M,) /
    ``captions``, and, for the shapes set, the ground-truth attributes per image."""
    columns = ["image", "word_ids", "embeddings", "captions"]
    if attributes:
        columns += ["color", "shape", "size", "position"]
    filesystem, paths = storage.filesystem_and_paths(shard_paths(root, manifest, split))
    table = pq.read_table(paths, columns=columns, filesystem=filesystem)
    offsets, ids = caption_rows(table.column("word_ids"))
    emb_offsets, emb = caption_rows(table.column("embeddings"))
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


def sample_caption_rows(root: str | Path, manifest: dict, split: str, k: int, seed: int = 0) -> np.ndarray:
    """``k`` caption rows (k, L) of distinct text, drawn with ``seed`` from the split's first
    shard only: a fixed sample whose cost does not grow with the data set."""
    filesystem, paths = storage.filesystem_and_paths(shard_paths(root, manifest, split)[:1])
    _, ids = caption_rows(pq.read_table(paths, columns=["word_ids"], filesystem=filesystem).column("word_ids"))
    distinct = np.unique(ids, axis=0)
    if len(distinct) < k:
        raise DatasetError(f"the first {split} shard of {root} has {len(distinct)} distinct captions; {k} are needed")
    return distinct[np.sort(np.random.default_rng(seed).choice(len(distinct), size=k, replace=False))]


def to_float(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    import torch  # noqa: PLC0415 - prepare's decoding processes read this module and need no torch
    return torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float().div(255.0)
