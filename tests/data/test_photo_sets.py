"""Flickr30k (official token file, Kaggle CSV, Karpathy's split) and MS-COCO captions (2014,
2017, Karpathy's split): small samples of each public layout, every quirk the readers
handle, built here and prepared; every skipped item counted with its reason."""

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from t2i.cli import main as cli_main
from t2i.data.caption_source import hash_bucket
from t2i.data.coco import DEV_ONE_IN
from t2i.data.dataset import DatasetError, load_manifest
from t2i.data.prepare import ImageSettings, prepare_coco, prepare_flickr30k

SETTINGS = ImageSettings(size=16, shard_rows=3, workers=1)
F30K = [f"{1000092795 + i}.jpg" for i in range(8)]
CAPTIONS = ["Two young guys with shaggy hair look at their hands", "A man in a blue shirt stands in a garden",
            "Several men in hard hats are operating a giant pulley", "A child in a pink dress climbs stairs",
            "Two dogs play on the green grass"]


def images(folder, names, broken=()):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (60 + 7 * i, 45), (30 * i % 255, 90, 160)).save(folder / name)
    for name in broken:
        (folder / name).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")


def skipped(manifest, reason) -> int:
    return manifest["skipped"].get(reason, {}).get("count", 0)


def rows(out, split):
    return [row for path in sorted((out / split).glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def flickr30k_original(root):
    images(root / "flickr30k-images", F30K[:7], broken=["9.jpg"])
    lines = [f"{name}#{k}\t{CAPTIONS[k]} ." for name in F30K[:6] for k in range(5)]
    lines += ["9.jpg#0\tA dog", f"{F30K[7]}#0\tA picture nobody took", "a line without a tab"]
    (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    return root


def flickr30k_kaggle(root):
    folder = root / "flickr30k_images"
    images(folder / "flickr30k_images", F30K[:7], broken=["9.jpg"])  # the archive nests its images
    lines = ["image_name| comment_number| comment"]
    lines += [f"{name}| {k}| {CAPTIONS[k]} ." for name in F30K[:6] for k in range(5)]
    lines[-1] = f"{F30K[5]}| 4 {CAPTIONS[4]} ."  # the Kaggle file's one row without its second separator
    lines += ["9.jpg| 0| A dog", "just some text", f"{F30K[0]}| 5| A caption | with a bar in it"]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    return root


def test_flickr30k_both_layouts_give_the_same_rows(tmp_path):
    original = prepare_flickr30k(flickr30k_original(tmp_path / "orig"), tmp_path / "a", SETTINGS)
    kaggle = prepare_flickr30k(flickr30k_kaggle(tmp_path / "kaggle"), tmp_path / "b", SETTINGS)
    assert (original["layout"], kaggle["layout"]) == ("original", "kaggle")
    assert original["dataset"] == "flickr30k" and original["split_source"] == "hash of image name (80/10/10)"
    by_split = {m["layout"]: {s: {r["image_id"]: r["captions"] for r in rows(out, s)} for s in ("train", "dev", "test")}
                for m, out in ((original, tmp_path / "a"), (kaggle, tmp_path / "b"))}
    kaggle_rows = by_split["kaggle"]
    assert sum(len(v) for v in kaggle_rows.values()) == 6
    for split, found in by_split["original"].items():
        assert found.keys() == kaggle_rows[split].keys()
        for name, caps in found.items():
            extra = ["A caption | with a bar in it"] if name == F30K[0] else []
            assert kaggle_rows[split][name] == caps + extra  # the malformed row read right, a bar kept
    assert skipped(original, "caption line without tab or text") == 1
    assert skipped(kaggle, "results.csv row without image name, number and caption") == 1
    for manifest in (original, kaggle):
        assert skipped(manifest, "unreadable image") == 1            # 9.jpg
        assert skipped(manifest, "image without captions") == 1      # F30K[6]
        assert skipped(manifest, "captions for a missing image") == (1 if manifest is original else 0)


def test_flickr30k_karpathy_split_is_used_when_present(tmp_path):
    src = flickr30k_original(tmp_path / "src")
    split_of = {F30K[0]: "train", F30K[1]: "restval", F30K[2]: "val", F30K[3]: "test", F30K[4]: "test",
                F30K[5]: "train"}
    (src / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": name, "split": split, "sentences": []} for name, split in split_of.items()]
        + [{"filename": "x.jpg", "split": "holdout"}]}))
    manifest = prepare_flickr30k(src, tmp_path / "out", SETTINGS)
    assert manifest["split_source"] == "Karpathy's split (dataset_flickr30k.json)"
    assert {s: manifest["splits"][s]["images"] for s in ("train", "dev", "test")} == {"train": 3, "dev": 1, "test": 2}
    assert skipped(manifest, "Karpathy entry without filename or known split") == 1


def coco_names(part, year, n):
    prefix = f"COCO_{part}2014_" if year == "2014" else ""
    first = 1 if part == "train" else 500_000  # 2017's names are bare ids, unique across train and val
    names = [f"{prefix}{i:012d}.jpg" for i in range(first, first + 400)]
    dev = next(name for name in names if hash_bucket(name, DEV_ONE_IN) == 0)  # one image the hash sends to dev
    return [dev] + [name for name in names if name != dev][: n - 1]


def coco(root, year):
    train, val = coco_names("train", year, 4), coco_names("val", year, 2)
    for part, names in (("train", train), ("val", val)):
        images(root / f"{part}{year}", names)
        entries = [{"id": i, "file_name": name, "height": 45, "width": 60} for i, name in enumerate(names)]
        notes = [{"id": 100 * i + k, "image_id": i, "caption": CAPTIONS[k % 5]}
                 for i in range(len(names)) for k in range(5 + (i == 1) * 2)]  # the second image has 7
        notes += [{"id": 9000, "image_id": 999, "caption": "A ghost"}, {"id": 9001, "image_id": 0, "caption": " "},
                  {"id": 9002, "image_id": 0, "caption": "A dog\nwith a hat  "}]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{part}{year}.json").write_text(
            json.dumps({"images": entries, "annotations": notes}))
    return root, train, val


@pytest.mark.parametrize("year", ["2014", "2017"])
def test_coco_keeps_every_caption_and_follows_the_papers_splits(tmp_path, year):
    src, train, val = coco(tmp_path / "src", year)
    manifest = prepare_coco(src, tmp_path / "out", SETTINGS)
    assert manifest["dataset"] == "coco" and manifest["layout"] == f"coco{year}"
    splits = {s: {r["image_id"]: r["captions"] for r in rows(tmp_path / "out", s)} for s in ("train", "dev", "test")}
    assert set(splits["dev"]) == {train[0]} and set(splits["train"]) == set(train[1:]) and set(splits["test"]) == set(val)
    assert len(splits["train"][train[1]]) == 7                                # 5-7 captions: all kept
    assert splits["dev"][train[0]][-1] == "A dog with a hat"                  # whitespace and newlines folded
    assert skipped(manifest, "COCO caption of an image not listed") == 2
    assert skipped(manifest, "COCO annotation without caption text") == 2
    assert load_manifest(tmp_path / "out")["splits"]["train"]["captions"] == 5 + 7 + 5


def test_coco_karpathy_split_and_its_sentences(tmp_path):
    src, train, val = coco(tmp_path / "src", "2014")
    karpathy = tmp_path / "dataset_coco.json"
    split_of = {train[0]: "train", train[1]: "restval", train[2]: "val", train[3]: "test", val[0]: "test",
                val[1]: "val"}
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "train2014" if name in train else "val2014", "filename": name, "split": split,
         "sentences": [{"raw": "A man riding a horse "}]} for name, split in split_of.items()]}))
    manifest = prepare_coco(src, tmp_path / "out", SETTINGS, karpathy=karpathy)
    assert manifest["split_source"] == "Karpathy's split (dataset_coco.json)"
    assert {s: manifest["splits"][s]["images"] for s in ("train", "dev", "test")} == {"train": 2, "dev": 2, "test": 2}
    assert len(rows(tmp_path / "out", "train")[0]["captions"]) >= 5  # the annotations' captions, not Karpathy's one
    # Without the annotation files, Karpathy's sentences are the captions.
    for path in (src / "annotations").iterdir():
        path.unlink()
    assert cli_main(["prepare", "coco", "--src", str(src), "--karpathy", str(karpathy), "--out", str(tmp_path / "k"),
                     "--size", "16"]) == 0
    assert {tuple(r["captions"]) for r in rows(tmp_path / "k", "train")} == {("A man riding a horse",)}


def test_bad_photo_set_folders_are_named(tmp_path, capsys):
    with pytest.raises(DatasetError, match="holds neither Flickr30k layout"):
        prepare_flickr30k(tmp_path, tmp_path / "out", SETTINGS)
    with pytest.raises(DatasetError, match="holds no COCO captions"):
        prepare_coco(tmp_path, tmp_path / "out", SETTINGS)
    src, _, _ = coco(tmp_path / "src", "2014")
    (src / "annotations" / "captions_train2014.json").write_text("{not json")
    assert cli_main(["prepare", "coco", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "captions_train2014.json: not readable JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("layout", ["flickr30k-original", "flickr30k-kaggle", "coco2014"])
def test_ray_data_and_local_processes_write_the_same_shards_and_manifest(tmp_path, ray_session, layout):
    """The shard plan is made once; one process pool or Ray Data tasks build it, with the
    same shards (byte for byte) and the same manifest, skips included."""
    if layout == "coco2014":
        src, prepare = coco(tmp_path / "src", "2014")[0], prepare_coco
    else:
        maker = flickr30k_original if layout == "flickr30k-original" else flickr30k_kaggle
        src, prepare = maker(tmp_path / "src"), prepare_flickr30k
    local = prepare(src, tmp_path / "local", ImageSettings(size=16, shard_rows=2, workers=1))
    on_ray = prepare(src, tmp_path / "ray", ImageSettings(size=16, shard_rows=2, workers=2, on_ray=True))
    assert {k: v for k, v in local.items() if k != "created"} == {k: v for k, v in on_ray.items() if k != "created"}
    shards = [shard for split in local["splits"].values() for shard in split["shards"]]
    assert len(shards) >= 3 and all(shard["rows"] <= 2 for shard in shards)
    for shard in shards:
        assert (tmp_path / "local" / shard["file"]).read_bytes() == (tmp_path / "ray" / shard["file"]).read_bytes()
    assert sum(entry["count"] for entry in on_ray["skipped"].values()) > 0  # every layout has bad items to count
    assert load_manifest(tmp_path / "ray")["layout"] == local["layout"]


def test_prepare_reads_and_writes_an_object_store(tmp_path, s3_server, monkeypatch):
    """``--src s3://...`` and ``--out s3://...`` (an S3 API on 127.0.0.1): the same shards
    and manifest as from a folder; the dataset appears only once complete, an interrupted
    overwrite keeps the old copy, and a finished one leaves none of the old files."""
    import pyarrow.fs as pafs

    from t2i import storage
    from t2i.data import prepare as prepare_module

    src = flickr30k_kaggle(tmp_path / "src")
    s3, _ = pafs.FileSystem.from_uri("s3://t2i-test")
    pafs.copy_files(str(src), "t2i-test/raw/f30k", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    local = prepare_flickr30k(src, tmp_path / "local", SETTINGS)
    out = "s3://t2i-test/prepared/f30k"
    remote = prepare_flickr30k("s3://t2i-test/raw/f30k", out, SETTINGS)
    same = lambda m: {k: v for k, v in m.items() if k not in ("created", "source")}  # noqa: E731
    assert same(remote) == same(local) and remote["source"] == "s3://t2i-test/raw/f30k"
    for shard in [s for split in local["splits"].values() for s in split["shards"]]:
        assert storage.read_bytes(f"{out}/{shard['file']}") == (tmp_path / "local" / shard["file"]).read_bytes()
    assert load_manifest(out)["splits"]["train"]["images"] == local["splits"]["train"]["images"]
    assert storage.list_names("s3://t2i-test/prepared") == ["f30k"]  # the staging prefix is gone

    with pytest.raises(DatasetError, match="already exists"):
        prepare_flickr30k("s3://t2i-test/raw/f30k", out, SETTINGS)

    def fail(*args, **kwargs):
        raise OSError("connection reset while writing the manifest")
    overwrite = ImageSettings(size=16, shard_rows=1, workers=1, overwrite=True)
    with monkeypatch.context() as patched, pytest.raises(OSError, match="connection reset"):
        patched.setattr(prepare_module, "write_manifest", fail)  # every shard staged, then the connection drops
        prepare_flickr30k("s3://t2i-test/raw/f30k", out, overwrite)
    assert storage.list_names("s3://t2i-test/prepared") == ["f30k"] and load_manifest(out)["created"] == remote["created"]
    again = prepare_flickr30k("s3://t2i-test/raw/f30k", out, overwrite)
    files = {s["file"] for split in again["splits"].values() for s in split["shards"]}
    assert set(storage.list_files(out)) == files | {"manifest.json", "vocab.parquet"}  # shard_rows 3 -> 1: none left
    assert load_manifest(out)["splits"]["train"]["images"] == local["splits"]["train"]["images"]

    assert cli_main(["prepare", "flickr30k", "--src", "s3://t2i-test/raw/nothing", "--out", "s3://t2i-test/x"]) == 2
    assert storage.list_names("s3://t2i-test/x") == []



def test_ray_data_prepare_refuses_a_node_local_folder_on_a_multi_host_cluster(tmp_path, monkeypatch):
    """Ray Data tasks on other hosts could neither read a --src nor write an --out on this
    node's own disk: refused in one line before any task runs, nothing written."""
    import ray

    from t2i import storage
    from t2i.runtime import ray_env

    monkeypatch.setattr(ray_env, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray_env, "quiet_ray_data", lambda: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeManagerAddress": h, "Alive": True} for h in ("10.0.0.1", "10.0.0.2")])
    monkeypatch.setattr(storage, "mount_fs_type", lambda path: "ext4")
    src = flickr30k_original(tmp_path / "src")
    with pytest.raises(DatasetError, match="--out .* on this node's own disk .* 2 hosts"):
        prepare_flickr30k(src, tmp_path / "out", ImageSettings(size=16, on_ray=True))
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]
