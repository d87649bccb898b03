"""Run-directory storage on any pyarrow filesystem (local paths, s3://, gs://).

Every write goes to a temporary sibling first and is then moved into place, so a crash never
leaves a half-written table, JSON or directory behind for a later stage to trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recalign.errors import MissingInputError, StorageError, first_line


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a filesystem URI."""
    uri = str(uri)
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
            raise StorageError(f"{uri}: cannot open this storage URI ({first_line(err)}); use a local path or "
                               "a pyarrow filesystem URI such as s3://bucket/runs, with its credentials set") from err
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str | Path, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | Path) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def _tmp_sibling(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.tmp-{uuid.uuid4().hex[:8]}-{tail}"


def _replace(fs: pafs.FileSystem, tmp: str, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        if os.path.isdir(path) and os.path.isdir(tmp):
            delete(path)
        os.replace(tmp, path)
    else:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
        fs.move(tmp, path)


def write_parquet(table: pa.Table, uri: str | Path) -> None:
    """Atomically write one Parquet file."""
    fs, path = resolve(uri)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    tmp = _tmp_sibling(path)
    try:
        pq.write_table(table, tmp, filesystem=fs)
        _replace(fs, tmp, path)
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def replace_dir(local_dir: str | Path, uri: str | Path) -> None:
    """Put a local folder's files at `uri`, replacing what is there. Locally: a full sibling, then a rename.
    Object stores (s3://, gs://) cannot rename a folder, so there the files are uploaded in place after the old
    folder is deleted; what makes the folder trusted is the stage marker its stage writes after this returns."""
    fs, path = resolve(uri)
    parent = path.rstrip("/").rpartition("/")[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _tmp_sibling(path)
        shutil.copytree(local_dir, tmp)
        _replace(fs, tmp, path)
        return
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def read_parquet(uri: str | Path, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise MissingInputError(f"{uri}: no such table; has the stage that writes it run?")
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except pa.ArrowInvalid as err:
        raise StorageError(f"{uri}: not a readable Parquet table ({first_line(err)}); delete it and rerun the "
                           "stage that writes it") from err


def write_bytes(data: bytes, uri: str | Path) -> None:
    """Atomically write a file."""
    fs, path = resolve(uri)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    tmp = _tmp_sibling(path)
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    _replace(fs, tmp, path)


def read_bytes(uri: str | Path) -> bytes:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise MissingInputError(f"{uri}: no such file; has the stage that writes it run?")
    with fs.open_input_stream(path) as inp:
        return inp.read()


def write_text(text: str, uri: str | Path) -> None:
    """Atomically write a text file."""
    write_bytes(text.encode(), uri)


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode()


def write_json(obj: Any, uri: str | Path) -> None:
    write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n", uri)


def read_json(uri: str | Path) -> Any:
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as err:
        raise StorageError(f"{uri}: not valid JSON (line {err.lineno}: {err.msg}); delete it and rerun the stage "
                           "that writes it") from err


def delete(uri: str | Path) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def local_path(uri: str | Path) -> Path:
    """The local path of a URI, or an error for remote filesystems (for libraries that need a path)."""
    fs, path = resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        raise ValueError(f"{uri}: this step needs a local path; stage the files locally first")
    return Path(path)


def is_local(uri: str | Path) -> bool:
    return isinstance(resolve(uri)[0], pafs.LocalFileSystem)


@contextlib.contextmanager
def local_copy(uri: str | Path) -> Iterator[str]:
    """A local path holding the directory `uri`: the path itself when it is local, else a temporary
    copy (removed on exit). For libraries that only read local folders (PEFT, transformers)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise MissingInputError(f"{uri}: no such directory")
    with tempfile.TemporaryDirectory(prefix="recalign-stage-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
