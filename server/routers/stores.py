"""The store catalog and sharing. The store's files themselves are served by `store_files`."""

from __future__ import annotations

import logging
import os
from pathlib import PurePath

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from logitstore import storage
from logitstore.reader import describe
from server.db import Grant, Job, StoreRow, Team
from server.deps import (
    PrincipalDep,
    ReadCacheDep,
    SessionDep,
    SettingsDep,
    find_team,
    owned_store,
    visible_store,
)
from server.routers.captures import JobOut, iso, job_out

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
        info = _without_server_paths(describe(url, options))
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


def _without_server_paths(info: dict) -> dict:
    """`info` without the server's own paths, which mean nothing to the caller and tell them how the
    server's disk is laid out: no store url; the teacher and corpus files by file name only (hub ids stay)."""
    info.pop("url", None)
    meta = info["meta"]
    meta["teacher"]["source"] = _file_name(meta["teacher"]["source"])
    meta["corpus"]["sources"] = [_file_name(s) for s in meta["corpus"]["sources"]]
    return info


def _file_name(source: str) -> str:
    return PurePath(source).name if os.path.isabs(source) else source


def _summary(session: SessionDep, store: StoreRow) -> StoreSummary:
    owner = session.get(Team, store.team_id)
    job = session.scalar(select(Job).where(Job.store_id == store.id))
    return StoreSummary(
        id=store.id, owner=owner.name, created_at=iso(store.created_at), job=job_out(job) if job else None
    )


def _grantees(session: SessionDep, store_id: str) -> list[str]:
    query = select(Team.name).join(Grant, Grant.team_id == Team.id).where(Grant.store_id == store_id)
    return sorted(session.scalars(query))
