"""Reading a Flickr8k download in either public layout (no Parquet, no Ray here).

* original: ``Flicker8k_Dataset/*.jpg`` + ``Flickr8k_text/Flickr8k.token.txt`` (``name.jpg#k<TAB>caption``)
  + ``Flickr8k_text/Flickr_8k.{train,dev,test}Images.txt``
* Kaggle:   ``Images/*.jpg`` + ``captions.txt`` (CSV with header ``image,caption``)

Splits are by image: the official split files when present, else a stable hash of the
image name (80/10/10).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from t2i import storage
from t2i.data.caption_source import (
    SPLITS,
    CaptionSource,
    SkipLog,
    hash_split,
    read_token_file,
    require,
    text_lines,
)
from t2i.data.dataset import DatasetError


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


def _read_kaggle_csv(path: Path, skips: SkipLog) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = defaultdict(list)
    text = "\n".join(text_lines(path, skips))
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


def read_source(src: str | Path, skips: SkipLog) -> CaptionSource:
    src = storage.as_path(src)
    layout = detect_layout(src)
    if layout == "original":
        image_dir = require(src / "Flicker8k_Dataset", "image folder")
        text_dir = require(src / "Flickr8k_text", "caption folder")
        captions = read_token_file(require(text_dir / "Flickr8k.token.txt", "caption file"), skips)
        split_files = {s: text_dir / f"Flickr_8k.{s}Images.txt" for s in SPLITS}
    else:
        image_dir = require(src / "Images", "image folder")
        captions = _read_kaggle_csv(require(src / "captions.txt", "caption file"), skips)
        split_files = {s: src / f"Flickr_8k.{s}Images.txt" for s in SPLITS}

    present = [s for s, p in split_files.items() if p.is_file()]
    if present and len(present) < len(SPLITS):
        missing = [str(split_files[s]) for s in SPLITS if s not in present]
        raise DatasetError(f"some official split files are missing: {', '.join(missing)}")
    split_of: dict[str, str] = {}
    if present:
        split_source = "official split files"
        for split, path in split_files.items():
            for line in text_lines(path, skips):
                if line.strip():
                    split_of.setdefault(line.strip(), split)
    else:
        split_source = "hash of image name (80/10/10)"
        split_of = {name: hash_split(name) for name in captions}
    return CaptionSource(layout, (image_dir,), dict(captions), split_of, split_source)
