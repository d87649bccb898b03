"""Models on shared storage (s3://, gs://): written once, pulled into a node-local cache where loaded.

On a cluster `models_dir` lives on the run's shared root. `resolve_model` converts or builds a model
once, on the driver, and `publish`es the folder there: its files first, then `_files.json`, the
manifest (name -> size and SHA-256) whose presence says the folder is complete. Whatever loads a
model (a sampling actor, a Train worker, a Serve replica) calls `local_model`, which returns a local
path unchanged and, for a URI, the node-local copy under `$RECALIGN_MODEL_CACHE` (default
~/.cache/recalign/models): downloaded once per node, every file checked against the manifest's size
and hash, moved into place only when complete, and reused while it still matches the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from recalign import io
from recalign.errors import MissingInputError, StorageError

MANIFEST = "_files.json"
CACHE_ENV = "RECALIGN_MODEL_CACHE"


def is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def manifest_of(local_dir: str | Path) -> dict[str, Any]:
    """{"files": {relative name: {"size", "sha256"}}} of every file under a local folder."""
    root = Path(local_dir)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(root).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return {"files": files}


def publish(local_dir: str | Path, uri: str) -> str:
    """Upload a local model folder to `uri`, the manifest last (a folder without it is incomplete)."""
    import pyarrow.fs as pafs

    manifest = manifest_of(local_dir)
    if io.exists(io.join(uri, MANIFEST)):
        io.delete(io.join(uri, MANIFEST))  # replaced: incomplete until the new manifest lands
    fs, path = io.resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    io.write_json(manifest, io.join(uri, MANIFEST))
    return uri


def published(uri: str) -> dict[str, Any] | None:
    """The manifest of a complete model folder at `uri`, else None."""
    return io.read_json(io.join(uri, MANIFEST)) if io.exists(io.join(uri, MANIFEST)) else None


def fingerprint(path: str) -> str:
    """A stable hash of a model folder, local or remote: its files' names and sizes (cache keys)."""
    if is_remote(path):
        manifest = published(path)
        if manifest is None:
            raise MissingInputError(f"{path}: no model there ({MANIFEST} missing); the first run converts it")
        listing = sorted((name, meta["size"]) for name, meta in manifest["files"].items())
        config = io.read_bytes(io.join(path, "config.json"))
    else:
        root = Path(path)
        listing = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*")
                         if p.is_file() and p.name != MANIFEST and "/" not in p.relative_to(root).as_posix())
        config = (root / "config.json").read_bytes()
    return hashlib.sha256(config + repr(listing).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "recalign" / "models")


def local_model(path: str | Path) -> str:
    """A local folder holding the model at `path`: the path itself when local, else this node's cached copy."""
    path = str(path)
    if not is_remote(path):
        return path
    manifest = published(path)
    if manifest is None:
        raise MissingInputError(f"{path}: no complete model there ({MANIFEST} missing); the run that converts it "
                                "writes it there first")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    target = cache_root() / f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    if _matches(target, manifest):
        return str(target)
    with _lock(target.with_name(target.name + ".lock")):
        if not _matches(target, manifest):  # another process on this node may have fetched it meanwhile
            _download(path, target, manifest)
    return str(target)


def _matches(local: Path, manifest: dict[str, Any]) -> bool:
    """The cached copy is complete and its manifest is the remote one (sizes checked; hashes were checked when
    it was downloaded, and a copy whose manifest differs is fetched again)."""
    mine = local / MANIFEST
    if not mine.is_file() or io.read_json(str(mine)) != manifest:
        return False
    return all((local / name).is_file() and (local / name).stat().st_size == meta["size"]
               for name, meta in manifest["files"].items())


def _download(uri: str, target: Path, manifest: dict[str, Any]) -> None:
    import pyarrow.fs as pafs

    fs, path = io.resolve(uri)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
    try:
        tmp.mkdir(parents=True)
        for name, meta in manifest["files"].items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{path}/{name}", str(dest), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            size, digest = dest.stat().st_size, sha256_file(dest)
            if size != meta["size"] or digest != meta["sha256"]:
                raise StorageError(f"{uri}/{name}: downloaded {size} bytes with SHA-256 {digest[:12]}, the manifest "
                                   f"says {meta['size']} bytes, {meta['sha256'][:12]}; the copy there is damaged or "
                                   "being replaced: rerun the job that converts the model")
        io.write_json(manifest, str(tmp / MANIFEST))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One downloader per node: the actors and workers of one node share the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
