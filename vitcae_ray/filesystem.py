"""Paths on the local disk or any pyarrow filesystem URI (``s3://bucket/key``, ``gs://``,
``hdfs://``, ``file://``): the one place a path becomes a ``pyarrow.fs`` filesystem.

A URI may carry a query (``s3://b/run?endpoint_override=127.0.0.1:9000``); :func:`join` keeps
it at the end, so every path under a URI reaches the same endpoint. Local paths are taken
from the current directory and ``~`` is expanded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from .errors import first_line

FileType = pafs.FileType


class FileSystemError(ValueError):
    """A URI that names no filesystem pyarrow can open; the message is one line."""


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """An absolute local path, or the URI unchanged (what Ray's ``storage_path`` expects)."""
    path = os.fspath(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI, the URI's query kept at the end."""
    base, sep, query = os.fspath(root).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def resolve(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)``; raises :class:`FileSystemError` for a bad URI."""
    path = os.fspath(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path).replace(os.sep, "/")
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except (ValueError, OSError, NotImplementedError) as e:  # ArrowInvalid, ArrowIOError,
        # ArrowNotImplementedError (a scheme this pyarrow was built without, e.g. gs://)
        raise FileSystemError(f"cannot open {path!r}: {first_line(e)}") from None
    return fs, inner.rstrip("/") or inner


def kind(path: str) -> pafs.FileType:
    """``FileType.File``, ``Directory`` or ``NotFound``."""
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type


def exists(path: str) -> bool:
    return kind(path) != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes | None:
    """The file's bytes; None if it is not a file."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read()


def read_text(path: str) -> str | None:
    data = read_bytes(path)
    return None if data is None else data.decode()


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file: locally atomically (:func:`atomic_write`), on an object store in
    one upload (an object appears only when complete)."""
    if not is_uri(path):
        atomic_write(Path(absolute(path)), lambda tmp: tmp.write_bytes(data))
        return
    fs, inner = resolve(path)
    with fs.open_output_stream(inner) as f:
        f.write(data)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes a sibling temporary file, which then replaces ``path``: an
    interrupted write never leaves ``path`` truncated. The temporary name keeps the suffix,
    so writers that pick a format by it (PIL, pyarrow) still do."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def list_dirs(path: str, prefix: str = "") -> list[str]:
    """Names of the sub-directories of ``path`` that start with ``prefix``, sorted."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)
    )


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def delete_dir(path: str) -> None:
    fs, inner = resolve(path)
    fs.delete_dir(inner)


def move(src: str, dest: str) -> None:
    """Rename within one filesystem (atomic on a local disk)."""
    fs, a = resolve(src)
    _, b = resolve(dest)
    fs.move(a, b)


def upload_dir(local_dir: str | os.PathLike, dest: str) -> None:
    """Copy the local directory's files to ``dest`` (a local path or a URI)."""
    fs, inner = resolve(dest)
    pafs.copy_files(
        os.fspath(local_dir), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )
