"""Corpus uploads: streamed to disk under a size limit, validated, stored by content and format.

The request body is the file itself (`application/octet-stream`), named by the `filename`
query parameter whose suffix says the format. The body is hashed and written chunk by
chunk as it arrives, so an upload never sits in memory whole, and it is refused with 413
as soon as it passes the limit. A corpus is its bytes read one way: the id is a sha256 over
the bytes, the suffix, the `text_field` and the chat rows' `messages_field` (`corpus_key`), so
the same bytes as .txt and as .jsonl, or read by another field, are two corpora. A team that
uploaded a corpus may delete its upload; the file goes when no team holds it and no job waits
for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from logitstore.capture.corpus import SUPPORTED_SUFFIXES, TEXT_SUFFIXES, read_documents
from logitstore.errors import CorpusError
from server.db import ACTIVE_STATES, Corpus, CorpusOwner, Job
from server.deps import SessionDep, SettingsDep, TeamPrincipalDep
from server.settings import Settings

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])

# At startup `prepare()` removes temporary upload files older than this. Not all of them: another
# server process on the same data dir may be receiving one right now, and a live upload's file
# is written to as its bytes arrive (its mtime stays fresh), or at most read once to count documents.
STALE_UPLOAD_S = 3600.0


class CorpusOut(BaseModel):
    id: str
    filename: str
    format: str
    text_field: str
    messages_field: str
    bytes: int
    documents: int


_BODY = {
    "requestBody": {
        "required": True,
        "description": "the corpus file's bytes: .txt (paragraphs), .jsonl (one object per line) or .parquet",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "",
    status_code=201,
    response_model=CorpusOut,
    openapi_extra=_BODY,
    summary="Upload a corpus (201 new, 200 when this content was uploaded before)",
    responses={413: {"description": "over the upload size limit"}, 422: {"description": "unreadable corpus"}},
)
async def upload_corpus(
    request: Request,
    response: Response,
    principal: TeamPrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    filename: Annotated[str, Query(min_length=1, max_length=255, description="name with suffix .txt/.jsonl/.parquet")],
    text_field: Annotated[str, Query(min_length=1, max_length=255, description="JSONL field or Parquet column")] = (
        "text"
    ),
    messages_field: Annotated[str, Query(
        min_length=1, max_length=255,
        description="JSONL field or Parquet column of chat rows' messages (rows with prompt and completion are "
        "chat rows too); they are rendered with the teacher's chat template")] = "messages",
) -> CorpusOut:
    # Release the database (on SQLite the request's transaction holds the write lock) while the body streams in.
    await run_in_threadpool(session.commit)
    name = _clean_filename(filename)
    suffix = Path(name).suffix.lower()
    if suffix in TEXT_SUFFIXES:  # paragraphs have no fields: any field would only split the same corpus in two
        text_field, messages_field = "text", "messages"
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise HTTPException(413, f"upload of {declared} bytes exceeds the limit of {settings.max_upload_bytes} bytes")

    tmp_dir = settings.corpora_dir / ".incoming"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=suffix)
    tmp = Path(tmp_name)
    try:
        sha, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise HTTPException(413, f"upload exceeds the limit of {settings.max_upload_bytes} bytes")
                sha.update(chunk)
                f.write(chunk)
        documents = await run_in_threadpool(_count_documents, tmp, name, text_field, messages_field)
        corpus = Corpus(id=corpus_key(sha.hexdigest(), suffix, text_field, messages_field), suffix=suffix,
                        text_field=text_field, messages_field=messages_field, size_bytes=size, documents=documents)
        created = await run_in_threadpool(_register, session, settings, principal.team_id, corpus, tmp, name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    response.status_code = 201 if created else 200
    return _out(corpus, name)


@router.get("", response_model=list[CorpusOut], summary="Corpora your team uploaded")
def list_corpora(principal: TeamPrincipalDep, session: SessionDep) -> list[CorpusOut]:
    rows = session.execute(
        select(Corpus, CorpusOwner.filename)
        .join(CorpusOwner, CorpusOwner.corpus_id == Corpus.id)
        .where(CorpusOwner.team_id == principal.team_id)
        .order_by(Corpus.created_at)
    )
    return [_out(c, filename) for c, filename in rows]


@router.get("/{corpus_id}", response_model=CorpusOut, summary="One corpus your team uploaded")
def get_corpus(corpus_id: str, principal: TeamPrincipalDep, session: SessionDep) -> CorpusOut:
    owner = session.get(CorpusOwner, (corpus_id, principal.team_id))
    if owner is None:
        raise HTTPException(404, f"no corpus {corpus_id!r} uploaded by your team")
    return _out(session.get(Corpus, corpus_id), owner.filename)


@router.delete(
    "/{corpus_id}",
    status_code=204,
    summary="Remove your team's upload of a corpus; its file goes once no team holds it and no job needs it",
    responses={409: {"description": "a queued or running job needs the corpus"}},
)
def delete_corpus(corpus_id: str, principal: TeamPrincipalDep, session: SessionDep, settings: SettingsDep) -> None:
    # Locked (PostgreSQL; SQLite transactions hold the write lock anyway): an upload of the same corpus,
    # which puts the file back, waits for this decision instead of losing its file to it.
    corpus = session.get(Corpus, corpus_id, with_for_update=True)
    owner = session.get(CorpusOwner, (corpus_id, principal.team_id))
    if corpus is None or owner is None:
        raise HTTPException(404, f"no corpus {corpus_id!r} uploaded by your team")
    others = session.scalar(select(exists().where(CorpusOwner.corpus_id == corpus_id,
                                                  CorpusOwner.team_id != principal.team_id)))
    for job in session.scalars(select(Job).where(Job.corpus_id == corpus_id, Job.state.in_(ACTIVE_STATES))):
        # The team's own job reads this upload; the last uploader's departure would take the file from any job.
        if job.team_id == principal.team_id or not others:
            raise HTTPException(409, f"job {job.id} is {job.state} on corpus {corpus_id!r}; cancel it "
                                     f"(DELETE /v1/jobs/{job.id}) or wait for it to finish, then delete the corpus")
    session.delete(owner)
    if not others:
        # Finished jobs keep their corpus id (a foreign key): the row stays, without a file, while one does.
        if not session.scalar(select(exists().where(Job.corpus_id == corpus_id))):
            session.delete(corpus)
        session.flush()
        # Before the commit, while the row is locked: after it, an upload could put the file back first.
        with contextlib.suppress(FileNotFoundError):
            corpus_path(settings, corpus).unlink()
    session.commit()


def corpus_key(content_sha256: str, suffix: str, text_field: str, messages_field: str = "messages") -> str:
    """A corpus id: sha256 over the sha256 of the bytes, the suffix (the format) and the fields read
    (the messages field only when not the default: ids from before it existed stay the same)."""
    fields = [text_field] if messages_field == "messages" else [text_field, messages_field]
    return hashlib.sha256(json.dumps([content_sha256, suffix, *fields]).encode()).hexdigest()


def corpus_path(settings: Settings, corpus: Corpus) -> Path:
    return settings.corpora_dir / f"{corpus.id}{corpus.suffix}"


def remove_stale_uploads(settings: Settings, older_than_s: float = STALE_UPLOAD_S) -> int:
    """Remove the temporary files of uploads that a killed server left in `corpora/.incoming`; how many."""
    incoming = settings.corpora_dir / ".incoming"
    if not incoming.is_dir():
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    for path in incoming.iterdir():
        with contextlib.suppress(FileNotFoundError):  # another process's cleanup may remove it first
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


def _out(c: Corpus, filename: str) -> CorpusOut:
    return CorpusOut(id=c.id, filename=filename, format=c.suffix.lstrip("."), text_field=c.text_field,
                     messages_field=c.messages_field, bytes=c.size_bytes, documents=c.documents)


def _clean_filename(filename: str) -> str:
    name = PureWindowsPath(PurePosixPath(filename).name).name  # a client's path is not ours to keep
    if not name or name.startswith(".") or any(ord(ch) < 32 for ch in name):
        raise HTTPException(422, f"filename {filename!r}: give a plain file name such as corpus.txt")
    if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise HTTPException(422, f"filename {name!r}: unsupported corpus type; supported: {supported}")
    return name


def _count_documents(path: Path, name: str, text_field: str, messages_field: str) -> int:
    """Read the whole corpus once, as the capture will; a bad line or row is a 422 naming it."""
    try:
        return sum(1 for _ in read_documents([path], text_field=text_field, messages_field=messages_field))
    except CorpusError as e:
        raise HTTPException(422, str(e).replace(str(path), name)) from None


def _register(session: Session, settings: Settings, team_id: str, corpus: Corpus, tmp: Path, name: str) -> bool:
    """Keep the file under the corpus id and record the team as an uploader; True if new to this team."""
    # Locked, as in delete_corpus: the file put back here is not removed by a concurrent delete.
    if session.get(Corpus, corpus.id, with_for_update=True) is None:
        try:
            with session.begin_nested():
                session.add(corpus)
        except IntegrityError:  # another upload of the same corpus registered it first
            session.get(Corpus, corpus.id, with_for_update=True)
    # Also when the row exists: its file is gone once every uploader deleted it (the row stays for old jobs).
    # The same corpus under the same name: replacing a racing twin's file, or one a job reads, is harmless.
    os.replace(tmp, corpus_path(settings, corpus))
    if session.get(CorpusOwner, (corpus.id, team_id)) is not None:
        return False
    session.add(CorpusOwner(corpus_id=corpus.id, team_id=team_id, filename=name))
    session.commit()
    return True
