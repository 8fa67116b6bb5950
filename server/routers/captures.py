"""Capture requests and the jobs that run them.

The teacher runs once: a request whose corpus, teacher fingerprint and normalized
settings match an existing job gets that job back (200) while it is queued, running or
succeeded; a failed or cancelled twin is queued again and resumes from its committed
segments (201). When the twin belongs to another team, the caller is granted read access
to its store: it holds the same corpus and asked for the same computation.

Only the team that owns a job (its first requester) or an admin may cancel it. While a
cancel is pending, the owner's identical request withdraws it; another team's gets a 409
(it may not undo the owner's decision), and once the job has stopped, anyone's identical
request queues it again.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from logitstore.hf import teacher_context_length
from logitstore.spec import SpecError
from server.capture_settings import CaptureRequest, job_capture
from server.db import Corpus, CorpusOwner, Grant, Job, StoreRow, now
from server.deps import PrincipalDep, SessionDep, SettingsDep, TeamPrincipalDep, can_read_store, visible_job
from server.teachers import UnknownTeacherError, teacher_fingerprint, teacher_source

router = APIRouter(tags=["captures"])

# Settings that change only how the work is cut into segments, not what is stored.
_NOT_IN_DEDUP_KEY = ("unit_tokens",)


class JobOut(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    corpus_id: str
    teacher: str
    settings: dict
    slots: int | None = Field(description="ids stored per token: the store's `k` (head + min(k, draws) when "
                              "sampled with a head); null for a job whose settings the current rules refuse")
    store_id: str
    tokens_done: int
    tokens_total: int | None
    tokens_per_s: float
    eta_s: float | None
    error: str | None
    cancel_requested: bool
    devices: list[str] | None = Field(description="where the capture runs (ran): one device per process, e.g. "
                                      '["cuda:0", "cuda:1"]; null before a worker has started it')
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None


class TeachersOut(BaseModel):
    teachers: list[str]


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def job_out(job: Job) -> JobOut:
    try:
        slots = job_capture(job.settings)[0].slots
    except (SpecError, TypeError, ValueError):  # a row from an older version that today's rules refuse
        slots = None
    return JobOut(
        id=job.id, state=job.state, corpus_id=job.corpus_id, teacher=job.teacher, settings=job.settings, slots=slots,
        store_id=job.store_id, tokens_done=job.tokens_done, tokens_total=job.tokens_total,
        tokens_per_s=job.tokens_per_s, eta_s=job.eta_s, error=job.error, cancel_requested=job.cancel_requested,
        devices=job.devices, attempts=job.attempts, created_at=iso(job.created_at), started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
    )


@router.get("/v1/teachers", response_model=TeachersOut, summary="Teachers this server offers")
def list_teachers(principal: PrincipalDep, settings: SettingsDep) -> TeachersOut:
    return TeachersOut(teachers=sorted(settings.teachers))


@router.post(
    "/v1/captures",
    status_code=201,
    response_model=JobOut,
    summary="Request a capture (201 new job; 200 the identical job that already ran or runs)",
)
def create_capture(
    body: CaptureRequest, response: Response, principal: TeamPrincipalDep, session: SessionDep, settings: SettingsDep
) -> JobOut:
    try:
        source = teacher_source(settings.teachers, body.teacher)
    except UnknownTeacherError as e:
        raise HTTPException(422, str(e)) from None
    session.commit()  # hashing a teacher's files the first time takes a while: do not hold the database
    fingerprint = teacher_fingerprint(source)
    try:  # refused now, not after a worker has loaded the teacher
        body.spec().check_teacher(context_length=teacher_context_length(source))
    except SpecError as e:
        raise HTTPException(422, [{"type": "capture_spec", "loc": ["body", name], "msg": msg}
                                  for name, msg in e.problems]) from None
    # Locked until the job row is in: a concurrent DELETE /v1/corpora by the last uploader would
    # otherwise remove the file under a job that is about to be queued.
    session.get(Corpus, body.corpus_id, with_for_update=True)
    if session.get(CorpusOwner, (body.corpus_id, principal.team_id)) is None:
        raise HTTPException(404, f"no corpus {body.corpus_id!r} uploaded by your team; upload it with POST /v1/corpora")
    job_settings = body.job_settings()
    # counts_only false is left out as before it was always written: earlier jobs keep their keys.
    keyed = {k: v for k, v in job_settings.items()
             if k not in _NOT_IN_DEDUP_KEY and (k, v) != ("counts_only", False)}  # fmt: skip
    dedup_key = hashlib.sha256(
        json.dumps([body.corpus_id, fingerprint, keyed], sort_keys=True).encode()
    ).hexdigest()

    job = session.scalar(select(Job).where(Job.dedup_key == dedup_key))
    if job is None:
        job = _new_job(session, principal.team_id, body, fingerprint, job_settings, dedup_key)
        if job is not None:
            return job_out(job)
        job = session.scalar(select(Job).where(Job.dedup_key == dedup_key))  # lost a race to an identical request
    _share_with(session, job, principal.team_id)
    if job.state in ("failed", "cancelled"):
        job.state, job.error, job.cancel_requested, job.worker_id = "queued", None, False, None
        job.finished_at, job.attempts = None, 0  # a new run: max_attempts more claims
        session.flush()
        return job_out(job)
    if job.cancel_requested:
        if job.team_id != principal.team_id:
            # Only the owner may cancel, so only the owner may take its cancel back.
            raise HTTPException(409, f"job {job.id!r} is being cancelled by the team that owns it; request the "
                                "capture again once it has stopped (GET /v1/jobs/{id} says cancelled): it then "
                                "resumes from its committed segments")
        job.cancel_requested = False  # the owner asked for it again while cancelling: wanted after all
        session.flush()
    response.status_code = 200
    return job_out(job)


def _new_job(
    session: Session, team_id: str, body: CaptureRequest, fingerprint: str, job_settings: dict, dedup_key: str
) -> Job | None:
    """Insert the store and its job; None if an identical job was inserted concurrently."""
    corpus = session.get(Corpus, body.corpus_id)
    try:
        with session.begin_nested():
            store = StoreRow(team_id=team_id)
            session.add(store)
            session.flush()
            job = Job(
                team_id=team_id, corpus_id=corpus.id, store_id=store.id, teacher=body.teacher,
                teacher_fingerprint=fingerprint, settings=job_settings, dedup_key=dedup_key,
            )
            session.add(job)
            session.flush()
    except IntegrityError:
        return None
    return job


def _share_with(session: Session, job: Job, team_id: str) -> None:
    store = session.get(StoreRow, job.store_id)
    if store.team_id != team_id and session.get(Grant, (store.id, team_id)) is None:
        session.add(Grant(store_id=store.id, team_id=team_id))


@router.get("/v1/jobs", response_model=list[JobOut], summary="Jobs of stores you can read")
def list_jobs(principal: PrincipalDep, session: SessionDep) -> list[JobOut]:
    jobs = session.scalars(select(Job).order_by(Job.created_at))
    return [job_out(j) for j in jobs if can_read_store(session, principal, session.get(StoreRow, j.store_id))]


@router.get("/v1/jobs/{job_id}", response_model=JobOut, summary="A job's state and progress")
def get_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobOut:
    return job_out(visible_job(session, principal, job_id))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobOut,
    summary="Cancel a job: a queued job at once, a running one after its current work unit",
)
def cancel_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobOut:
    job = visible_job(session, principal, job_id)
    if not principal.is_admin and job.team_id != principal.team_id:
        raise HTTPException(403, f"job {job_id!r} belongs to another team; only its owner may cancel it")
    if job.state in ("succeeded", "failed"):
        raise HTTPException(409, f"job {job_id!r} already {job.state}; nothing to cancel")
    # Guarded: a worker may claim the job between our read and this write.
    cancelled = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "queued")
        .values(state="cancelled", finished_at=now(), error="cancelled by request")
    ).rowcount
    if not cancelled:
        session.execute(update(Job).where(Job.id == job_id, Job.state == "running").values(cancel_requested=True))
    session.refresh(job)
    return job_out(job)
