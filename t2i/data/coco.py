"""Reading MS-COCO captions, 2014 or 2017 (no Parquet, no Ray here).

``annotations/captions_{train,val}{YEAR}.json`` (``images[].{id, file_name}``,
``annotations[].{image_id, caption}``) with the images in ``train{YEAR}/`` and ``val{YEAR}/``.
An image keeps every caption it has (5 to 7).

Splits follow the text-to-image papers (AttnGAN, DF-GAN: train on COCO-2014 train, test on
val): ``train{YEAR}`` is train except one image in 20, by a stable hash of its name, carved
out as dev; ``val{YEAR}`` is test. Karpathy's ``dataset_coco.json`` (``images[].{filepath,
filename, split, sentences[].raw}``; ``restval`` joins train, ``val`` is dev) replaces
them when given or found in the folder; without the annotation files its sentences are
the captions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from t2i import storage
from t2i.data.caption_source import CaptionSource, SkipLog, hash_bucket, read_karpathy
from t2i.data.dataset import DatasetError

YEARS = ("2014", "2017")
KARPATHY_FILE = "dataset_coco.json"
DEV_ONE_IN = 20  # dev images carved out of COCO's train split


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object")
    return data


def detect_year(src: Path, year: str | None, karpathy_given: bool = False) -> str:
    if not src.is_dir():
        raise DatasetError(f"COCO folder not found: {src}")
    found = [y for y in YEARS if (src / "annotations" / f"captions_train{y}.json").is_file()
             or (src / "annotations" / f"captions_val{y}.json").is_file()]
    if year:
        if year not in YEARS:
            raise DatasetError(f"--year {year}: COCO captions come as {' or '.join(YEARS)}")
        return year
    if found:
        return found[0]  # 2014 first: the year the text-to-image papers report on
    if karpathy_given or (src / KARPATHY_FILE).is_file():
        return "2014"  # Karpathy's split indexes the 2014 images
    raise DatasetError(f"{src} holds no COCO captions: expected annotations/captions_train2014.json (or 2017) "
                       f"and train2014/, val2014/ beside it, or {KARPATHY_FILE}")


def read_annotations(path: Path, skips: SkipLog) -> dict[str, list[str]]:
    """File name -> captions (annotation order) of one ``captions_*.json``."""
    data = _load_json(path)
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DatasetError(f"{path}: expected 'images' and 'annotations' lists (a COCO captions file)")
    name_of = {}
    for image in images:
        if isinstance(image, dict) and isinstance(image.get("file_name"), str) and "id" in image:
            name_of[image["id"]] = image["file_name"]
        else:
            skips.add("COCO image entry without id and file_name", str(image)[:120])
    captions: dict[str, list[str]] = defaultdict(list)
    for note in annotations:
        caption = note.get("caption") if isinstance(note, dict) else None
        name = name_of.get(note.get("image_id")) if isinstance(note, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            skips.add("COCO annotation without caption text", str(note)[:120])
        elif name is None:
            skips.add("COCO caption of an image not listed", str(note)[:120])
        else:
            captions[name].append(" ".join(caption.split()))  # some captions carry newlines
    return captions


def read_source(src: str | Path, skips: SkipLog, karpathy: str | Path | None = None,
                year: str | None = None) -> CaptionSource:
    src = storage.as_path(src)
    year = detect_year(src, year, karpathy is not None)
    image_dirs = tuple(src / f"{part}{year}" for part in ("train", "val") if (src / f"{part}{year}").is_dir())
    if not image_dirs:
        raise DatasetError(f"image folder not found: {src / f'train{year}'} (or {src / f'val{year}'})")
    captions: dict[str, list[str]] = {}
    default_split: dict[str, str] = {}
    for part in ("train", "val"):
        path = src / "annotations" / f"captions_{part}{year}.json"
        if not path.is_file():
            continue
        for name, caps in read_annotations(path, skips).items():
            captions[name] = caps
            default_split[name] = ("dev" if hash_bucket(name, DEV_ONE_IN) == 0 else "train") if part == "train" else "test"
    karpathy = storage.as_path(karpathy) if karpathy else (src / KARPATHY_FILE if (src / KARPATHY_FILE).is_file() else None)
    if karpathy:
        if not karpathy.is_file():
            raise DatasetError(f"Karpathy split file not found: {karpathy}")
        split_of, sentences = read_karpathy(karpathy, skips)
        if not captions:
            captions = sentences
        return CaptionSource(f"coco{year}", image_dirs, captions, split_of, f"Karpathy's split ({karpathy.name})")
    if not captions:
        raise DatasetError(f"{src / 'annotations'}: no captions_train{year}.json or captions_val{year}.json")
    return CaptionSource(f"coco{year}", image_dirs, captions, default_split,
                         f"COCO {year} train (1 in {DEV_ONE_IN} by name hash -> dev) and val (-> test)")
