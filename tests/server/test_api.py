"""The API through the real app and its lifespan (TestClient), on SQLite and PostgreSQL.

Captures run in this process through `Worker.run_once()` with the tiny random teacher.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logitstore import open_store
from logitstore.verify import verify
from server.routers.corpora import corpus_key
from server.worker import Worker
from tests.server.conftest import ADMIN_KEY, Api


def test_auth_teams_and_keys(api: Api) -> None:
    c = api.client
    assert c.get("/v1/stores").status_code == 401
    assert c.get("/v1/stores", headers=api.auth("wrong")).status_code == 401
    a = api.team("alpha")
    api.team("beta")
    assert c.post("/v1/teams", json={"name": "alpha"}, headers=api.auth(ADMIN_KEY)).status_code == 409
    assert c.post("/v1/teams", json={"name": "gamma"}, headers=api.auth(a)).status_code == 403
    assert c.post("/v1/teams/beta/keys", headers=api.auth(a)).status_code == 403
    assert [t["name"] for t in c.get("/v1/teams", headers=api.auth(a)).json()] == ["alpha"]
    # A team makes its own second key, then revokes it.
    second = c.post("/v1/teams/alpha/keys", headers=api.auth(a)).json()
    assert c.get("/v1/stores", headers=api.auth(second["key"])).status_code == 200
    assert c.delete(f"/v1/teams/alpha/keys/{second['id']}", headers=api.auth(a)).status_code == 204
    assert c.get("/v1/stores", headers=api.auth(second["key"])).status_code == 401
    # The key is stored only as its hash.
    from sqlalchemy import select

    from server.db import ApiKey, Database

    db = Database(api.settings.db_url)
    with db.session() as s:
        hashes = s.scalars(select(ApiKey.key_sha256)).all()
    db.dispose()
    assert second["key"] not in hashes and len(hashes) == 3


def test_upload_is_content_addressed_and_validated(api: Api, corpus_slice: Path) -> None:
    key, other = api.team("alpha"), api.team("beta")
    data = corpus_slice.read_bytes()
    first = api.upload(key, data, filename="shakespeare.txt")
    assert first.status_code == 201, first.text
    body = first.json()
    import hashlib

    assert body["id"] == corpus_key(hashlib.sha256(data).hexdigest(), ".txt", "text")
    assert body["documents"] == 40 and body["bytes"] == len(data)
    again = api.upload(key, data, filename="renamed.txt")
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert api.upload(other, data).status_code == 201  # new to that team, same id
    stored = api.settings.corpora_dir / f"{body['id']}.txt"
    assert stored.read_bytes() == data

    # JSONL and Parquet, with the line / row of a bad record named in the error.
    good = b'{"text": "hello world"}\n{"text": "second doc"}\n'
    assert api.upload(key, good, filename="c.jsonl").json()["documents"] == 2
    bad = api.upload(key, b'{"text": "ok"}\n{"text": 3}\n', filename="c.jsonl")
    assert bad.status_code == 422 and "c.jsonl:2" in bad.json()["detail"]
    assert "field 'text' must be a string" in bad.json()["detail"]
    for hostile in (b'{"text": "ok", "n": ' + b"9" * 5000 + b"}\n", b"[" * 200_000 + b"\n"):
        refused = api.upload(key, hostile, filename="c.jsonl")  # Python's JSON parser raises, not 500
        assert refused.status_code == 422 and "c.jsonl:1" in refused.json()["detail"], refused.text
    missing = api.upload(key, b'{"body": "x"}\n', filename="c.jsonl", text_field="content")
    assert missing.status_code == 422 and "missing field 'content'" in missing.json()["detail"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["one", None]}), buf)
    bad_pq = api.upload(key, buf.getvalue(), filename="c.parquet")
    assert bad_pq.status_code == 422 and "c.parquet:row 1" in bad_pq.json()["detail"]
    assert api.upload(key, b"\xff\xfe bad", filename="x.txt").status_code == 422
    assert api.upload(key, b"   \n\n  ", filename="x.txt").status_code == 422  # empty corpus
    unsupported = api.upload(key, b"hi", filename="x.csv")
    assert unsupported.status_code == 422 and ".parquet" in unsupported.json()["detail"]
    assert api.upload(ADMIN_KEY, data).status_code == 403  # the admin key belongs to no team
    # Nothing half-uploaded is left behind.
    assert not any((api.settings.corpora_dir / ".incoming").iterdir())


def test_upload_size_limit(make_settings, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = make_settings(max_upload_bytes=1000)
    with TestClient(create_app(settings)) as client:
        api = Api(client, settings)
        key = api.team("alpha")
        assert api.upload(key, b"word " * 150).status_code == 201
        assert api.upload(key, b"word " * 300).status_code == 413

        def chunks():  # no Content-Length: the limit is enforced while streaming
            for _ in range(300):
                yield b"word "

        r = client.post("/v1/corpora", params={"filename": "big.txt"}, content=chunks(), headers=api.auth(key))
        assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]
        assert not any((settings.corpora_dir / ".incoming").iterdir())


def test_capture_requests_dedup_and_validation(api: Api, corpus_slice: Path) -> None:
    key, other = api.team("alpha"), api.team("beta")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    unknown = api.capture(key, corpus, teacher="gpt-9")
    assert unknown.status_code == 422 and "this server offers: tiny" in unknown.json()["detail"]
    assert api.capture(key, corpus, temperatures=[2.0]).status_code == 422
    assert api.capture(key, corpus, k=0).status_code == 422
    assert api.capture(other, corpus).status_code == 404  # beta never uploaded it
    first = api.capture(key, corpus)
    assert first.status_code == 201 and first.json()["state"] == "queued"
    # Same request (temperatures in another order, another unit size): the same job.
    same = api.capture(key, corpus, temperatures=[2.0, 1.0], unit_tokens=999)
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    assert api.capture(key, corpus, k=4).json()["id"] != first.json()["id"]
    # Another team asking for the same computation gets the same job and read access to its store.
    assert api.upload(other, corpus_slice.read_bytes()).status_code == 201
    shared = api.capture(other, corpus)
    assert shared.status_code == 200 and shared.json()["id"] == first.json()["id"]
    store_id = first.json()["store_id"]
    assert api.client.get(f"/v1/stores/{store_id}", headers=api.auth(other)).status_code == 200
    assert api.client.delete(f"/v1/jobs/{first.json()['id']}", headers=api.auth(other)).status_code == 403


def test_capture_runs_and_store_is_served(api: Api, corpus_slice: Path, reference_store: Path) -> None:
    key, other = api.team("alpha"), api.team("beta")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    job = api.capture(key, corpus).json()
    assert Worker(api.settings).run_once() == job["id"]
    done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
    assert done["state"] == "succeeded", done
    assert done["tokens_done"] == done["tokens_total"] == CAPTURE_TOKENS and done["eta_s"] == 0
    assert done["devices"] == ["cpu"]
    assert Worker(api.settings).run_once() is None  # nothing left to claim

    store_id = job["store_id"]
    store_path = api.settings.stores_dir / store_id
    assert verify(str(store_path)).digest == verify(str(reference_store)).digest
    detail = api.client.get(f"/v1/stores/{store_id}", headers=api.auth(key)).json()
    assert detail["info"]["tokens"] == CAPTURE_TOKENS and detail["info"]["complete"] is True
    assert detail["info"]["meta"]["capture"]["k"] == 8 and detail["shared_with"] == []
    assert detail["zarr_url"].endswith(f"/v1/stores/{store_id}/zarr")

    c, h = api.client, api.auth(key)
    url = f"/v1/stores/{store_id}/zarr"
    full = c.get(f"{url}/zarr.json", headers=h)
    assert full.status_code == 200 and full.content == (store_path / "zarr.json").read_bytes()
    etag = full.headers["etag"]
    assert c.get(f"{url}/zarr.json", headers={**h, "If-None-Match": etag}).status_code == 304
    shard = next(p for p in sorted((store_path / "segments").rglob("*")) if p.is_file() and p.stat().st_size > 100)
    rel = shard.relative_to(store_path).as_posix()
    part = c.get(f"{url}/{rel}", headers={**h, "Range": "bytes=10-49"})
    assert part.status_code == 206 and part.content == shard.read_bytes()[10:50]
    assert part.headers["content-range"] == f"bytes 10-49/{shard.stat().st_size}"
    head = c.head(f"{url}/{rel}", headers=h)
    assert head.status_code == 200 and int(head.headers["content-length"]) == shard.stat().st_size
    assert c.get(f"{url}/no/such/key", headers=h).status_code == 404
    # Another team sees nothing, on every route, until the store is shared; then reads; then not again.
    o = api.auth(other)
    for path in (f"/v1/stores/{store_id}", f"{url}/zarr.json", f"/v1/jobs/{job['id']}"):
        assert c.get(path, headers=o).status_code == 404, path
    assert c.get("/v1/stores", headers=o).json() == []
    assert c.post(f"/v1/stores/{store_id}/grants", json={"team": "alpha"}, headers=o).status_code == 404
    assert c.post(f"/v1/stores/{store_id}/grants", json={"team": "beta"}, headers=h).json() == ["beta"]
    assert c.get(f"{url}/zarr.json", headers=o).status_code == 200
    assert [s["id"] for s in c.get("/v1/stores", headers=o).json()] == [store_id]
    assert c.delete(f"/v1/stores/{store_id}", headers=o).status_code == 403
    assert c.delete(f"/v1/stores/{store_id}/grants/beta", headers=h).status_code == 204
    assert c.get(f"{url}/zarr.json", headers=o).status_code == 404
    # The owner deletes it: files, catalog entry and job are gone.
    assert c.delete(f"/v1/stores/{store_id}", headers=h).status_code == 204
    assert not store_path.exists()
    assert c.get(f"/v1/stores/{store_id}", headers=h).status_code == 404
    assert c.get(f"/v1/jobs/{job['id']}", headers=h).status_code == 404


CAPTURE_TOKENS = 640


def test_capture_modes_run_as_requested(api: Api, corpus_slice: Path, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec
    from tests.server.conftest import CAPTURE

    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    topk = api.capture(key, corpus).json()
    # A setting the mode ignores is refused unless it is at its default (then it changes nothing).
    for ignored in ({"coverage": 0.5}, {"draws": 7}, {"head": 8}):  # head: the API used to drop it silently
        refused = api.capture(key, corpus, **ignored)
        name = next(iter(ignored))
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", name]
        assert "applies to mode" in refused.json()["detail"][0]["msg"]
    assert api.capture(key, corpus, coverage=0.99, draws=64, counts_only=False).json()["id"] == topk["id"]
    assert api.capture(key, corpus, mode="sampled", draws=300).status_code == 422
    sampled = api.capture(key, corpus, mode="sampled", draws=12, seed=3)
    assert sampled.status_code == 201 and sampled.json()["settings"]["draws"] == 12
    assert "coverage" not in sampled.json()["settings"]
    assert api.capture(key, corpus, mode="sampled", draws=12, seed=4).json()["id"] != sampled.json()["id"]
    assert not {"counts_only", "head"} & topk["settings"].keys()
    headed = api.capture(key, corpus, mode="sampled", draws=12, seed=3, head=4)
    assert headed.status_code == 201 and headed.json()["settings"]["head"] == 4
    # The job says what the store will: 4 exact ids + min(k, 12 draws) slots, the store's k (below).
    assert (headed.json()["settings"]["k"], headed.json()["slots"]) == (CAPTURE["k"], 4 + min(CAPTURE["k"], 12))
    refused = api.capture(key, corpus, mode="sampled", counts_only=True)  # needs temperatures [1]
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "counts_only"]
    assert "needs temperatures [1]" in refused.text
    counts = api.capture(key, corpus, mode="sampled", draws=12, seed=3, temperatures=[1.0], counts_only=True)
    assert counts.status_code == 201 and counts.json()["settings"]["counts_only"] is True
    worker = Worker(api.settings)
    while worker.run_once() is not None:
        pass

    reference = tmp_path / "reference"
    spec = CaptureSpec(k=CAPTURE["k"], temperatures=CAPTURE["temperatures"], max_len=CAPTURE["max_len"],
                       max_tokens=CAPTURE["max_tokens"], mode="sampled", draws=12, seed=3)
    capture(load_teacher(str(tiny_teacher_dir)), [corpus_slice], str(reference), spec)
    served = api.settings.stores_dir / sampled.json()["store_id"]
    assert verify(str(served)).digest == verify(str(reference)).digest
    info = api.client.get(f"/v1/stores/{sampled.json()['store_id']}", headers=api.auth(key)).json()["info"]
    assert info["meta"]["capture"]["mode"] == "sampled" and info["meta"]["capture"]["draws"] == 12
    spec = spec.model_copy(update={"temperatures": (1.0,), "counts_only": True})
    capture(load_teacher(str(tiny_teacher_dir)), [corpus_slice], str(tmp_path / "counts"), spec)
    served = api.settings.stores_dir / counts.json()["store_id"]
    # Other unit cuts (the server's test settings: 128 tokens) order a token's slots differently; same content.
    assert verify(str(served)).digest == verify(str(tmp_path / "counts")).digest
    headed_store = open_store(str(api.settings.stores_dir / headed.json()["store_id"]))
    assert (headed_store.meta.capture.head, headed_store.meta.capture.k) == (4, headed.json()["slots"])


def test_a_bare_request_captures_the_default_store(api: Api, corpus_slice: Path, tiny_teacher_dir: Path,
                                                  tmp_path: Path) -> None:
    """A request with the corpus alone (the tiny teacher, a short capture) gets the default store of
    issue 22: 64 draws at T=1, at most 64 ids, counts only; the store `logitstore capture` writes
    without mode flags."""
    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec

    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    body = {"corpus_id": corpus, "teacher": "tiny", "max_len": 64, "max_tokens": CAPTURE_TOKENS}
    r = api.client.post("/v1/captures", json=body, headers=api.auth(key))
    assert r.status_code == 201, r.text
    job = r.json()
    settings = job["settings"]
    assert (settings["mode"], settings["draws"], settings["seed"], settings["k"], settings["temperatures"]) == (
        "sampled", 64, 0, 64, [1.0])
    assert settings["counts_only"] is True and job["slots"] == 64 and not {"head", "coverage"} & settings.keys()
    # Asking for it explicitly is the same job; asking for the log-probs is another one.
    same = api.client.post("/v1/captures", json={**body, "counts_only": True}, headers=api.auth(key))
    assert same.status_code == 200 and same.json()["id"] == job["id"]
    with_logp = api.client.post("/v1/captures", json={**body, "counts_only": False}, headers=api.auth(key))
    assert with_logp.status_code == 201 and with_logp.json()["id"] != job["id"]
    assert with_logp.json()["settings"]["counts_only"] is False
    assert Worker(api.settings).run_once() == job["id"]
    done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
    assert done["state"] == "succeeded", done["error"]

    store = open_store(str(api.settings.stores_dir / job["store_id"]))
    cap = store.meta.capture
    assert (cap.mode, cap.draws, cap.seed, cap.k, cap.counts_only, cap.temperatures) == (
        "sampled", 64, 0, 64, True, (1.0,))
    block = store.read(0, store.num_tokens)
    assert store.num_tokens == CAPTURE_TOKENS and block.topk_logp is None
    assert np.all(block.counts.sum(axis=1, dtype=np.int64) == 64)  # 64 slots hold every draw
    local = tmp_path / "local"
    capture(load_teacher(str(tiny_teacher_dir)), [corpus_slice], str(local), CaptureSpec(max_len=64,
                                                                                         max_tokens=CAPTURE_TOKENS))
    assert verify(store.url).digest == verify(str(local)).digest


def test_a_sampled_job_row_without_counts_only_is_a_store_with_logprobs() -> None:
    """Rows from before counts_only was always written (sampled, T=1, no counts_only) were captured
    with log-probs: the worker must read them so, not by the request's rule (unset: counts only)."""
    from logitstore.spec import CaptureSpec
    from server.capture_settings import CaptureRequest, job_capture

    row = {"mode": "sampled", "k": 8, "draws": 12, "seed": 3, "temperatures": [1.0], "max_len": 64,
           "packing": "packed", "max_tokens": 640, "unit_tokens": 128, "batch_tokens": 8192}
    spec, tuning, text_field = job_capture(row)
    assert spec.counts_only is False and (spec.mode, spec.draws, spec.seed, spec.temperatures) == (
        "sampled", 12, 3, (1.0,))
    assert (tuning.unit_tokens, tuning.batch_tokens, text_field) == (128, 8192, None)
    assert job_capture({**row, "counts_only": True})[0].counts_only is True
    assert job_capture({**row, "text_field": "body"})[2] == "body"
    # The same settings as a request, counts_only unset: the counts-only store.
    request = CaptureRequest.model_validate({"corpus_id": "c", **{k: v for k, v in row.items() if k != "unit_tokens"}})
    assert request.spec().counts_only is True and request.job_settings()["counts_only"] is True
    # Every row written now says which it is, and reads back as the spec it was written from.
    for counts_only in (None, True, False):
        asked = CaptureRequest.model_validate({"corpus_id": "c", "counts_only": counts_only})
        written = asked.job_settings()
        assert "counts_only" in written and job_capture(written)[0] == asked.spec() == CaptureSpec.parse(
            {"counts_only": counts_only})
    # A top-k row never had counts_only and has none now.
    topk, _, _ = job_capture({"mode": "topk", "k": 8, "temperatures": [1.0, 2.0], "max_len": 64})
    assert topk.counts_only is False and "counts_only" not in topk.model_dump()


def test_a_legacy_sampled_job_keeps_its_dedup_key_and_its_logprobs(api: Api, corpus_slice: Path) -> None:
    """A sampled T=1 job an earlier server wrote (no counts_only in its row or its dedup key) is found
    again by a request for counts_only false, runs as a store with log-probs, and a request that
    leaves counts_only unset is another job: the counts-only store."""
    import hashlib

    from server.db import Database, Job

    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    asked = {"mode": "sampled", "draws": 12, "seed": 3, "temperatures": [1.0]}
    first = api.capture(key, corpus, **asked, counts_only=False)
    assert first.status_code == 201 and first.json()["settings"]["counts_only"] is False
    legacy = first.json()
    db = Database(api.settings.db_url)
    with db.session() as s:  # the row as an earlier server wrote it
        row = s.get(Job, legacy["id"])
        row.settings = {k: v for k, v in row.settings.items() if k != "counts_only"}
        old_settings, fingerprint, dedup_key = row.settings, row.teacher_fingerprint, row.dedup_key
    db.dispose()
    # The key an earlier server computed: the settings but unit_tokens, with no counts_only among them.
    keyed = {k: v for k, v in old_settings.items() if k != "unit_tokens"}
    assert "counts_only" not in keyed and "draws" in keyed
    assert dedup_key == hashlib.sha256(json.dumps([corpus, fingerprint, keyed], sort_keys=True).encode()).hexdigest()
    again = api.capture(key, corpus, **asked, counts_only=False)
    assert again.status_code == 200 and again.json()["id"] == legacy["id"]
    assert again.json()["slots"] == 8 and "counts_only" not in again.json()["settings"]  # min(k=8, 12 draws)
    counts = api.capture(key, corpus, **asked)
    assert counts.status_code == 201 and counts.json()["id"] != legacy["id"]
    assert counts.json()["settings"]["counts_only"] is True
    worker = Worker(api.settings)
    while worker.run_once() is not None:
        pass
    with_logp = open_store(str(api.settings.stores_dir / legacy["store_id"]))
    assert not with_logp.meta.capture.counts_only and with_logp.read(0, 10).topk_logp is not None
    counts_only = open_store(str(api.settings.stores_dir / counts.json()["store_id"]))
    assert counts_only.meta.capture.counts_only and counts_only.read(0, 10).topk_logp is None
    a, b = with_logp.read(0, with_logp.num_tokens), counts_only.read(0, counts_only.num_tokens)
    np.testing.assert_array_equal(a.counts.sum(axis=1), b.counts.sum(axis=1))  # the same draws, seed 3


@pytest.mark.parametrize(
    "key",
    ["../zarr.json", "..", "a/../../x", "%2e%2e/zarr.json", "%252e%252e/x", "segments/..%2f..%2fx",
     "..\\..\\x", "/etc/passwd", "segments//x", "c:/x"],
)
def test_store_keys_cannot_leave_the_store(api: Api, key: str, corpus_slice: Path) -> None:
    team = api.team("alpha")
    corpus = api.upload(team, corpus_slice.read_bytes()).json()["id"]
    store_id = api.capture(team, corpus).json()["store_id"]
    store = api.settings.stores_dir / store_id
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    (api.settings.stores_dir / "zarr.json").write_text("secret")  # what a traversal would reach
    r = api.client.get(f"/v1/stores/{store_id}/zarr/{key}", headers=api.auth(team))
    assert 400 <= r.status_code < 500, (key, r.status_code)  # httpx may normalize the path first
    assert b"secret" not in r.content
    assert r.headers["content-type"].startswith("application/json")


def test_store_file_ranges(api: Api, corpus_slice: Path) -> None:
    team = api.team("alpha")
    corpus = api.upload(team, corpus_slice.read_bytes()).json()["id"]
    store_id = api.capture(team, corpus).json()["store_id"]
    data = bytes(range(256)) * 40
    (api.settings.stores_dir / store_id / "segments").mkdir(parents=True)
    (api.settings.stores_dir / store_id / "segments" / "blob").write_bytes(data)
    url, h = f"/v1/stores/{store_id}/zarr/segments/blob", api.auth(team)

    def get(rng: str):
        return api.client.get(url, headers={**h, "Range": rng})

    for rng, (a, b) in {"bytes=0-0": (0, 1), "bytes=100-": (100, len(data)), "bytes=-17": (len(data) - 17, len(data)),
                        "bytes=10000-20000": (10000, len(data)), "bytes=-99999": (0, len(data))}.items():
        r = get(rng)
        assert r.status_code == 206 and r.content == data[a:b], rng
        assert r.headers["content-range"] == f"bytes {a}-{b - 1}/{len(data)}"
    for rng in ("bytes=10240-", "bytes=-0"):
        r = get(rng)
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(data)}"
    multi = get("bytes=0-1,5-6")  # Starlette's multipart answer
    assert multi.status_code == 206 and multi.headers["content-type"].startswith("multipart/byteranges")
    whole = api.client.get(url, headers=h)
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"


def test_cancel_queued_job_and_requeue(api: Api, corpus_slice: Path) -> None:
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    job = api.capture(key, corpus).json()
    r = api.client.delete(f"/v1/jobs/{job['id']}", headers=api.auth(key))
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert Worker(api.settings).run_once() is None  # a cancelled job is never claimed
    # The same request again queues the same job once more.
    again = api.capture(key, corpus)
    assert again.status_code == 201 and again.json()["id"] == job["id"] and again.json()["state"] == "queued"


def test_the_corpus_text_field_is_used_and_a_failed_capture_reports_the_error(api: Api) -> None:
    key = api.team("alpha")
    corpus = api.upload(key, b'{"body": "hello there"}\n{"body": "and again"}\n', filename="c.jsonl",
                        text_field="body").json()["id"]
    # The capture request has no text_field: the one given at upload is the corpus's.
    assert api.capture(key, corpus, text_field="missing").status_code == 422
    job = api.capture(key, corpus, max_tokens=None).json()
    assert Worker(api.settings).run_once() == job["id"]
    done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
    assert done["state"] == "succeeded", done["error"]

    # A job row written by the old API, which accepted temperatures [1, 1e-300] and then marked
    # the job succeeded on a store that verify rejects: it loads, and fails with the spec's words.
    from server.db import Database, Job

    legacy = api.capture(key, corpus, k=4).json()
    db = Database(api.settings.db_url)
    with db.session() as s:
        row = s.get(Job, legacy["id"])
        row.settings = {"k": 4, "temperatures": [1e-300, 1.0], "mode": "topk", "max_len": 64, "packing": "packed",
                        "max_tokens": None, "text_field": "body", "unit_tokens": 128, "batch_tokens": 8192}
    db.dispose()
    assert api.client.get(f"/v1/jobs/{legacy['id']}", headers=api.auth(key)).json()["slots"] is None
    assert Worker(api.settings).run_once() == legacy["id"]
    done = api.client.get(f"/v1/jobs/{legacy['id']}", headers=api.auth(key)).json()
    assert done["state"] == "failed" and done["error"].startswith("temperatures: each must be in [0.01, 100]")
    assert str(api.settings.data_dir) not in done["error"]


def test_a_chat_corpus_is_captured_as_the_cli_captures_it(api: Api, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """Chat rows under a field named at upload: the worker renders them with the teacher's chat
    template and keeps soft labels at the assistant positions only, exactly as `logitstore capture`."""
    from logitstore.cli import main as cli_main

    key = api.team("alpha")
    rows = [{"conversation": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
            {"prompt": "What is 2+2?", "completion": "4, of course."}]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    upload = api.upload(key, data, filename="chat.jsonl", messages_field="conversation")
    assert upload.status_code == 201 and upload.json()["messages_field"] == "conversation"
    assert upload.json()["documents"] == 2
    corpus = upload.json()["id"]
    by_default = api.upload(key, data, filename="chat.jsonl")  # read for "messages" (or "text"): neither is there
    assert by_default.status_code == 422 and "chat.jsonl:1: missing field 'text'" in by_default.json()["detail"]
    jobs = {on: api.capture(key, corpus, max_tokens=None, **({} if on == "assistant" else {"train_on": on})).json()
            for on in ("assistant", "all")}  # fmt: skip
    for on, job in jobs.items():
        assert Worker(api.settings).run_once() == job["id"]
        done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
        assert done["state"] == "succeeded", done["error"]
        store = open_store(str(api.settings.stores_dir / job["store_id"]))
        assert store.meta.capture.train_on == on
        assert store.read(0, store.num_tokens).loss_mask.all() == (on == "all")

    (tmp_path / "chat.jsonl").write_bytes(data)
    flags = ["--mode", "topk", "--k", "8", "--temperatures", "1,2", "--max-len", "64", "--unit-tokens", "128",
             "--no-progress"]
    assert cli_main(["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(tmp_path / "chat.jsonl"),
                     "--out", str(tmp_path / "cli"), "--messages-field", "conversation", *flags]) == 0
    served = api.settings.stores_dir / jobs["assistant"]["store_id"]
    assert verify(str(served)).digest == verify(str(tmp_path / "cli")).digest


def test_a_generation_runs_in_the_workers_as_the_cli_runs_it(api: Api, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """"generate" in a capture request: the worker samples the completions and stores the soft labels
    along them, like `logitstore generate`; the request is deduplicated like any capture."""
    from logitstore.cli import main as cli_main

    key = api.team("alpha")
    data = b'{"prompt": "Name a colour."}\n{"text": "Once upon a time"}\n'
    corpus = api.upload(key, data, filename="prompts.jsonl").json()["id"]
    body = dict(max_tokens=None, generate={"n": 2, "max_new_tokens": 8, "seed": 1})
    bad = api.capture(key, corpus, **{**body, "generate": {"n": 2, "top_p": 0}})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "generate", "top_p"]
    job = api.capture(key, corpus, **body)
    assert job.status_code == 201 and api.capture(key, corpus, **body).json()["id"] == job.json()["id"]
    job = job.json()
    assert Worker(api.settings).run_once() == job["id"]
    done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
    assert done["state"] == "succeeded", done["error"]
    served = api.settings.stores_dir / job["store_id"]
    store = open_store(str(served))
    assert store.num_sequences == 4 and len(store.samples()) == 4 and store.meta.capture.train_on == "completion"

    (tmp_path / "prompts.jsonl").write_bytes(data)
    flags = ["--mode", "topk", "--k", "8", "--temperatures", "1,2", "--max-len", "64", "--unit-tokens", "128",
             "--no-progress", "--n", "2", "--max-new-tokens", "8", "--seed", "1", "--device", "cpu"]
    assert cli_main(["generate", "--teacher", str(tiny_teacher_dir), "--prompts", str(tmp_path / "prompts.jsonl"),
                     "--out", str(tmp_path / "cli"), *flags]) == 0
    assert verify(str(served)).digest == verify(str(tmp_path / "cli")).digest


def test_metrics_and_health(api: Api, corpus_slice: Path) -> None:
    assert api.client.get("/healthz").json()["ok"] is True
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    api.capture(key, corpus)
    api.capture(key, corpus, k=4)
    Worker(api.settings).run_once()
    text = api.client.get("/metrics").text
    assert 'logitstore_jobs{state="queued"} 1.0' in text
    assert 'logitstore_jobs{state="succeeded"} 1.0' in text
    assert f"logitstore_tokens_captured_total {float(CAPTURE_TOKENS)}" in text
    assert 'logitstore_request_seconds_count{method="POST",route="/v1/captures",status="201"} 2.0' in text
    np.testing.assert_equal(json.loads(api.client.get("/openapi.json").text)["info"]["title"], "logitstore")


def test_a_max_len_past_the_teacher_context_is_a_422(api: Api, corpus_slice: Path) -> None:
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    refused = api.capture(key, corpus, max_len=513)  # the tiny teacher's config says 512 positions
    assert refused.status_code == 422
    assert refused.json()["detail"] == [{"type": "capture_spec", "loc": ["body", "max_len"],
                                         "msg": "513 tokens exceed the teacher's context length 512; its soft "
                                         "labels past that are not trustworthy"}]
    assert api.capture(key, corpus, max_len=512).status_code == 201


def test_only_the_owner_may_take_back_a_pending_cancel(api: Api, corpus_slice: Path) -> None:
    alpha, beta = api.team("alpha"), api.team("beta")
    corpus = api.upload(alpha, corpus_slice.read_bytes()).json()["id"]
    assert api.upload(beta, corpus_slice.read_bytes()).status_code in (200, 201)
    job = api.capture(alpha, corpus).json()
    assert Worker(api.settings).claim().id == job["id"]  # running, as far as the database knows
    cancel = api.client.delete(f"/v1/jobs/{job['id']}", headers=api.auth(alpha)).json()
    assert cancel["state"] == "running" and cancel["cancel_requested"]
    # Before: beta's identical request silently withdrew alpha's cancel.
    twin = api.capture(beta, corpus)
    assert twin.status_code == 409 and "being cancelled by the team that owns it" in twin.json()["detail"]
    assert api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(alpha)).json()["cancel_requested"]
    # The refused request granted beta nothing: the job stays invisible to it.
    assert api.client.delete(f"/v1/jobs/{job['id']}", headers=api.auth(beta)).status_code == 404
    again = api.capture(alpha, corpus)
    assert again.status_code == 200 and not again.json()["cancel_requested"]


def test_a_team_lists_its_keys_without_secrets(api: Api) -> None:
    c = api.client
    alpha, beta = api.team("alpha"), api.team("beta")
    second = c.post("/v1/teams/alpha/keys", headers=api.auth(alpha)).json()
    assert c.delete(f"/v1/teams/alpha/keys/{second['id']}", headers=api.auth(alpha)).status_code == 204
    listed = c.get("/v1/teams/alpha/keys", headers=api.auth(alpha))
    assert listed.status_code == 200, listed.text
    keys = listed.json()
    assert [k["revoked"] for k in keys] == [False, True] and keys[1]["id"] == second["id"]
    assert all(set(k) == {"id", "created_at", "revoked"} for k in keys) and keys[0]["created_at"].startswith("20")
    assert alpha not in listed.text and second["key"] not in listed.text
    # The admin sees any team's keys; another team sees none of them; the key just revoked sees nothing.
    assert [k["id"] for k in c.get("/v1/teams/alpha/keys", headers=api.auth(ADMIN_KEY)).json()] == [
        k["id"] for k in keys]
    assert c.get("/v1/teams/alpha/keys", headers=api.auth(beta)).status_code == 403
    assert c.get("/v1/teams/alpha/keys", headers=api.auth(second["key"])).status_code == 401
    assert c.get("/v1/teams/nobody/keys", headers=api.auth(ADMIN_KEY)).status_code == 404
    assert c.get("/v1/teams/alpha/keys").status_code == 401


def test_store_info_shows_no_server_paths(api: Api, corpus_slice: Path, tiny_teacher_dir: Path) -> None:
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    job = api.capture(key, corpus).json()
    assert Worker(api.settings).run_once() == job["id"]
    detail = api.client.get(f"/v1/stores/{job['store_id']}", headers=api.auth(key)).json()
    meta = detail["info"]["meta"]
    assert meta["teacher"]["source"] == tiny_teacher_dir.name
    assert meta["corpus"]["sources"] == [f"{corpus}.txt"]
    assert "url" not in detail["info"]

    def strings(value) -> list[str]:
        if isinstance(value, dict):
            return [s for k, v in value.items() for s in (k, *strings(v))]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    server_paths = (str(api.settings.data_dir.resolve()), str(tiny_teacher_dir.resolve()))
    assert not [s for s in strings(detail) if any(p in s for p in server_paths)]


def test_hub_teacher_ids_are_kept() -> None:
    from server.routers.stores import _file_name

    assert _file_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert _file_name("/srv/models/SmolLM2-135M.Q8_0.gguf") == "SmolLM2-135M.Q8_0.gguf"


def test_a_hub_teacher_is_fingerprinted_by_its_resolved_revision(tmp_path: Path, monkeypatch) -> None:
    """Offline, the revision comes from the Hugging Face cache: a new commit under the same id is
    another teacher. (Before: the fingerprint hashed the id alone.)"""
    import huggingface_hub.constants

    from logitstore.errors import TeacherError
    from server.teachers import teacher_fingerprint

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / "models--acme--teacher-7b"

    def publish(commit: str) -> None:  # what a download leaves in the cache
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    with pytest.raises(TeacherError, match="not in the local Hugging Face cache"):
        teacher_fingerprint("acme/teacher-7b")
    publish("a" * 40)
    first = teacher_fingerprint("acme/teacher-7b")
    assert first == teacher_fingerprint("acme/teacher-7b")
    publish("b" * 40)
    assert teacher_fingerprint("acme/teacher-7b") != first


def test_workers_use_cuda_when_present_and_n_gpus_per_job(capsys) -> None:
    """Before: the default was the CPU even on a GPU box, and --gpus-per-job 8 used one device.
    N > 1 runs N rank processes (tests/server/test_worker.py), each on its own GPU."""
    from server.cli import main
    from server.settings import Settings

    assert Settings().device == "auto"  # load_teacher: CUDA when available, else the CPU
    assert (Settings(gpus_per_job=0).device, Settings(gpus_per_job=1).device) == ("cpu", "cuda")
    assert Settings(gpus_per_job=8).device == "auto"  # each rank takes cuda:LOCAL_RANK, or the CPU without CUDA
    assert main(["worker", "--data-dir", "unused", "--gpus-per-job", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: setting gpus_per_job: Input should be greater than or equal to 0"
