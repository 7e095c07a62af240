"""Reading a Flickr30k download in either public layout (no Parquet, no Ray here).

* original: ``flickr30k-images/*.jpg`` + ``results_20130124.token`` (``NAME.jpg#K<TAB>caption``)
* Kaggle:   ``flickr30k_images/`` (images, possibly one folder deeper) + ``results.csv``
  (beside it or inside it): header ``image_name| comment_number| comment``, fields
  separated by ``|`` and spaces, one caption per row

Splits: Karpathy's (``dataset_flickr30k.json``: ``images[].{filename, split}``, its ``val``
is t2i's ``dev``) when given or found in the folder, else the stable hash split (80/10/10).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from t2i import storage
from t2i.data.caption_source import (
    CaptionSource,
    SkipLog,
    hash_split,
    read_karpathy,
    read_token_file,
    require,
    text_lines,
)
from t2i.data.dataset import DatasetError

TOKEN_FILE = "results_20130124.token"
KARPATHY_FILE = "dataset_flickr30k.json"
# The Kaggle CSV's one known malformed row lost the separator after its comment number:
# "2199200615.jpg| 4 A dog runs across the grass ." -> number 4, then the caption.
NUMBER_THEN_CAPTION = re.compile(r"\s*(\d+)\s+(\S.*)")


def detect_layout(src: Path) -> str:
    if not src.is_dir():
        raise DatasetError(f"Flickr30k folder not found: {src}")
    if (src / TOKEN_FILE).is_file() or (src / "flickr30k-images").is_dir():
        return "original"
    if (src / "results.csv").is_file() or (src / "flickr30k_images").is_dir():
        return "kaggle"
    raise DatasetError(f"{src} holds neither Flickr30k layout: expected flickr30k-images/ + {TOKEN_FILE} "
                       "(original) or flickr30k_images/ + results.csv (Kaggle)")


def read_results_csv(path: Path, skips: SkipLog) -> dict[str, list[str]]:
    """Kaggle's ``results.csv``: ``image_name| comment_number| comment`` rows."""
    captions: dict[str, list[str]] = defaultdict(list)
    lines = iter(text_lines(path, skips))
    header = next(lines, None)
    if header is None or [h.strip().lower() for h in header.split("|")] != ["image_name", "comment_number", "comment"]:
        raise DatasetError(f"{path}: expected the header 'image_name| comment_number| comment', got {header!r}")
    for line in lines:
        if not line.strip():
            continue
        fields = line.split("|", 2)
        if len(fields) == 2 and (joined := NUMBER_THEN_CAPTION.fullmatch(fields[1])):
            fields = [fields[0], joined.group(1), joined.group(2)]
        if len(fields) != 3 or not fields[0].strip() or not fields[2].strip():
            skips.add("results.csv row without image name, number and caption", line)
            continue
        captions[fields[0].strip()].append(fields[2].strip())
    return captions


def read_source(src: str | Path, skips: SkipLog, karpathy: str | Path | None = None) -> CaptionSource:
    src = storage.as_path(src)
    layout = detect_layout(src)
    if layout == "original":
        image_dir = require(src / "flickr30k-images", "image folder")
        captions = read_token_file(require(src / TOKEN_FILE, "caption file"), skips)
    else:
        image_dir = require(src / "flickr30k_images", "image folder")
        if (image_dir / "flickr30k_images").is_dir():  # the Kaggle archive nests its images once more
            image_dir = image_dir / "flickr30k_images"
        csv_path = next((p for p in (src / "results.csv", src / "flickr30k_images" / "results.csv") if p.is_file()),
                        src / "results.csv")
        captions = read_results_csv(require(csv_path, "caption file"), skips)
    karpathy = storage.as_path(karpathy) if karpathy else (src / KARPATHY_FILE if (src / KARPATHY_FILE).is_file() else None)
    if karpathy:
        split_of, _ = read_karpathy(require(karpathy, "Karpathy split file"), skips)
        split_source = f"Karpathy's split ({karpathy.name})"
    else:
        split_of = {name: hash_split(name) for name in captions}
        split_source = "hash of image name (80/10/10)"
    return CaptionSource(layout, (image_dir,), dict(captions), split_of, split_source)
