"""Where data and runs live: a local folder or a filesystem URI, behind one small interface.

A *location* is a local path (``runs``, ``/shared/f8k``) or a URI that pyarrow understands
(``s3://bucket/runs``, ``gs://bucket/f8k``, ``abfs://...``, ``hdfs://...``, ``file:///abs/path``).
Ray reads the Parquet shards and writes checkpoints through ``pyarrow.fs`` itself; t2i's own
reads and writes (manifest, vocabulary, checkpoints, sample grids, metrics) go through the
functions here, so one location string works on a laptop and on a cluster. Credentials
come from the environment, as for any pyarrow client (e.g. ``AWS_*`` variables, an
instance role, ``GOOGLE_APPLICATION_CREDENTIALS``; ``AWS_ENDPOINT_URL`` for S3-compatible
stores).

On a cluster whose nodes sit on several hosts, every node must see the same files, so
:func:`node_local_problem` refuses a path on one node's own disk (see its docstring).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs

# Filesystem types (as in /proc/mounts) that every host of a cluster can mount.
SHARED_FS_TYPES = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
                   "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.sshfs",
                   "fuse.glusterfs", "fuse.cephfs", "9p", "virtiofs", "wekafs", "fuse.rclone"}


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def is_node_local(location: str | Path) -> bool:
    """A plain path or ``file://`` URI: only as shared as the disk under it."""
    return not is_uri(location) or str(location).startswith("file://")


def absolute(location: str | Path) -> str:
    """Local paths resolved (trials and workers run in other working directories); URIs as given."""
    if is_uri(location):
        return str(location).rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    if not is_uri(location):
        return str(Path(location, *parts))
    base, sep, query = str(location).partition("?")  # s3://b/p?endpoint_override=... keeps its options
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def parent(location: str | Path) -> str:
    """The folder holding ``location`` (a URI keeps its ?options)."""
    if not is_uri(location):
        return str(Path(location).parent)
    base, sep, query = str(location).partition("?")
    return base.rstrip("/").rsplit("/", 1)[0] + sep + query


def name(location: str | Path) -> str:
    return str(location).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def _resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def filesystem_and_paths(locations: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem and its own paths for several locations on it (pyarrow readers
    take a list of plain paths plus a filesystem, not a list of URIs)."""
    fs, _ = _resolve(locations[0])
    return fs, [_resolve(location)[1] for location in locations]


def _info(location: str | Path) -> pafs.FileInfo:
    fs, path = _resolve(location)
    return fs.get_file_info(path)


def is_file(location: str | Path) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    return _info(location).type == pafs.FileType.Directory


def size(location: str | Path) -> int | None:
    info = _info(location)
    return info.size if info.type == pafs.FileType.File else None


def list_names(location: str | Path) -> list[str]:
    """Names of the direct children of a folder (sorted); [] when it does not exist."""
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def list_files(location: str | Path) -> list[str]:
    """Paths of every file under a folder (or prefix), relative to it, sorted."""
    fs, path = _resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[len(path.rstrip("/")) + 1:] for i in infos if i.type == pafs.FileType.File)


def read_bytes(location: str | Path) -> bytes:
    fs, path = _resolve(location)
    with fs.open_input_stream(path) as handle:
        return handle.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def sha256(location: str | Path) -> str:
    fs, path = _resolve(location)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(location: str | Path, data: bytes) -> str:
    """Write a whole file, creating folders. Never leaves a half-written file: a local file
    is written beside and renamed; an object store only shows an object once it is complete."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return str(path)
    fs, path = _resolve(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as handle:
        handle.write(data)
    return str(location)


def write_text(location: str | Path, text: str) -> str:
    return write_bytes(location, text.encode("utf-8"))


def upload(local_file: str | Path, location: str | Path) -> str:
    return write_bytes(location, Path(local_file).read_bytes())


def copy_dir(local_dir: str | Path, location: str | Path) -> str:
    if not is_uri(location):
        shutil.copytree(local_dir, location, dirs_exist_ok=True)
        return str(location)
    fs, path = _resolve(location)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return str(location)


def write_csv(location: str | Path, rows: list[dict]) -> str:
    """A table with a header; columns are every key of the rows, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(location, text.getvalue())


# ----------------------------------------------------------------------------- reading a download
class UriPath:
    """The part of :class:`pathlib.Path` that the data readers use (``/``, ``name``,
    ``suffix``, ``is_file``, ``is_dir``, ``exists``, ``iterdir``, ``read_bytes``,
    ``read_text``), for a URI: ``prepare --src s3://bucket/flickr30k`` reads a download in
    an object store the way it reads a folder. A listing remembers each child's type, so
    checking the files of a 100,000-image folder costs one listing, not one request each."""

    def __init__(self, uri: str, kind: pafs.FileType | None = None):
        self.uri, self._kind = uri.rstrip("/"), kind

    def __truediv__(self, part: str) -> UriPath:
        return UriPath(join(self.uri, part))

    def __str__(self) -> str:
        return self.uri

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UriPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def name(self) -> str:
        return name(self.uri)

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def _type(self) -> pafs.FileType:
        if self._kind is None:
            self._kind = _info(self.uri).type
        return self._kind

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def iterdir(self):
        fs, path = _resolve(self.uri)
        for info in sorted(fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.base_name):
            yield UriPath(join(self.uri, info.base_name), info.type)

    def read_bytes(self) -> bytes:
        return read_bytes(self.uri)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


def as_path(location: str | Path) -> Path | UriPath:
    """A local path as a Path, a URI as a :class:`UriPath` (for the data readers)."""
    if isinstance(location, UriPath):
        return location
    if is_node_local(location):
        return Path(str(location).removeprefix("file://"))
    return UriPath(str(location))


def delete(location: str | Path) -> None:
    """Remove a file or a whole folder (prefix); nothing when it is not there."""
    fs, path = _resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def copy_within(source: str, destination: str) -> None:
    """Copy one file to another place of the same store (an object store copies server-side)."""
    fs, src_path = _resolve(source)
    _, dest_path = _resolve(destination)
    fs.create_dir(dest_path.rsplit("/", 1)[0], recursive=True)
    fs.copy_file(src_path, dest_path)


# ----------------------------------------------------------------------------- multi-node check
def mount_fs_type(path: str | Path, mounts_text: str | None = None) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix in /proc/mounts)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown"
    path = str(path)
    best, fs_type = "", "unknown"
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fs_type = mount_point, fields[2]
    return fs_type


def node_local_problem(location: str, what: str, hosts: set[str], fs_type: str) -> str | None:
    """Why ``location`` cannot serve a cluster spread over ``hosts``, or None when it can.

    Object-store URIs always can. A local path can when all Ray nodes share one host (they
    share its disk: ``cluster/local.py``) or when it lies on a network filesystem (NFS,
    CephFS, Lustre, gcsfuse, ...). Otherwise each host would write its own, divergent copy:
    checkpoints written by one node could never be resumed by another.
    """
    if not is_node_local(location) or len(hosts) <= 1 or fs_type in SHARED_FS_TYPES:
        return None
    return (f"{what} {location!r} is on this node's own disk ({fs_type}), but the Ray cluster has nodes on "
            f"{len(hosts)} hosts ({', '.join(sorted(hosts))}); workers elsewhere could not read or write it. "
            f"Use a URI (s3://bucket/path, gs://bucket/path) or a folder on a filesystem every node mounts "
            f"(NFS, CephFS, ...).")


def shared_storage_problem(locations: dict[str, str], hosts: set[str]) -> str | None:
    """The first of ``locations`` ({what: location}) that a cluster spread over ``hosts``
    cannot share (:func:`node_local_problem`), or None."""
    for what, location in locations.items():
        problem = node_local_problem(location, what, hosts, mount_fs_type(location.removeprefix("file://")))
        if problem:
            return problem
    return None
