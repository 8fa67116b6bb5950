"""Corpus uploads: streamed to disk under a size limit, validated, stored by content hash.

The request body is the file itself (`application/octet-stream`), named by the `filename`
query parameter whose suffix says the format. The body is hashed and written chunk by
chunk as it arrives, so an upload never sits in memory whole, and it is refused with 413
as soon as it passes the limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from logitstore.capture.corpus import SUPPORTED_SUFFIXES, read_documents
from logitstore.errors import CorpusError
from server.db import Corpus, CorpusOwner
from server.deps import SessionDep, SettingsDep, TeamPrincipalDep
from server.settings import Settings

router = APIRouter(prefix="/v1/corpora", tags=["corpora"])


class CorpusOut(BaseModel):
    id: str
    filename: str
    format: str
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
) -> CorpusOut:
    # Release the database (on SQLite the request's transaction holds the write lock) while the body streams in.
    await run_in_threadpool(session.commit)
    name = _clean_filename(filename)
    suffix = Path(name).suffix.lower()
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
        documents = await run_in_threadpool(_count_documents, tmp, name, text_field)
        corpus_id = sha.hexdigest()
        created = await run_in_threadpool(_register, session, settings, principal.team_id, corpus_id, tmp, name,
                                          suffix, size, documents)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    response.status_code = 201 if created else 200
    return CorpusOut(id=corpus_id, filename=name, format=suffix.lstrip("."), bytes=size, documents=documents)


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


def corpus_path(settings: Settings, corpus: Corpus) -> Path:
    return settings.corpora_dir / f"{corpus.id}{corpus.suffix}"


def _out(c: Corpus, filename: str) -> CorpusOut:
    return CorpusOut(id=c.id, filename=filename, format=c.suffix.lstrip("."), bytes=c.size_bytes, documents=c.documents)


def _clean_filename(filename: str) -> str:
    name = PureWindowsPath(PurePosixPath(filename).name).name  # a client's path is not ours to keep
    if not name or name.startswith(".") or any(ord(ch) < 32 for ch in name):
        raise HTTPException(422, f"filename {filename!r}: give a plain file name such as corpus.txt")
    if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise HTTPException(422, f"filename {name!r}: unsupported corpus type; supported: {supported}")
    return name


def _count_documents(path: Path, name: str, text_field: str) -> int:
    """Read the whole corpus once, as the capture will; a bad line or row is a 422 naming it."""
    try:
        return sum(1 for _ in read_documents([path], text_field=text_field))
    except CorpusError as e:
        raise HTTPException(422, str(e).replace(str(path), name)) from None


def _register(
    session: Session, settings: Settings, team_id: str, corpus_id: str, tmp: Path, name: str, suffix: str,
    size: int, documents: int,
) -> bool:
    """Keep the file under its hash and record the team as an uploader; True if new to this team."""
    corpus = session.get(Corpus, corpus_id)
    if corpus is not None and corpus.suffix != suffix:
        raise HTTPException(409, f"this content was already uploaded as a {corpus.suffix} file (corpus {corpus_id})")
    if corpus is None:
        corpus = Corpus(id=corpus_id, suffix=suffix, size_bytes=size, documents=documents)
        os.replace(tmp, corpus_path(settings, corpus))  # same bytes under the same name: a racing twin is harmless
        try:
            with session.begin_nested():
                session.add(corpus)
        except IntegrityError:  # another upload of the same bytes registered it first
            pass
    if session.get(CorpusOwner, (corpus_id, team_id)) is not None:
        return False
    session.add(CorpusOwner(corpus_id=corpus_id, team_id=team_id, filename=name))
    session.commit()
    return True
