"""Request dependencies: the database session, the caller (team or admin), and visibility rules.

Visibility is the one rule the whole API follows: a store you may not read is reported
as absent (404) on every route, so ids of other teams' stores reveal nothing; an action
on a resource you can see but do not own is 403.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.datastructures import Headers

from server.db import ApiKey, Database, Grant, Job, StoreRow, Team, hash_key
from server.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="an API key: the admin key or a team's key")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a team (by its key) or the admin (by the bootstrap key, no team)."""

    team_id: str | None
    is_admin: bool = False


class ReadAccessCache:
    """Recent "this key may read this store" decisions, so that the many small range reads of
    a remote reader skip the database. Revoking a key or a grant, or deleting a store, clears
    it in this process; other API processes notice within `ttl_s`."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._until: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str, store_id: str) -> tuple[str, str]:
        return hashlib.sha256(token.encode()).hexdigest(), store_id

    def allows(self, token: str, store_id: str) -> bool:
        until = self._until.get(self._key(token, store_id))
        return until is not None and until > time.monotonic()

    def remember(self, token: str, store_id: str) -> None:
        if self.ttl_s > 0:
            with self._lock:
                if len(self._until) > 100_000:  # bounded: forget everything rather than grow
                    self._until.clear()
                self._until[self._key(token, store_id)] = time.monotonic() + self.ttl_s

    def clear(self) -> None:
        with self._lock:
            self._until.clear()


async def refuse_non_finite_json(request: Request) -> None:
    """422 for a JSON body holding `NaN`, `Infinity`, `-Infinity` or a number too large for a float
    (`1e400`): Python's parser reads them as floats, but they are not JSON (RFC 8259), and no setting
    of this API means them. Checked once FastAPI has read and parsed the body, for every route that
    takes a JSON body (app-wide dependency); routes that stream their body (uploads) are left alone."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.body_field is None or not _is_json(request.headers):
        return
    try:
        json.loads(await request.body(), parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {e.msg}", "input": {}}]
        ) from None


def _is_json(headers: Headers) -> bool:
    # The content types for which FastAPI parses the body as JSON.
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _refuse_constant(name: str) -> float:
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"{text[:32]} is too large for a float", text, 0)
    return value


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_session(db: Annotated[Database, Depends(get_db)]) -> Iterator[Session]:
    """One session per request: committed when the route returns normally, rolled back otherwise."""
    with db.sessions() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# scope="function": the commit happens before the response is sent, so a failed commit is an
# error response rather than a 2xx for a write that was lost.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_principal(session: SessionDep, settings: SettingsDep, credentials: BearerDep) -> Principal:
    return authenticate(session, settings, credentials)


def authenticate(session: Session, settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller named by the bearer key; 401 without a valid one."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
    key = credentials.credentials
    if settings.admin_key and hmac.compare_digest(key.encode(), settings.admin_key.encode()):
        return Principal(team_id=None, is_admin=True)
    row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == hash_key(key), ApiKey.revoked.is_(False)))
    if row is None:
        raise HTTPException(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
    return Principal(team_id=row.team_id)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_read_cache(request: Request) -> ReadAccessCache:
    return request.app.state.read_cache


ReadCacheDep = Annotated[ReadAccessCache, Depends(get_read_cache)]


def get_team_principal(principal: PrincipalDep) -> Principal:
    """Routes that act for a team (uploads, captures) need a team key, not the admin key."""
    if principal.team_id is None:
        raise HTTPException(403, "this action needs a team's API key; the admin key belongs to no team")
    return principal


TeamPrincipalDep = Annotated[Principal, Depends(get_team_principal)]


def find_team(session: Session, name_or_id: str) -> Team:
    """A team by name (or id); 404 if there is none."""
    team = session.scalar(select(Team).where(Team.name == name_or_id)) or session.get(Team, name_or_id)
    if team is None:
        raise HTTPException(404, f"no team {name_or_id!r}")
    return team


def can_read_store(session: Session, principal: Principal, store: StoreRow) -> bool:
    if principal.is_admin or store.team_id == principal.team_id:
        return True
    return session.get(Grant, (store.id, principal.team_id)) is not None


def visible_store(session: Session, principal: Principal, store_id: str) -> StoreRow:
    """The store, if the caller may read it; otherwise 404, exactly as for an unknown id."""
    store = session.get(StoreRow, store_id)
    if store is None or not can_read_store(session, principal, store):
        raise HTTPException(404, f"no store {store_id!r}")
    return store


def owned_store(session: Session, principal: Principal, store_id: str) -> StoreRow:
    """The store, if the caller owns it (or is admin); 403 if they may only read it."""
    store = visible_store(session, principal, store_id)
    if not principal.is_admin and store.team_id != principal.team_id:
        raise HTTPException(403, f"store {store_id!r} belongs to another team; only its owner may do this")
    return store


def visible_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A job is visible to whoever may read its store (owner, grantees, admin); else 404."""
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    store = session.get(StoreRow, job.store_id)
    if store is None or not can_read_store(session, principal, store):
        raise HTTPException(404, f"no job {job_id!r}")
    return job
