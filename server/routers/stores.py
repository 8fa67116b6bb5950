"""The store catalog, sharing, and the store's files over HTTP for remote readers.

`GET /v1/stores/{id}/zarr/{key}` serves the store read-only with Range, ETag and
If-None-Match, which is all `logitstore.open_store("http://.../zarr", token=...)` needs:
readers never list directories, they fetch `zarr.json`, `index.json`, commit records and
byte ranges of shard files by key. The store lives in a local directory (read with
`os.pread`, or streamed by Starlette) or under an `s3://` storage root (read through the
app's asynchronous fsspec filesystem).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from fsspec.asyn import AsyncFileSystem
from pydantic import BaseModel, Field
from sqlalchemy import select

from logitstore import storage
from logitstore.cli import describe
from server.db import Database, Grant, Job, StoreRow, Team
from server.deps import (
    BearerDep,
    PrincipalDep,
    ReadCacheDep,
    SessionDep,
    SettingsDep,
    authenticate,
    find_team,
    owned_store,
    visible_store,
)
from server.routers.captures import JobOut, iso, job_out
from server.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/stores", tags=["stores"])


class StoreSummary(BaseModel):
    id: str
    owner: str
    created_at: str
    job: JobOut | None


class StoreDetail(StoreSummary):
    zarr_url: str = Field(description="pass to logitstore.open_store(url, token=KEY)")
    shared_with: list[str] | None = Field(description="teams granted read access (owner and admin only)")
    info: dict | None = Field(description="what `logitstore info --json` prints; null before the capture starts")


class GrantIn(BaseModel):
    team: str = Field(min_length=1, max_length=64, description="name of the team to share with")


def store_dir(settings: Settings, store_id: str) -> Path:
    """The store's directory under a local storage root."""
    return settings.stores_dir / store_id


@router.get("", response_model=list[StoreSummary], summary="Stores you own and stores shared with you")
def list_stores(principal: PrincipalDep, session: SessionDep) -> list[StoreSummary]:
    query = select(StoreRow).order_by(StoreRow.created_at)
    if not principal.is_admin:
        shared = select(Grant.store_id).where(Grant.team_id == principal.team_id)
        query = query.where((StoreRow.team_id == principal.team_id) | StoreRow.id.in_(shared))
    return [_summary(session, s) for s in session.scalars(query)]


@router.get("/{store_id}", response_model=StoreDetail, summary="A store's metadata (as `logitstore info --json`)")
def get_store(
    store_id: str, request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> StoreDetail:
    store = visible_store(session, principal, store_id)
    summary = _summary(session, store)
    shared = None
    if principal.is_admin or store.team_id == principal.team_id:
        shared = _grantees(session, store.id)
    session.commit()  # describe() reads the store's files: do not hold the database meanwhile
    url, options = settings.store_url(store.id), settings.storage_options
    info = None
    if storage.key_exists(storage.open_kv(url, read_only=True, storage_options=options), "zarr.json"):
        info = describe(url, options)
        info.pop("url", None)  # a path on the server's disk (or its bucket) means nothing to the caller
    return StoreDetail(
        **summary.model_dump(), zarr_url=str(request.url_for("store_file", store_id=store.id, key="")).rstrip("/"),
        shared_with=shared, info=info,
    )


@router.delete("/{store_id}", status_code=204, summary="Delete a store, its files and its job (owner)")
def delete_store(
    store_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep, cache: ReadCacheDep
) -> None:
    store = owned_store(session, principal, store_id)
    job = session.scalar(select(Job).where(Job.store_id == store.id))
    if job is not None and job.state in ("queued", "running"):
        raise HTTPException(409, f"store {store_id!r} is being captured (job {job.id}, {job.state}); cancel it first")
    session.delete(store)
    if job is not None:
        session.delete(job)
    session.commit()
    cache.clear()
    url = settings.store_url(store_id)
    try:
        storage.remove_tree(url, settings.storage_options)
    except Exception:  # the store is gone for every reader already; its files are the operator's to remove
        log.exception("store %s deleted, but removing its files at %s failed; remove them by hand", store_id, url)


@router.post("/{store_id}/grants", status_code=201, response_model=list[str], summary="Share read access (owner)")
def add_grant(store_id: str, body: GrantIn, principal: PrincipalDep, session: SessionDep) -> list[str]:
    store = owned_store(session, principal, store_id)
    team = find_team(session, body.team)
    if team.id != store.team_id and session.get(Grant, (store.id, team.id)) is None:
        session.add(Grant(store_id=store.id, team_id=team.id))
        session.flush()
    return _grantees(session, store.id)


@router.delete("/{store_id}/grants/{team}", status_code=204, summary="Revoke a team's read access (owner)")
def delete_grant(store_id: str, team: str, principal: PrincipalDep, session: SessionDep, cache: ReadCacheDep) -> None:
    store = owned_store(session, principal, store_id)
    grant = session.get(Grant, (store.id, find_team(session, team).id))
    if grant is None:
        raise HTTPException(404, f"store {store_id!r} is not shared with {team!r}")
    session.delete(grant)
    session.commit()
    cache.clear()


_FILE_ROUTE = "/{store_id}/zarr/{key:path}"
_FILE_DOC = {
    "response_class": FileResponse,
    "responses": {206: {"description": "the requested byte range"}, 304: {"description": "not modified"}},
}


@router.get(_FILE_ROUTE, name="store_file", summary="A file of the store, read-only (Range, ETag)", **_FILE_DOC)
@router.head(_FILE_ROUTE, operation_id="store_file_head", summary="Size and ETag of a store file", **_FILE_DOC)
async def store_file(
    store_id: str, key: str, request: Request, credentials: BearerDep, settings: SettingsDep, cache: ReadCacheDep
) -> Response:
    # Async, and no database session unless the access check is not cached: a remote reader
    # sends many small range requests, and this is their whole cost besides the bytes.
    token = credentials.credentials if credentials is not None else ""
    if not cache.allows(token, store_id):
        await run_in_threadpool(_check_read_access, request.app.state.db, settings, credentials, store_id)
        cache.remember(token, store_id)
    if not settings.stores_local:
        _check_key(key)
        fs, root = request.app.state.remote_fs
        return await _remote_file(request, fs, f"{root.rstrip('/')}/{store_id}/{key}", store_id, key)
    root = store_dir(settings, store_id).resolve()
    path = _resolve_key(root, key)
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise HTTPException(404, f"store {store_id!r} has no key {key!r}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HTTPException(404, f"store {store_id!r} has no key {key!r}")
    # Store files are written once and replaced by rename, so inode + mtime + size name a version.
    etag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    span = _small_read(request, st.st_size)
    if span is None:  # HEAD, multipart or If-Range requests, big bodies: Starlette streams them
        return FileResponse(path, stat_result=st, headers=headers, media_type="application/octet-stream")
    start, length = span
    # One thread hop for the whole read (FileResponse takes one each for open, seek, read, close):
    # readers send many small range requests, so this is most of their per-request cost.
    data = await run_in_threadpool(_pread, path, start, length)
    if request.headers.get("range") is None:
        return Response(data, headers=headers, media_type="application/octet-stream")
    headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{st.st_size}"
    return Response(data, status_code=206, headers=headers, media_type="application/octet-stream")


# Bodies up to this size are read in one go; larger ones stream.
_SMALL_READ = 8 << 20
_SINGLE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _small_read(request: Request, size: int) -> tuple[int, int] | None:
    """(start, length) of a GET this route answers itself, or None to leave it to FileResponse."""
    value = request.headers.get("range")
    if request.method != "GET" or request.headers.get("if-range") is not None:
        return None
    if value is None:
        return (0, size) if size <= _SMALL_READ else None
    span = _single_range(value, size)
    if span is None:
        return None  # several ranges, or malformed: FileResponse answers (multipart or 400)
    start, stop = span
    return (start, stop - start) if stop - start <= _SMALL_READ else None


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
    media = "application/octet-stream"
    if request.method == "HEAD":
        return Response(status_code=status, headers={**headers, "Content-Length": str(stop - start)}, media_type=media)
    if stop - start > _SMALL_READ:
        return StreamingResponse(_remote_chunks(fs, path, start, stop), status_code=status,
                                 headers={**headers, "Content-Length": str(stop - start)}, media_type=media)
    try:
        data = await fs._cat_file(path, start=start, end=stop) if stop > start else b""
    except FileNotFoundError:  # deleted since the _info above
        raise missing from None
    return Response(data, status_code=status, headers=headers, media_type=media)


async def _remote_chunks(fs: AsyncFileSystem, path: str, start: int, stop: int) -> AsyncIterator[bytes]:
    """A large object body in `_SMALL_READ` pieces: memory per request stays bounded."""
    for a in range(start, stop, _SMALL_READ):
        yield await fs._cat_file(path, start=a, end=min(a + _SMALL_READ, stop))


def _pread(path: Path, start: int, length: int) -> bytes:
    with path.open("rb", buffering=0) as f:
        return os.pread(f.fileno(), length, start)


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


def _resolve_key(root: Path, key: str) -> Path:
    """The file for `key` inside the store directory; 400 for any key that could leave it,
    by its spelling or (symlinks included) by where it resolves to."""
    _check_key(key)
    path = (root / os.path.join(*key.split("/"))).resolve()
    if not path.is_relative_to(root):
        raise HTTPException(400, f"invalid store key {key!r}: it points outside the store")
    return path


def _summary(session: SessionDep, store: StoreRow) -> StoreSummary:
    owner = session.get(Team, store.team_id)
    job = session.scalar(select(Job).where(Job.store_id == store.id))
    return StoreSummary(
        id=store.id, owner=owner.name, created_at=iso(store.created_at), job=job_out(job) if job else None
    )


def _grantees(session: SessionDep, store_id: str) -> list[str]:
    query = select(Team.name).join(Grant, Grant.team_id == Team.id).where(Grant.store_id == store_id)
    return sorted(session.scalars(query))
