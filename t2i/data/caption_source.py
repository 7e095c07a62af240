"""What every captioned-photo reader hands ``prepare`` (no Parquet, no Ray here): the
images' folders, each image's captions and split, and a log of what was skipped and why.
Readers: ``flickr8k``, ``flickr30k``, ``coco``."""

from __future__ import annotations

import codecs
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from t2i.data.dataset import DatasetError

SPLITS = ("train", "dev", "test")
# Karpathy's split files (Flickr8k/30k, COCO): his "val" is t2i's dev; COCO's "restval" trains.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "dev", "test": "test"}


@dataclass
class SkipLog:
    """Counts of skipped items per reason, with a few examples each (goes in the manifest)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, example: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(example[:200])

    def merge(self, other: dict) -> None:
        """Add a :meth:`to_dict` of another log (a shard built elsewhere)."""
        for reason, entry in other.items():
            self.counts[reason] = self.counts.get(reason, 0) + entry["count"]
            shown = self.examples.setdefault(reason, [])
            shown.extend(entry["examples"][: max(0, 5 - len(shown))])

    def to_dict(self) -> dict:
        return {r: {"count": c, "examples": self.examples.get(r, [])} for r, c in sorted(self.counts.items())}


@dataclass
class CaptionSource:
    layout: str                      # e.g. "original", "kaggle", "coco2014", "karpathy"
    image_dirs: tuple[Path, ...]     # folders holding the images (COCO: one per split of the download)
    captions: dict[str, list[str]]   # image file name -> captions, file order
    split_of: dict[str, str]         # image file name -> split (images in no split absent)
    split_source: str                # how the splits were decided, for the manifest


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    return path


def text_lines(path: Path, skips: SkipLog):
    """Decoded lines of a text file: UTF-8 (with or without Excel's byte-order mark) or
    UTF-16 with its mark; single lines that are not UTF-8 are skipped and counted."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            yield from data.decode("utf-16").splitlines()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: starts with a UTF-16 byte-order mark but is not UTF-16 ({exc.reason}); "
                               "save it as UTF-8") from None
        return
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if data[:200].count(0) > 20:  # every other byte zero: UTF-16 (or UTF-32) saved without a mark
        raise DatasetError(f"{path}: looks like UTF-16 or UTF-32 text without a byte-order mark; "
                           "save it as UTF-8 (or UTF-16 with its mark)")
    for raw in data.splitlines():
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            skips.add("caption line not UTF-8", f"{path.name}: {raw[:60]!r}")


def hash_bucket(name: str, buckets: int) -> int:
    """A stable bucket of an image name (the same on every machine and Python)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % buckets


def hash_split(name: str) -> str:
    """80/10/10 train/dev/test by a stable hash of the image name."""
    bucket = hash_bucket(name, 10)
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def read_token_file(path: Path, skips: SkipLog) -> dict[str, list[str]]:
    """``NAME.jpg#K<TAB>caption`` per line (Flickr8k's and Flickr30k's token files)."""
    captions: dict[str, list[str]] = defaultdict(list)
    for line in text_lines(path, skips):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name = key.split("#", 1)[0].strip()
        if not tab or not name or not caption.strip():
            skips.add("caption line without tab or text", line)
            continue
        captions[name].append(caption.strip())
    return captions


def read_karpathy(path: Path, skips: SkipLog) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(file name -> t2i split, file name -> sentences) from a Karpathy split file
    (``images[].{filename, split, sentences[].raw}``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable JSON: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{path}: not a Karpathy split file (no 'images' list)")
    split_of, sentences = {}, {}
    for entry in images:
        name = entry.get("filename") if isinstance(entry, dict) else None
        split = KARPATHY_SPLITS.get(entry.get("split")) if isinstance(entry, dict) else None
        if not name or split is None:
            skips.add("Karpathy entry without filename or known split", str(entry)[:120])
            continue
        split_of[name] = split
        sentences[name] = [s["raw"].strip() for s in entry.get("sentences", [])
                           if isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip()]
    return split_of, sentences
