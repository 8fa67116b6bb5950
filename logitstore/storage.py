"""Where a store lives: a local directory or any fsspec URL (http(s)://, s3://, ...).

Everything else in logitstore speaks Zarr's `Store` interface, so the same reader works
on a disk, behind the server's HTTP endpoint, and in S3. The two things Zarr does not
give us are here: durable writes (fsync) and an atomic create-only put of a small file,
which is what makes a segment commit crash-safe. So is everything else that must know
whether a store is a directory or a URL: joining a root and a name, deleting or sizing a
whole store, and the asynchronous filesystem the server reads `s3://` stores through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from logitstore.errors import LogitStoreError


def is_local(url: str | os.PathLike) -> bool:
    return "://" not in str(url) or str(url).startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    s = str(url)
    return Path(s.removeprefix("file://")).expanduser()


def join(root: str | os.PathLike, name: str) -> str:
    """`root/name` for a local directory (as a path) or a URL such as `s3://bucket/prefix`."""
    if is_local(root):
        return str(local_path(root) / name)
    return f"{str(root).rstrip('/')}/{name}"


def with_token(url: str | os.PathLike, token: str | None, storage_options: dict[str, Any] | None
               ) -> dict[str, Any] | None:
    """fsspec options that send `token`, an API key of the logitstore server, with every request
    as `Authorization: Bearer TOKEN` (the server's `http(s)://HOST/v1/stores/ID/zarr`)."""
    if token is None:
        return storage_options
    if not str(url).startswith(("http://", "https://")):
        raise LogitStoreError(f"a token (--token, token=) is the API key of a store served over http(s):// by "
                              f"logitstore-server; {url} is not one: drop the token")
    options = dict(storage_options or {})
    options["headers"] = {**options.get("headers", {}), "Authorization": f"Bearer {token}"}
    return options


def open_kv(url: str | os.PathLike, *, read_only: bool, storage_options: dict[str, Any] | None = None) -> Store:
    """A Zarr store over a local path or an fsspec URL."""
    if is_local(url):
        return LocalStore(local_path(url), read_only=read_only)
    options = dict(storage_options or {})
    if not read_only:
        # A writer's listings must see other processes' writes: garbage collection after a
        # killed writer lists `segments/`, and s3fs would otherwise answer from its listing
        # cache, which lives as long as the (process-wide, shared) filesystem instance.
        options.setdefault("use_listings_cache", False)
    return FsspecStore.from_url(str(url), storage_options=options, read_only=read_only)


def remove_tree(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a whole store (every key under `url`); nothing to delete is not an error."""
    if is_local(url):
        shutil.rmtree(local_path(url), ignore_errors=True)
        return
    fs, path = _filesystem(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def tree_bytes(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> int | None:
    """Total size of the files under `url`, or None where it cannot be listed (http(s)://)."""
    if is_local(url):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(local_path(url)) for f in files)
    if str(url).startswith(("http://", "https://")):
        return None
    fs, path = _filesystem(url, storage_options)
    return int(fs.du(path, total=True))


def _filesystem(url: str | os.PathLike, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    # Listings straight from the backend: another process may have written since the last one.
    return fsspec.url_to_fs(str(url), **{"use_listings_cache": False, **(storage_options or {})})


def async_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AsyncFileSystem, str]:
    """A fresh asynchronous fsspec filesystem for `url` and the path of `url` on it, for use
    inside the running event loop (the server's reads). Fresh (not fsspec's process-wide
    cached instance), because an async instance is bound to the loop it first runs in."""
    options = {"asynchronous": True, "skip_instance_cache": True, "use_listings_cache": False}
    fs, path = fsspec.url_to_fs(url, **{**options, **(storage_options or {})})
    if not fs.async_impl:
        raise ValueError(f"{url}: fsspec has no asynchronous filesystem for this protocol")
    return fs, path


async def close_filesystem(fs: AsyncFileSystem) -> None:
    """Close the HTTP session of a filesystem from `async_filesystem` (fsspec has no public call
    for it: s3fs keeps its aiobotocore client in `_s3`, HTTP its aiohttp session in `_session`)."""
    for attr in ("_s3", "_session"):
        client = getattr(fs, attr, None)
        if client is not None and hasattr(client, "close"):
            await client.close()


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
    the whole record, and two writers can never both succeed. Object stores: one conditional
    put through fsspec's `mode="create"` (`If-None-Match: *` on S3); Zarr's set_if_not_exists
    is an exists-then-put there, which two writers can both pass.
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
    if isinstance(store, FsspecStore):
        try:
            sync(store.fs._pipe_file(f"{store.path.rstrip('/')}/{key}", data, mode="create"))
        except FileExistsError:
            return False
        return True
    if key_exists(store, key):  # other stores (memory): no concurrent writers to race with
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
