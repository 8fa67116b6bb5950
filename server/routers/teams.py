"""Teams and their API keys. Keys are shown once, at creation, and stored only as sha256."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import select

from server.db import ApiKey, Team, hash_key
from server.deps import PrincipalDep, ReadCacheDep, SessionDep, find_team
from server.routers.captures import iso

router = APIRouter(prefix="/v1/teams", tags=["teams"])


class TeamIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TeamOut(BaseModel):
    id: str
    name: str


class KeyOut(BaseModel):
    id: str
    team: str
    key: str = Field(description="the API key; shown only in this response")


class KeyInfo(BaseModel):
    id: str = Field(description="pass to DELETE /v1/teams/{team}/keys/{key_id} to revoke the key")
    created_at: str
    revoked: bool


@router.post("", status_code=201, response_model=TeamOut, summary="Create a team (admin)")
def create_team(body: TeamIn, principal: PrincipalDep, session: SessionDep) -> TeamOut:
    if not principal.is_admin:
        raise HTTPException(403, "only the admin key may create teams")
    if session.scalar(select(Team).where(Team.name == body.name)) is not None:
        raise HTTPException(409, f"team {body.name!r} already exists")
    team = Team(name=body.name)
    session.add(team)
    session.flush()
    return TeamOut(id=team.id, name=team.name)


@router.get("", response_model=list[TeamOut], summary="Teams: all for the admin, your own for a team key")
def list_teams(principal: PrincipalDep, session: SessionDep) -> list[TeamOut]:
    query = select(Team).order_by(Team.name)
    if not principal.is_admin:
        query = query.where(Team.id == principal.team_id)
    return [TeamOut(id=t.id, name=t.name) for t in session.scalars(query)]


@router.post("/{team}/keys", status_code=201, response_model=KeyOut, summary="Create an API key (admin or the team)")
def create_key(team: str, principal: PrincipalDep, session: SessionDep) -> KeyOut:
    row = _team_for(principal, session, team)
    key = "lsk_" + secrets.token_urlsafe(32)
    api_key = ApiKey(team_id=row.id, key_sha256=hash_key(key))
    session.add(api_key)
    session.flush()
    return KeyOut(id=api_key.id, team=row.name, key=key)


@router.get("/{team}/keys", response_model=list[KeyInfo], summary="The team's API keys, no secrets (admin or the team)")
def list_keys(team: str, principal: PrincipalDep, session: SessionDep) -> list[KeyInfo]:
    # Ids and dates only: a key is shown once, at creation, and stored as its hash, which is not shown either.
    row = _team_for(principal, session, team)
    keys = session.scalars(select(ApiKey).where(ApiKey.team_id == row.id).order_by(ApiKey.created_at))
    return [KeyInfo(id=k.id, created_at=iso(k.created_at), revoked=k.revoked) for k in keys]


@router.delete("/{team}/keys/{key_id}", status_code=204, summary="Revoke an API key (admin or the team)")
def revoke_key(team: str, key_id: str, principal: PrincipalDep, session: SessionDep, cache: ReadCacheDep) -> None:
    row = _team_for(principal, session, team)
    api_key = session.get(ApiKey, key_id)
    if api_key is None or api_key.team_id != row.id:
        raise HTTPException(404, f"team {row.name!r} has no key {key_id!r}")
    api_key.revoked = True
    session.commit()
    cache.clear()


def _team_for(principal: PrincipalDep, session: SessionDep, team: str) -> Team:
    row = find_team(session, team) if principal.is_admin else None
    if not principal.is_admin:
        own = session.get(Team, principal.team_id)
        if own is None or team not in (own.name, own.id):
            raise HTTPException(403, f"a team key may manage only its own team's keys, not {team!r}")
        row = own
    return row
