"""Where a store lives: a local directory or any fsspec URL (http(s)://, s3://, ...).

Everything else in logitstore speaks Zarr's `Store` interface, so the same reader works
on a disk, behind the server's HTTP endpoint, and in S3. The two things Zarr does not
give us are here: durable writes (fsync) and an atomic create-only put of a small file,
which is what makes a segment commit crash-safe.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore


def is_local(url: str | os.PathLike) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    s = str(url)
    return Path(s.removeprefix("file://")).expanduser()


def open_kv(url: str | os.PathLike, *, read_only: bool, storage_options: dict[str, Any] | None = None) -> Store:
    """A Zarr store over a local path or an fsspec URL."""
    if is_local(url):
        return LocalStore(local_path(url), read_only=read_only)
    return FsspecStore.from_url(str(url), storage_options=storage_options, read_only=read_only)


def read_key(store: Store, key: str) -> bytes | None:
    """The bytes at `key`, or None when there is no such key."""
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def key_exists(store: Store, key: str) -> bool:
    return sync(store.exists(key))


def write_key(store: Store, key: str, data: bytes) -> None:
    """Write (or replace) `key`. Local writes go to a temporary file, fsync'd, then renamed."""
    if isinstance(store, LocalStore):
        path = Path(store.root) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        _write_synced(tmp, data)
        os.replace(tmp, path)
        fsync_path(path.parent)
        return
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def create_key(store: Store, key: str, data: bytes) -> bool:
    """Create `key` with `data` atomically, only if it does not exist. Returns False if it did.

    Local: the content is written and fsync'd under a temporary name, then hard-linked to
    the final name (`link` fails if the name exists), so a reader sees either nothing or
    the whole record, and two writers can never both succeed. Object stores: the
    backend's conditional put (`If-None-Match: *` on S3) through Zarr's set_if_not_exists.
    """
    if isinstance(store, LocalStore):
        path = Path(store.root) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        _write_synced(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        fsync_path(path.parent)
        return True
    if key_exists(store, key):
        return False
    sync(store.set_if_not_exists(key, default_buffer_prototype().buffer.from_bytes(data)))
    return True


def fsync_tree(store: Store, prefix: str) -> None:
    """Flush every file under `prefix` to disk (local stores; object stores are durable on put)."""
    if not isinstance(store, LocalStore):
        return
    root = Path(store.root) / prefix
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_path(Path(dirpath))


def delete_key(store: Store, key: str) -> None:
    """Remove one key (no error if it is absent)."""
    sync(store.delete(key))


def delete_prefix(store: Store, prefix: str) -> None:
    """Remove every key under `prefix` (garbage collection of an uncommitted segment)."""
    sync(store.delete_dir(prefix))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_dir(store: Store, prefix: str) -> list[str]:
    """Names directly under `prefix` (writers only: readers never list, HTTP cannot)."""

    async def collect() -> list[str]:
        return [name async for name in store.list_dir(prefix)]

    return sync(collect())
