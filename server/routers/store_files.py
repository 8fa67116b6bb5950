"""A store's files over HTTP, read-only, for remote readers.

`GET /v1/stores/{id}/zarr/{key}` serves the store with Range, ETag and If-None-Match, which
is all `logitstore.open_store("http://.../zarr", token=...)` needs: readers never list
directories, they fetch `zarr.json`, `index.json`, commit records and byte ranges of shard
files by key. The store lives in a local directory (read with `os.pread`, or streamed by
Starlette) or under an `s3://` storage root (read through the app's asynchronous fsspec
filesystem).

A remote reader sends a few small range requests per block it reads, so the cost of one
request is most of what it pays besides the bytes. `StoreFileFastPath` answers the common
request (a GET of one range of a local file, by a key whose access to the store was checked
moments ago) before FastAPI's routing, middleware and dependencies run; anything else,
errors included, goes on to the route, which is the one definition of every answer.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.routing import APIRoute
from fsspec.asyn import AsyncFileSystem
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import ASGIApp, Receive, Scope, Send

from server.db import Database
from server.deps import BearerDep, ReadAccessCache, ReadCacheDep, SettingsDep, authenticate, visible_store
from server.settings import Settings

router = APIRouter(prefix="/v1/stores", tags=["stores"])

_FILE_ROUTE = "/{store_id}/zarr/{key:path}"
_FILE_DOC = {
    "response_class": FileResponse,
    "responses": {206: {"description": "the requested byte range"}, 304: {"description": "not modified"}},
}
_OCTETS = "application/octet-stream"


@router.get(_FILE_ROUTE, name="store_file", summary="A file of the store, read-only (Range, ETag)", **_FILE_DOC)
@router.head(_FILE_ROUTE, operation_id="store_file_head", summary="Size and ETag of a store file", **_FILE_DOC)
async def store_file(
    store_id: str, key: str, request: Request, credentials: BearerDep, settings: SettingsDep, cache: ReadCacheDep
) -> Response:
    # Async, and no database session unless the access check is not cached.
    token = credentials.credentials if credentials is not None else ""
    if not cache.allows(token, store_id):
        await run_in_threadpool(_check_read_access, request.app.state.db, settings, credentials, store_id)
        cache.remember(token, store_id)
    _check_range_positions(request.headers.get("range"))
    if not settings.stores_local:
        _check_key(key)
        fs, root = request.app.state.remote_fs
        return await _remote_file(request, fs, f"{root.rstrip('/')}/{store_id}/{key}", store_id, key)
    path, st = _local_file(settings, store_id, key)
    etag = _etag(st)
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    answer = None
    if request.method == "GET" and request.headers.get("if-range") is None:
        answer = _one_read(request.headers.get("range"), st, etag)
    if answer is None:  # HEAD, multipart or If-Range requests, big bodies: Starlette streams them
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        return _FileResponse(path, stat_result=st, headers=headers, media_type=_OCTETS)
    start, length, status, headers = answer
    fd = os.open(path, os.O_RDONLY)
    try:
        data = await _read(fd, start, length)
    finally:
        os.close(fd)
    return Response(data, status_code=status, headers=headers, media_type=_OCTETS)


class _FileResponse(FileResponse):
    """Starlette's FileResponse, with its Range errors in the API's JSON shape: it answers a malformed or
    unsatisfiable Range in plain text itself. Raised before the response starts, the HTTPException reaches
    the app's exception handlers like one from the route."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as e:
            raise HTTPException(400, f"invalid Range header {http_range[:64]!r}: {e.content}") from None
        except RangeNotSatisfiable:
            raise HTTPException(416, f"range {http_range[:64]!r} is outside the {file_size} bytes",
                                {"Content-Range": f"bytes */{file_size}"}) from None


_GET_ROUTE = next(r for r in router.routes if isinstance(r, APIRoute) and r.name == "store_file")
_FAST_PATH = re.compile(r"^/v1/stores/([^/]+)/zarr/(.+)$")


class StoreFileFastPath:
    """Plain ASGI in front of the app: answers a store-file GET without FastAPI when

    - the store is local,
    - the bearer key's read access to the store is in the app's `ReadAccessCache` (the route
      put it there, so this never lets through what the route would refuse),
    - the request has no If-None-Match or If-Range, and asks for the whole file or one
      range (`_one_read`),
    - the key names a regular file inside the store.

    The answer is byte for byte the route's (tests compare them). Every other request, and
    every error, is the route's to answer. Measured on the 2-core VM: ~1.9 ms per request
    through FastAPI, most of it routing, middleware and dependency handling (docs/server.md).
    """

    def __init__(self, app: ASGIApp, settings: Settings, cache: ReadAccessCache) -> None:
        self.app, self.settings, self.cache = app, settings, cache
        # Where each key resolves to, and its store's real directory with a trailing separator (a
        # realpath of every component was an eighth of the server's time). The file that a remembered
        # path opens is checked to lie in that directory on every read (`_open`): a link swapped into
        # the store later cannot lead out of it.
        self._paths: dict[tuple[str, str], tuple[Path, str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self._answer(scope) if scope["type"] == "http" and scope["method"] == "GET" else None
        if answer is None:
            await self.app(scope, receive, send)
            return
        fd, start, length, status, headers = answer
        try:
            data = await _read(fd, start, length)
        finally:
            os.close(fd)
        scope["route"] = _GET_ROUTE  # the latency metric's label, as for the route
        headers += [(b"content-length", str(len(data)).encode()), (b"content-type", _OCTETS.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    def _answer(self, scope: Scope) -> tuple[int, int, int, int, list[tuple[bytes, bytes]]] | None:
        """(open file descriptor, start, length, status, headers) of a request this path answers, None
        for the route's."""
        if not self.settings.stores_local:
            return None
        m = _FAST_PATH.match(scope["path"])
        if m is None:
            return None
        store_id, key = m.groups()
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of repeated headers, as Starlette's
        if b"if-none-match" in headers or b"if-range" in headers:
            return None
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not self.cache.allows(token.strip(), store_id):
            return None
        rng = headers.get(b"range")
        rng = None if rng is None else rng.decode("latin-1")
        try:
            _check_range_positions(rng)
            fd = self._open(store_id, key)
        except (HTTPException, OSError):  # a refused key, nothing there: the route's answer
            return None
        if fd is None:
            return None
        try:  # the stat of the open file: the bytes read below are of this version
            st = os.fstat(fd)
            answer = _one_read(rng, st, _etag(st)) if stat.S_ISREG(st.st_mode) else None
        except HTTPException:
            answer = None
        if answer is None:
            os.close(fd)
            return None
        start, length, status, out = answer
        return fd, start, length, status, [(k.lower().encode(), v.encode()) for k, v in out.items()]

    def _open(self, store_id: str, key: str) -> int | None:
        """A read-only descriptor of the file `key` names, or None when that file lies outside the store
        (the route resolves the key again and refuses it). HTTPException for a key refused by its
        spelling, OSError when nothing can be opened there."""
        remembered = self._paths.get((store_id, key))
        if remembered is None:
            if len(self._paths) > 100_000:  # bounded: forget everything rather than grow
                self._paths.clear()
            store = self.settings.stores_dir / store_id
            remembered = self._paths[store_id, key] = (_resolve_key(store, key), f"{store.resolve()}{os.sep}")
        path, inside = remembered
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO put there cannot hang the loop
        if _real_path(fd, path).startswith(inside):
            return fd
        os.close(fd)
        del self._paths[store_id, key]
        return None


def _local_file(settings: Settings, store_id: str, key: str) -> tuple[Path, os.stat_result]:
    """The regular file for `key` in a local store and its stat; 400 for a key that could
    leave the store, 404 for one that names no file."""
    path = _resolve_key(settings.stores_dir / store_id, key)
    return path, _stat_file(path, store_id, key)


def _stat_file(path: Path, store_id: str, key: str) -> os.stat_result:
    """The stat of a regular file; 404 for anything else."""
    try:
        st = path.stat()
    except OSError:  # no such file, a file where a directory should be, a name too long, ...
        raise HTTPException(404, f"store {store_id!r} has no key {key!r}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HTTPException(404, f"store {store_id!r} has no key {key!r}")
    return st


def _etag(st: os.stat_result) -> str:
    # Store files are written once and replaced by rename, so inode + mtime + size name a version.
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


# Bodies up to this size are read in one go; larger ones stream.
_SMALL_READ = 8 << 20
# Reads up to this size happen in the event loop: from the page cache a 1 MB pread takes
# ~25 µs, less than the ~50-150 µs of a hop to the thread pool and back (measured on the
# 2-core VM). A cold read of that size from disk holds the loop for about a millisecond.
_INLINE_READ = 1 << 20
_SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_LONG_NUMBER = re.compile(r"\d{19}")


def _check_range_positions(range_header: str | None) -> None:
    """416 for a Range with a position of 19 digits or more: past the end of any file (and
    past what Starlette's own Range parsing accepts without an error)."""
    if range_header is not None and _LONG_NUMBER.search(range_header):
        raise HTTPException(416, f"range {range_header[:64]!r}... names a position past the end of any file")


def _one_read(range_header: str | None, st: os.stat_result, etag: str) -> tuple[int, int, int, dict[str, str]] | None:
    """(start, length, status, headers) of a GET of a local file answered with one body read,
    or None to leave it to FileResponse; 416 for a range that starts past the end."""
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    if range_header is None:
        return (0, st.st_size, 200, headers) if st.st_size <= _SMALL_READ else None
    span = _single_range(range_header, st.st_size)
    if span is None:
        return None  # several ranges, or malformed: FileResponse answers (multipart or 400)
    start, stop = span
    if stop - start > _SMALL_READ:
        return None
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{st.st_size}"
    return start, stop - start, 206, headers


def _single_range(value: str, size: int) -> tuple[int, int] | None:
    """(start, stop) of a single range `a-b`, `a-` or `-n` (RFC 9110), None for anything else;
    one that starts past the end is 416."""
    m = _SINGLE_RANGE.match(value.strip())
    if m is None or m.group(1) == m.group(2) == "":
        return None
    if m.group(1):
        start = int(m.group(1))
        stop = min(int(m.group(2)) + 1, size) if m.group(2) else size
        if m.group(2) and int(m.group(2)) < start:
            return None
    else:
        start, stop = max(size - int(m.group(2)), 0), size
    if start >= size or stop <= start:
        raise HTTPException(416, f"range {value!r} is outside the {size} bytes", {"Content-Range": f"bytes */{size}"})
    return start, stop


async def _read(fd: int, start: int, length: int) -> bytes:
    if length <= _INLINE_READ:
        return os.pread(fd, length, start)
    return await run_in_threadpool(os.pread, fd, length, start)


def _real_path(fd: int, path: Path) -> str:
    """Where the file open as `fd` really is: Linux names it in /proc; elsewhere `path` is resolved again."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


async def _remote_file(request: Request, fs: AsyncFileSystem, path: str, store_id: str, key: str) -> Response:
    """The object at `path` under an s3:// storage root, as the local branch answers for a file:
    ETag and If-None-Match (304), one byte range (206, 416 past the end), HEAD, 404 when missing.
    Several ranges, an unparsable Range or a stale If-Range get the whole object (RFC 9110 lets
    a server ignore Range); readers send single ranges only."""
    missing = HTTPException(404, f"store {store_id!r} has no key {key!r}")
    try:
        info = await fs._info(path)
    except FileNotFoundError:
        raise missing from None
    if info.get("type") != "file":
        raise missing
    size = int(info["size"])
    # Objects are only ever replaced whole, and S3's ETag names an object's content (other
    # backends: its modification time), so with the size it names a version.
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime")
    etag = '"' + hashlib.sha256(f"{version}-{size}".encode()).hexdigest()[:32] + '"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    headers, status, (start, stop) = {"ETag": etag, "Accept-Ranges": "bytes"}, 200, (0, size)
    value, if_range = request.headers.get("range"), request.headers.get("if-range")
    span = _single_range(value, size) if value is not None and if_range in (None, etag) else None
    if span is not None:
        (start, stop), status = span, 206
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers={**headers, "Content-Length": str(stop - start)},
                        media_type=_OCTETS)
    if stop - start > _SMALL_READ:
        return StreamingResponse(_remote_chunks(fs, path, start, stop), status_code=status,
                                 headers={**headers, "Content-Length": str(stop - start)}, media_type=_OCTETS)
    try:
        data = await fs._cat_file(path, start=start, end=stop) if stop > start else b""
    except FileNotFoundError:  # deleted since the _info above
        raise missing from None
    return Response(data, status_code=status, headers=headers, media_type=_OCTETS)


async def _remote_chunks(fs: AsyncFileSystem, path: str, start: int, stop: int) -> AsyncIterator[bytes]:
    """A large object body in `_SMALL_READ` pieces: memory per request stays bounded."""
    for a in range(start, stop, _SMALL_READ):
        yield await fs._cat_file(path, start=a, end=min(a + _SMALL_READ, stop))


def _check_read_access(db: Database, settings: Settings, credentials, store_id: str) -> None:
    with db.sessions() as session:
        visible_store(session, authenticate(session, settings, credentials), store_id)


def _check_key(key: str) -> None:
    """400 for any key that could leave the store.

    The server has already percent-decoded the path once, so `%2e%2e` arrives as `..`; a key
    that still holds `%` was encoded twice, which no store key is."""
    parts = key.split("/")
    bad = (
        not key
        or key.startswith("/")
        or any(c in key for c in ("\\", "\x00", "%", ":"))
        or any(p in ("", ".", "..") for p in parts)
    )
    if bad:
        raise HTTPException(400, f"invalid store key {key!r}: use a relative key such as zarr.json")


def _resolve_key(store: Path, key: str) -> Path:
    """The file for `key` inside the store directory; 400 for any key that could leave it,
    by its spelling or (symlinks included) by where it resolves to."""
    _check_key(key)
    root = store.resolve()
    path = (root / os.path.join(*key.split("/"))).resolve()
    if not path.is_relative_to(root):
        raise HTTPException(400, f"invalid store key {key!r}: it points outside the store")
    return path
