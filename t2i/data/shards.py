"""One shard of prepared photos: its plan, how one task builds it, and the writer.

:func:`plan_shards` splits the chosen images into shards in name order; :func:`build_shard`
decodes, resizes and embeds one shard's images and writes its Parquet file (memory: one
shard's rows); :func:`build_shards_on_ray` runs those tasks on Ray Data. ``prepare`` calls
them (local processes or Ray), so both paths write the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from t2i import storage
from t2i.data.caption_source import SPLITS, SkipLog
from t2i.data.dataset import DatasetError
from t2i.data.text import UnknownCaptionError, Vocabulary

MAX_WORDS = 32
MAX_DECODED_PIXELS = 40_000_000  # ~120 MB of RGB per decoding process; T2I_MAX_DECODED_PIXELS changes it


def schema(dim: int, max_words: int, with_shapes: bool) -> pa.Schema:
    columns = [
        ("image_id", pa.string()),
        ("image", pa.binary()),
        ("captions", pa.list_(pa.string())),
        ("embeddings", pa.list_(pa.list_(pa.float32(), dim))),
        ("word_ids", pa.list_(pa.list_(pa.int32(), max_words))),
    ]
    if with_shapes:
        columns += [(c, pa.string()) for c in ("color", "shape", "size", "position")]
        columns += [(c, pa.float32()) for c in ("cx", "cy", "extent")]
    return pa.schema(columns)


class ShardWriter:
    """Buffers rows and writes ``<split>/part-NNNNN.parquet`` every ``shard_rows`` rows
    under ``root`` (a folder or a URI such as ``s3://bucket/prefix``)."""

    def __init__(self, root: str | Path, split: str, schema: pa.Schema, shard_rows: int, first_index: int = 0):
        self.root, self.split, self.schema, self.shard_rows = root, split, schema, shard_rows
        self.first_index = first_index  # a shard built alone keeps its place in the split's numbering
        self.rows: list[dict] = []
        self.shards: list[dict] = []
        self.images = self.captions = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.images += 1
        self.captions += len(row["captions"])
        if len(self.rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rel = f"{self.split}/part-{self.first_index + len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        buffer = io.BytesIO()
        # Images are raw bytes that compress poorly with zstd level 1 but cost little to try.
        pq.write_table(table, buffer, compression="zstd", compression_level=1)
        data = buffer.getvalue()
        storage.write_bytes(storage.join(self.root, rel), data)  # whole or not at all, on disk or in a store
        self.shards.append({"file": rel, "rows": len(self.rows), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        self.rows = []

    def summary(self) -> dict:
        self.flush()
        return {"images": self.images, "captions": self.captions, "shards": self.shards}


def encode_captions(captions: list[str], vocab: Vocabulary, image_id: str, skips: SkipLog):
    """Keep the captions with a known word; report the others. Returns (kept, means, ids)."""
    kept, means, ids = [], [], []
    for caption in captions:
        try:
            mean, row = vocab.encode(caption, MAX_WORDS)
        except UnknownCaptionError as exc:
            skips.add("caption with no known word", f"{image_id}: {exc}")
            continue
        kept.append(caption)
        means.append(mean.tolist())
        ids.append(row.tolist())
    return kept, means, ids


def load_image(location: str | Path, size: int) -> bytes:
    """Decode, centre-crop to square and resize to ``size`` (a file or a URI such as
    ``s3://bucket/flickr30k/flickr30k-images/1000092795.jpg``); raises on a corrupt file or
    one that would decode to more than ``MAX_DECODED_PIXELS`` (a decompression bomb)."""
    source = io.BytesIO(storage.read_bytes(location)) if storage.is_uri(location) else location
    with Image.open(source) as img:
        img.draft("RGB", (size * 2, size * 2))  # JPEG DCT scaling: decodes big photos at 1/2..1/8 size
        limit = int(os.environ.get("T2I_MAX_DECODED_PIXELS", MAX_DECODED_PIXELS))
        if img.width * img.height > limit:
            raise ValueError(f"{img.width}x{img.height} pixels to decode, over the "
                             f"{limit / 1e6:g}-megapixel limit")
        img = img.convert("RGB")
        img = ImageOps.fit(img, (size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).tobytes()


def load_image_or_reason(path: str, size: int) -> tuple[bytes | None, str]:
    """(pixels, "") or (None, why it could not be read) for the skip log."""
    try:
        return load_image(path, size), ""
    except Exception as exc:  # noqa: BLE001 - any decode failure means: skip and count
        return None, f"{storage.name(path)}: {type(exc).__name__}: {exc}"


def use_environment(environment: dict[str, str]) -> None:
    """A decoding process's start: the environment of the ``prepare`` that asked for it."""
    os.environ.clear()
    os.environ.update(environment)


@dataclass(frozen=True)
class ShardJob:
    """One shard to build: the candidate images of ``<split>/part-<index>.parquet``."""
    split: str
    index: int
    items: tuple[tuple[str, str, tuple[str, ...]], ...]  # (image_id, image file, captions)


def plan_shards(chosen: dict[str, list[str]], split_of: dict[str, str], files: dict[str, Path | storage.UriPath],
                shard_rows: int) -> list[ShardJob]:
    """Candidate images in name order, ``shard_rows`` to a shard, per split: the same plan
    whichever path builds it (a shard with skipped images holds fewer rows)."""
    jobs = []
    for split in SPLITS:
        names = [n for n in chosen if split_of[n] == split]
        for index, start in enumerate(range(0, len(names), shard_rows)):
            items = tuple((n, str(files[n]), tuple(chosen[n])) for n in names[start:start + shard_rows])
            jobs.append(ShardJob(split, index, items))
    return jobs


def build_shard(job: ShardJob, vocab: Vocabulary, size: int, root: str | Path) -> dict:
    """Decode, resize and embed one shard's images and write it; memory is one shard's rows.
    Returns its manifest entry (None when every image was skipped), counts and skips."""
    skips = SkipLog()
    writer = ShardWriter(root, job.split, schema(vocab.dim, MAX_WORDS, with_shapes=False), len(job.items) or 1,
                         first_index=job.index)
    for name, path, captions in job.items:
        pixels, error = load_image_or_reason(path, size)
        if pixels is None:
            skips.add("unreadable image", error)
            continue
        kept, means, ids = encode_captions(list(captions), vocab, name, skips)
        if not kept:
            skips.add("image whose captions have no known word", name)
            continue
        writer.add({"image_id": name, "image": pixels, "captions": kept, "embeddings": means, "word_ids": ids})
    summary = writer.summary()
    return {"shard": summary["shards"][0] if summary["shards"] else None, "images": summary["images"],
            "captions": summary["captions"], "skipped": skips.to_dict()}


def build_shards_on_ray(jobs: list[ShardJob], vocab: Vocabulary, size: int, root: str | Path,
                        workers: int | None, src: str | Path | None = None) -> list[dict]:
    """The shards as Ray Data tasks (one CPU each, ``workers`` at once; default: as many as
    the cluster runs), reading images from the download ``src`` and writing to ``root``,
    which every node must see (URIs or shared mounts). Results are returned in plan order."""
    import ray  # noqa: PLC0415 - only this path needs Ray

    from t2i.runtime.ray_env import alive_hosts, quiet_ray_data, start_ray  # noqa: PLC0415

    start_ray()
    quiet_ray_data()
    locations = {"--out": str(root), **({"--src": str(src)} if src is not None else {})}
    problem = storage.shared_storage_problem(locations, alive_hosts())
    if problem:
        raise DatasetError(problem)
    items = [{"job": json.dumps({"split": j.split, "index": j.index, "items": j.items})} for j in jobs]

    def build(row: dict) -> dict:
        spec = json.loads(row["job"])
        job = ShardJob(spec["split"], spec["index"], tuple((n, p, tuple(c)) for n, p, c in spec["items"]))
        return {"split": job.split, "index": job.index, "result": json.dumps(build_shard(job, vocab, size, root))}

    built = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map(
        build, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=workers or None))
    # Tasks finish in any order (and Ray Data does not keep it by default): back to the plan's.
    by_shard = {(row["split"], row["index"]): json.loads(row["result"]) for row in built.take_all()}
    return [by_shard[(job.split, job.index)] for job in jobs]
