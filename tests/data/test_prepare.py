import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import FLICKR8K, needs_flickr8k
from PIL import Image

from t2i.data import shapes
from t2i.data.dataset import DatasetError, load_manifest
from t2i.data.flickr8k import hash_split
from t2i.data.prepare import prepare_flickr8k, prepare_shapes, staged_output

NAMES = [f"{i}000_abc.jpg" for i in range(6)]


def _images(folder, names):
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.new("RGB", (120 + 10 * i, 90), (40 * i, 100, 200)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (50, 50)).save(folder / "nocaps.jpg")


def fake_original(root):
    _images(root / "Flicker8k_Dataset", NAMES)
    text = root / "Flickr8k_text"
    text.mkdir()
    lines = [f"{n}#{k}\ta dog runs on grass number {k}" for n in NAMES for k in range(2)]
    lines += ["broken.jpg#0\ta cat", "ghost.jpg#0\ta ghost in the night", "line without a tab",
              f"{NAMES[0]}#2\tzzqx blorf"]
    data = ("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\tx\n"
    (text / "Flickr8k.token.txt").write_bytes(data)
    splits = {"train": NAMES[:3] + ["broken.jpg"], "dev": NAMES[3:4], "test": NAMES[4:5]}
    for split, names in splits.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    return root


def fake_kaggle(root):
    _images(root / "Images", NAMES)
    rows = ["image,caption"] + [f"{n},a dog runs on grass, fast {k}" for n in NAMES for k in range(2)]
    rows += ["broken.jpg,a cat", "badrow"]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root


def test_original_layout_counts_and_skips(tmp_path):
    m = prepare_flickr8k(fake_original(tmp_path / "src"), tmp_path / "out", size=16, shard_rows=2, workers=1)
    assert m["layout"] == "original" and m["split_source"] == "official split files"
    assert {s: v["images"] for s, v in m["splits"].items()} == {"train": 3, "dev": 1, "test": 1}
    assert m["splits"]["train"]["captions"] == 6  # the all-unknown third caption was dropped
    skipped = {r: v["count"] for r, v in m["skipped"].items()}
    assert skipped == {
        "unreadable image": 1, "image without captions": 1, "captions for a missing image": 1,
        "caption line without tab or text": 1, "caption line not UTF-8": 1,
        "caption with no known word": 1, "image in no split": 1,
    }
    assert "blorf" in m["skipped"]["caption with no known word"]["examples"][0]
    assert len(m["splits"]["train"]["shards"]) == 2  # 3 rows, 2 per shard
    table = pq.read_table(tmp_path / "out" / m["splits"]["train"]["shards"][0]["file"])
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["image"]) == 16 * 16 * 3
    assert len(row["embeddings"]) == len(row["captions"]) == len(row["word_ids"]) == 2
    assert len(row["embeddings"][0]) == 50 and len(row["word_ids"][0]) == m["max_words"]


def test_kaggle_layout_hash_split(tmp_path):
    m = prepare_flickr8k(fake_kaggle(tmp_path / "src"), tmp_path / "out", size=8, workers=1)
    assert m["layout"] == "kaggle" and m["split_source"].startswith("hash")
    total = sum(v["images"] for v in m["splits"].values())
    assert total == len(NAMES)
    expected = {s: sum(hash_split(n) == s for n in NAMES) for s in ("train", "dev", "test")}
    assert {s: v["images"] for s, v in m["splits"].items()} == expected
    assert m["skipped"]["bad CSV row"]["count"] == 1
    first = pq.read_table(tmp_path / "out" / m["splits"]["train"]["shards"][0]["file"]).to_pylist()[0]
    assert first["captions"][0].startswith("a dog runs on grass, fast")  # comma kept


def test_missing_inputs_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        prepare_flickr8k(tmp_path / "nope", tmp_path / "out")
    src = fake_original(tmp_path / "src")
    (src / "Flickr8k_text" / "Flickr8k.token.txt").unlink()
    with pytest.raises(DatasetError, match="Flickr8k.token.txt"):
        prepare_flickr8k(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_then_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    prepare_shapes(out, n=20, seed=1)
    before = (out / "manifest.json").read_text()
    with pytest.raises(DatasetError, match="--overwrite"):
        prepare_shapes(out, n=30, seed=1)
    assert (out / "manifest.json").read_text() == before
    prepare_shapes(out, n=30, seed=1, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["source"].endswith("(n=30, seed=1)")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_overwrite_refuses_a_folder_that_is_not_a_t2i_dataset(tmp_path):
    precious = tmp_path / "data"
    (precious / "notes").mkdir(parents=True)
    (precious / "notes" / "thesis.txt").write_text("years of work")
    with pytest.raises(DatasetError, match="not a t2i dataset"):
        prepare_shapes(precious, n=20, seed=1, overwrite=True)
    assert (precious / "notes" / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_two_preparations_of_one_folder_keep_the_first_finished(tmp_path):
    """A second job that finds the folder finished by a twin meanwhile keeps it, not its own."""
    out = tmp_path / "shapes"
    with staged_output(out, overwrite=False) as staging:
        (staging / "mine.txt").write_text("late copy")
        prepare_shapes(out, n=20, seed=1)  # the twin finishes first
        first = (out / "manifest.json").read_text()
    assert (out / "manifest.json").read_text() == first and not (out / "mine.txt").exists()
    assert load_manifest(out)["splits"]
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no staging left behind


def test_shapes_deterministic_with_attributes_and_novel_split(tmp_path):
    a = prepare_shapes(tmp_path / "a", n=300, seed=3)
    b = prepare_shapes(tmp_path / "b", n=300, seed=3)
    assert [s["sha256"] for v in a["splits"].values() for s in v["shards"]] == \
           [s["sha256"] for v in b["splits"].values() for s in v["shards"]]
    rows = pq.read_table(tmp_path / "a" / "train").to_pylist()
    novel = pq.read_table(tmp_path / "a" / "novel").to_pylist()
    assert novel and all((r["color"], r["shape"]) in shapes.NOVEL_PAIRS for r in novel)
    assert not any((r["color"], r["shape"]) in shapes.NOVEL_PAIRS for r in rows)
    for r in rows[:50]:
        img = np.frombuffer(r["image"], np.uint8).reshape(64, 64, 3)
        assert tuple(img[int(r["cy"]), int(r["cx"])]) == shapes.COLORS[r["color"]]  # centre is filled
        assert tuple(img[0, 0]) == (0, 0, 0) or r["size"] == "large"
        assert len(r["captions"]) == 5 and all(r["color"] in c for c in r["captions"])
        assert all(any(w in c for w in shapes.SIZE_WORDS[r["size"]]) for c in r["captions"])
        assert all(any(w in c for w in shapes.SHAPE_WORDS[r["shape"]]) for c in r["captions"])
    assert a["skipped"] == {}


def test_prepare_shapes_runs_from_the_command_line(tmp_path):
    from t2i.cli import main as cli_main

    assert cli_main(["prepare", "shapes", "--n", "120", "--out", str(tmp_path / "s")]) == 0
    manifest = load_manifest(tmp_path / "s")
    assert sum(split["images"] for split in manifest["splits"].values()) == 120


def test_parquet_reads_with_ray_data(shapes_dir, ray_session):
    import ray.data

    manifest = json.loads((shapes_dir / "manifest.json").read_text())
    ds = ray.data.read_parquet(str(shapes_dir / "train"))
    assert ds.count() == manifest["splits"]["train"]["images"]
    assert set(ds.schema().names) >= {"image_id", "image", "captions", "embeddings", "word_ids", "color"}


@needs_flickr8k()
def test_real_flickr8k_counts(tmp_path):
    m = prepare_flickr8k(FLICKR8K, tmp_path / "f8k")
    got = {s: (v["images"], v["captions"]) for s, v in m["splits"].items()}
    assert got == {"train": (6000, 30000), "dev": (1000, 5000), "test": (1000, 5000)}
    assert m["skipped"]["image in no split"]["count"] == 91


# ----------------------------------------------------------------------------- careless input
def kaggle_with(root, caption_bytes: bytes, formats=("PNG",)):
    """A Kaggle layout with ``caption_bytes`` as captions.txt and one image per format."""
    images = root / "Images"
    images.mkdir(parents=True)
    for i, fmt in enumerate(formats):
        Image.new("RGB", (80, 60), (30 * i, 90, 160)).save(images / f"img{i}.{fmt.lower()}", fmt)
    (root / "captions.txt").write_bytes(caption_bytes)
    return root


def kaggle_csv(formats) -> str:
    return "image,caption\n" + "".join(f"img{i}.{f.lower()},a dog runs on grass\n" for i, f in enumerate(formats))


def test_excel_utf8_bom_and_utf16_caption_files_are_read(tmp_path):
    text = kaggle_csv(["PNG"])
    for name, data in (("bom", b"\xef\xbb\xbf" + text.encode()), ("utf16", text.encode("utf-16"))):
        m = prepare_flickr8k(kaggle_with(tmp_path / name, data), tmp_path / f"{name}-out", size=16, workers=1)
        assert sum(s["captions"] for s in m["splits"].values()) == 1, name


def test_utf16_without_a_mark_is_refused_naming_the_encoding(tmp_path):
    data = kaggle_csv(["PNG"]).encode("utf-16-le")
    with pytest.raises(DatasetError, match="looks like UTF-16 or UTF-32 text without a byte-order mark") as refused:
        prepare_flickr8k(kaggle_with(tmp_path / "src", data), tmp_path / "out", size=16, workers=1)
    assert "\x00" not in str(refused.value)


def test_gif_webp_bmp_tiff_images_are_read(tmp_path):
    formats = ("GIF", "WEBP", "BMP", "TIFF", "PNG")
    m = prepare_flickr8k(kaggle_with(tmp_path / "src", kaggle_csv(formats).encode(), formats), tmp_path / "out",
                         size=16, workers=1)
    assert sum(s["images"] for s in m["splits"].values()) == len(formats) and m["skipped"] == {}


def test_a_caption_over_the_csv_field_limit_is_skipped_with_its_reason(tmp_path):
    data = (kaggle_csv(["PNG"]) + 'img0.png,"' + "a" * 140_000 + '"\n').encode()
    m = prepare_flickr8k(kaggle_with(tmp_path / "src", data), tmp_path / "out", size=16, workers=1)
    assert "field larger than field limit" in m["skipped"]["unreadable CSV row"]["examples"][0]
    assert sum(s["captions"] for s in m["splits"].values()) == 1


@pytest.mark.parametrize("size", [0, -1, 4096])
def test_a_nonsense_size_is_refused_before_any_work(tmp_path, size):
    with pytest.raises(DatasetError, match=f"--size {size}: the output side must be 8-512"):
        prepare_flickr8k(kaggle_with(tmp_path / "src", kaggle_csv(["PNG"]).encode()), tmp_path / "out", size=size)
    assert not (tmp_path / "out").exists()


def test_out_under_a_file_and_a_malformed_glove_are_one_line(tmp_path):
    from t2i.cli import main as cli_main

    src = kaggle_with(tmp_path / "src", kaggle_csv(["PNG"]).encode())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        prepare_flickr8k(src, tmp_path / "afile" / "out", size=16, workers=1)
    glove = tmp_path / "glove.txt"
    glove.write_text("dog 0.1 0.2\ngrass zero one\n")
    assert cli_main(["prepare", "flickr8k", "--src", str(src), "--out", str(tmp_path / "out"), "--glove", str(glove),
                     "--size", "16"]) == 2
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_decompression_bomb_is_skipped_not_decoded(tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_MAX_DECODED_PIXELS", str(100 * 100))  # stands in for 40 MP
    formats = ("PNG", "BMP")
    src = kaggle_with(tmp_path / "src", kaggle_csv(formats).encode(), formats)
    Image.new("RGB", (400, 300)).save(src / "Images" / "img1.bmp")  # 120,000 pixels
    m = prepare_flickr8k(src, tmp_path / "out", size=16, workers=1)
    assert "400x300 pixels to decode, over the" in m["skipped"]["unreadable image"]["examples"][0]
    assert sum(s["images"] for s in m["splits"].values()) == 1
