"""Corpora: identity by bytes, format and text_field; deletion; abandoned uploads; on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import time

from fastapi.testclient import TestClient

from server.app import create_app
from server.db import Corpus, Database
from server.routers.corpora import STALE_UPLOAD_S, corpus_key
from tests.server.conftest import Api

JSONL = b'{"text": "hello world", "body": "another field"}\n{"text": "second", "body": "doc"}\n'


def _row(api: Api, corpus_id: str) -> Corpus | None:
    db = Database(api.settings.db_url)
    try:
        with db.session() as s:
            return s.get(Corpus, corpus_id)
    finally:
        db.dispose()


def test_same_bytes_as_another_format_are_another_corpus(api: Api) -> None:
    alpha, beta = api.team("alpha"), api.team("beta")
    as_txt = api.upload(alpha, JSONL, filename="c.txt")
    as_jsonl = api.upload(beta, JSONL, filename="c.jsonl")  # was a 409: "already uploaded as a .txt file"
    assert as_txt.status_code == as_jsonl.status_code == 201, as_jsonl.text
    assert as_txt.json()["id"] != as_jsonl.json()["id"]
    assert (as_txt.json()["format"], as_jsonl.json()["format"]) == ("txt", "jsonl")
    content = hashlib.sha256(JSONL).hexdigest()
    assert as_jsonl.json()["id"] == corpus_key(content, ".jsonl", "text")
    for corpus in (as_txt.json(), as_jsonl.json()):
        assert (api.settings.corpora_dir / f"{corpus['id']}.{corpus['format']}").read_bytes() == JSONL
    again = api.upload(alpha, JSONL, filename="d.jsonl")
    assert again.status_code == 201 and again.json()["id"] == as_jsonl.json()["id"]  # new to alpha, same corpus


def test_text_field_is_kept_and_part_of_the_id(api: Api) -> None:
    key = api.team("alpha")
    by_text = api.upload(key, JSONL, filename="c.jsonl").json()
    by_body = api.upload(key, JSONL, filename="c.jsonl", text_field="body")
    assert by_body.status_code == 201, by_body.text
    by_body = by_body.json()
    assert (by_text["text_field"], by_body["text_field"]) == ("text", "body")
    assert by_body["id"] == corpus_key(hashlib.sha256(JSONL).hexdigest(), ".jsonl", "body") != by_text["id"]
    assert api.upload(key, JSONL, filename="again.jsonl", text_field="body").status_code == 200
    listed = api.client.get("/v1/corpora", headers=api.auth(key)).json()
    assert {c["id"]: c["text_field"] for c in listed} == {by_text["id"]: "text", by_body["id"]: "body"}
    one = api.client.get(f"/v1/corpora/{by_body['id']}", headers=api.auth(key)).json()
    assert one == by_body | {"filename": "c.jsonl"}
    assert _row(api, by_body["id"]).text_field == "body"
    # Still validated with the field given.
    missing = api.upload(key, JSONL, filename="c.jsonl", text_field="title")
    assert missing.status_code == 422 and "missing field 'title'" in missing.json()["detail"]
    # Paragraphs have no fields: a .txt corpus is read as "text" whatever the upload said.
    txt = api.upload(key, b"one paragraph\n", filename="p.txt", text_field="body")
    assert txt.status_code == 201 and txt.json()["text_field"] == "text"
    assert api.upload(key, b"one paragraph\n", filename="p.txt").json()["id"] == txt.json()["id"]


def test_delete_corpus(api: Api) -> None:
    alpha, beta = api.team("alpha"), api.team("beta")
    corpus = api.upload(alpha, JSONL, filename="c.jsonl").json()["id"]
    path = api.settings.corpora_dir / f"{corpus}.jsonl"
    assert api.upload(beta, JSONL, filename="mine.jsonl").status_code == 201
    url = f"/v1/corpora/{corpus}"
    gamma = api.team("gamma")
    assert api.client.delete(url, headers=api.auth(gamma)).status_code == 404  # never uploaded it
    assert api.client.delete(url, headers=api.auth(alpha)).status_code == 204
    assert api.client.get(url, headers=api.auth(alpha)).status_code == 404
    assert api.client.delete(url, headers=api.auth(alpha)).status_code == 404
    assert api.capture(alpha, corpus).status_code == 404  # no longer alpha's to capture
    assert path.exists() and api.client.get(url, headers=api.auth(beta)).status_code == 200  # beta still holds it
    assert api.client.delete(url, headers=api.auth(beta)).status_code == 204
    assert not path.exists() and _row(api, corpus) is None
    assert api.upload(alpha, JSONL, filename="c.jsonl").status_code == 201  # uploadable again
    assert path.read_bytes() == JSONL


def test_delete_corpus_with_active_job(api: Api) -> None:
    alpha, beta = api.team("alpha"), api.team("beta")
    corpus = api.upload(alpha, JSONL, filename="c.jsonl").json()["id"]
    path, url = api.settings.corpora_dir / f"{corpus}.jsonl", f"/v1/corpora/{corpus}"
    api.upload(beta, JSONL, filename="c.jsonl")
    job = api.capture(alpha, corpus).json()
    assert job["state"] == "queued"
    refused = api.client.delete(url, headers=api.auth(alpha))
    assert refused.status_code == 409 and f"DELETE /v1/jobs/{job['id']}" in refused.json()["detail"]
    # Beta's upload is not what the job reads while alpha holds the corpus: beta may leave.
    assert api.client.delete(url, headers=api.auth(beta)).status_code == 204
    assert api.client.delete(f"/v1/jobs/{job['id']}", headers=api.auth(alpha)).json()["state"] == "cancelled"
    assert api.client.delete(url, headers=api.auth(alpha)).status_code == 204
    # The file went with the last uploader; the row stays for the finished job that names it.
    assert not path.exists() and _row(api, corpus) is not None
    assert api.upload(alpha, JSONL, filename="c.jsonl").status_code == 201
    assert path.read_bytes() == JSONL  # put back, so the cancelled job can run again
    assert api.capture(alpha, corpus).json()["state"] == "queued"


def test_last_uploader_cannot_take_the_file_from_another_teams_job(api: Api) -> None:
    alpha, beta = api.team("alpha"), api.team("beta")
    corpus = api.upload(alpha, JSONL, filename="c.jsonl").json()["id"]
    api.upload(beta, JSONL, filename="c.jsonl")
    job = api.capture(beta, corpus).json()
    api.client.delete(f"/v1/jobs/{job['id']}", headers=api.auth(beta))
    assert api.client.delete(f"/v1/corpora/{corpus}", headers=api.auth(beta)).status_code == 204
    assert api.capture(alpha, corpus).json()["id"] == job["id"]  # beta's job, queued again for alpha
    refused = api.client.delete(f"/v1/corpora/{corpus}", headers=api.auth(alpha))
    assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
    assert (api.settings.corpora_dir / f"{corpus}.jsonl").exists()


def test_startup_removes_abandoned_uploads(make_settings) -> None:
    settings = make_settings()
    incoming = settings.corpora_dir / ".incoming"
    incoming.mkdir(parents=True)
    abandoned, live = incoming / "tmpkilled.jsonl", incoming / "tmpother.jsonl"
    abandoned.write_bytes(b"half an upload")
    live.write_bytes(b"another server's upload, arriving now")
    old = time.time() - STALE_UPLOAD_S - 60
    os.utime(abandoned, (old, old))
    with TestClient(create_app(settings)):
        assert not abandoned.exists()
        assert live.exists()

