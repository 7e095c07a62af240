"""Reading a Flickr8k download in either public layout (no Parquet, no Ray here).

* original: ``Flicker8k_Dataset/*.jpg`` + ``Flickr8k_text/Flickr8k.token.txt`` (``name.jpg#k<TAB>caption``)
  + ``Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt``
* Kaggle:   ``Images/*.jpg`` + ``captions.txt`` (CSV with header ``image,caption``)

Splits are by image: the official split files when present, else a stable hash of the
image name (80/10/10).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from t2i.data.dataset import DatasetError

SPLITS = ("train", "dev", "test")


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

    def to_dict(self) -> dict:
        return {r: {"count": c, "examples": self.examples.get(r, [])} for r, c in sorted(self.counts.items())}


@dataclass
class Flickr8kSource:
    layout: str                      # "original" or "kaggle"
    image_dir: Path
    captions: dict[str, list[str]]   # image file name -> captions, file order
    split_of: dict[str, str]         # image file name -> split (images in no split absent)
    split_source: str                # "official split files" or "hash of image name"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    return path


def detect_layout(src: Path) -> str:
    if not src.is_dir():
        raise DatasetError(f"Flickr8k folder not found: {src}")
    if (src / "Flicker8k_Dataset").is_dir() or (src / "Flickr8k_text").is_dir():
        return "original"
    if (src / "Images").is_dir() or (src / "captions.txt").is_file():
        return "kaggle"
    raise DatasetError(
        f"{src} holds neither Flickr8k layout: expected Flicker8k_Dataset/ + Flickr8k_text/ "
        "(original) or Images/ + captions.txt (Kaggle)"
    )


def _lines(path: Path, skips: SkipLog):
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


def _read_token_file(path: Path, skips: SkipLog) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    for line in _lines(path, skips):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name = key.split("#", 1)[0].strip()
        if not tab or not name or not caption.strip():
            skips.add("caption line without tab or text", line)
            continue
        captions[name].append(caption.strip())
    return captions


def _read_kaggle_csv(path: Path, skips: SkipLog) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    text = "\n".join(_lines(path, skips))
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
        raise DatasetError(f"{path}: expected a CSV header 'image,caption', got {header!r}")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. a field over the csv module's 131,072 characters
            skips.add("unreadable CSV row", f"{path.name} line {reader.line_num}: {exc}")
            continue
        if not row:
            continue
        if len(row) < 2 or not row[0].strip() or not ",".join(row[1:]).strip():
            skips.add("bad CSV row", ",".join(row))
            continue
        # Unquoted captions with commas split into extra fields: join them back.
        captions[row[0].strip()].append(",".join(row[1:]).strip())
    return captions


def hash_split(name: str) -> str:
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else ("dev" if bucket == 8 else "test")


def read_source(src: str | Path, skips: SkipLog) -> Flickr8kSource:
    src = Path(src)
    layout = detect_layout(src)
    if layout == "original":
        image_dir = _require(src / "Flicker8k_Dataset", "image folder")
        text_dir = _require(src / "Flickr8k_text", "caption folder")
        captions = _read_token_file(_require(text_dir / "Flickr8k.token.txt", "caption file"), skips)
        split_files = {s: text_dir / f"Flickr_8k.{s}Images.txt" for s in SPLITS}
    else:
        image_dir = _require(src / "Images", "image folder")
        captions = _read_kaggle_csv(_require(src / "captions.txt", "caption file"), skips)
        split_files = {s: src / f"Flickr_8k.{s}Images.txt" for s in SPLITS}

    present = [s for s, p in split_files.items() if p.is_file()]
    if present and len(present) < len(SPLITS):
        missing = [str(split_files[s]) for s in SPLITS if s not in present]
        raise DatasetError(f"some official split files are missing: {', '.join(missing)}")
    split_of: dict[str, str] = {}
    if present:
        split_source = "official split files"
        for split, path in split_files.items():
            for line in _lines(path, skips):
                if line.strip():
                    split_of.setdefault(line.strip(), split)
    else:
        split_source = "hash of image name (80/10/10)"
        split_of = {name: hash_split(name) for name in captions}
    return Flickr8kSource(layout, image_dir, dict(captions), split_of, split_source)
