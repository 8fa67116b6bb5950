"""The server with an `s3://` storage root, against a real S3 server (moto's, `s3_server` in
tests/conftest.py): captures go straight into the bucket, store files are served from it with
the local route's semantics (Range, ETag, 304, 404, 416, HEAD, traversal refused, large
bodies streamed), info and delete work on it; end to end through `logitstore-server serve`
with its embedded worker (the S3 settings reach it through the environment), and a worker
SIGKILLed mid-capture whose job a new worker resumes in the bucket.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import logitstore
from logitstore.verify import verify
from server.app import create_app
from server.settings import Settings
from server.worker import Worker
from tests.server.conftest import ADMIN_KEY, CAPTURE, Api
from tests.server.test_e2e import ROOT, auth, capture_and_kill_worker, make_team, running, serve, upload, wait_for

CAPTURE_TOKENS = CAPTURE["max_tokens"]


@pytest.fixture
def s3_root(s3_server: dict[str, Any]) -> str:
    """`s3://BUCKET/stores` in a fresh, empty bucket."""
    import s3fs

    bucket = f"t{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_server).mkdir(bucket)
    return f"s3://{bucket}/stores"


@pytest.fixture
def fs(s3_server: dict[str, Any]) -> Any:
    """A synchronous s3fs client that sees the bucket as it is (no listing cache)."""
    import s3fs

    return s3fs.S3FileSystem(**s3_server, skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def s3_api(tmp_path: Path, tiny_teacher_dir: Path, s3_server: dict[str, Any], s3_root: str) -> Iterator[Api]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'test.db'}", admin_key=ADMIN_KEY,
        teachers={"tiny": str(tiny_teacher_dir)}, embedded_worker=False, heartbeat_s=0.2, poll_s=0.1,
        storage_root=s3_root, storage_options=s3_server,
    )
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings)


def test_s3_capture_info_files_and_delete(
    s3_api: Api, fs: Any, s3_server: dict[str, Any], corpus_slice: Path, reference_store: Path
) -> None:
    api, settings = s3_api, s3_api.settings
    key, other = api.team("alpha"), api.team("beta")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    job = api.capture(key, corpus, unit_tokens=CAPTURE_TOKENS).json()  # one segment: fewer requests to moto
    assert Worker(settings).run_once() == job["id"]
    done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
    assert done["state"] == "succeeded" and done["tokens_done"] == CAPTURE_TOKENS, done

    store_id = job["store_id"]
    url = settings.store_url(store_id)
    assert url == f"{settings.storage_root}/{store_id}"
    assert verify(url, storage_options=s3_server).digest == verify(str(reference_store)).digest
    assert not (settings.data_dir / "stores").exists()  # nothing of the store on the local disk
    detail = api.client.get(f"/v1/stores/{store_id}", headers=api.auth(key)).json()
    assert detail["info"]["tokens"] == CAPTURE_TOKENS and detail["info"]["complete"] is True
    assert detail["info"]["disk_bytes"] == fs.du(url, total=True) and "url" not in detail["info"]

    c, h, files = api.client, api.auth(key), f"/v1/stores/{store_id}/zarr"
    full = c.get(f"{files}/zarr.json", headers=h)
    assert full.status_code == 200 and full.content == fs.cat(f"{url}/zarr.json")
    assert full.headers["accept-ranges"] == "bytes"
    etag = full.headers["etag"]
    assert c.get(f"{files}/zarr.json", headers={**h, "If-None-Match": etag}).status_code == 304
    assert c.get(f"{files}/zarr.json", headers={**h, "If-None-Match": '"other"'}).status_code == 200
    shard_key = "segments/000000/lse/c/0/0"
    shard = fs.cat(f"{url}/{shard_key}")
    part = c.get(f"{files}/{shard_key}", headers={**h, "Range": "bytes=10-49"})
    assert part.status_code == 206 and part.content == shard[10:50]
    assert part.headers["content-range"] == f"bytes 10-49/{len(shard)}" and part.headers["etag"]
    suffix = c.get(f"{files}/{shard_key}", headers={**h, "Range": "bytes=-17"})
    assert suffix.status_code == 206 and suffix.content == shard[-17:]
    past = c.get(f"{files}/{shard_key}", headers={**h, "Range": f"bytes={len(shard)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(shard)}"
    # Several ranges, or an If-Range naming another version: the whole object (RFC 9110 allows it).
    for extra in ({"Range": "bytes=0-1,5-6"}, {"Range": "bytes=0-1", "If-Range": '"stale"'}):
        whole = c.get(f"{files}/{shard_key}", headers={**h, **extra})
        assert whole.status_code == 200 and whole.content == shard, extra
    head = c.head(f"{files}/{shard_key}", headers=h)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(shard) and not head.content
    for missing in ("no/such/key", "segments", "segments/000000"):  # no object; "directories" are not files
        assert c.get(f"{files}/{missing}", headers=h).status_code == 404, missing
    for bad in ("segments//x", "%252e%252e/zarr.json", "c:/x", "..\\zarr.json"):  # raw `..`: the live test
        r = c.get(f"{files}/{bad}", headers=h)
        assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/json"), bad
    assert c.get(f"{files}/zarr.json", headers=api.auth(other)).status_code == 404

    # A body above the one-read limit (8 MiB) streams in pieces, whole or as a range.
    big = np.random.default_rng(0).integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()
    fs.pipe_file(f"{url}/segments/big", big)
    r = c.get(f"{files}/segments/big", headers=h)
    assert r.status_code == 200 and r.content == big and int(r.headers["content-length"]) == len(big)
    r = c.get(f"{files}/segments/big", headers={**h, "Range": "bytes=1000-"})
    assert r.status_code == 206 and r.content == big[1000:]

    assert c.delete(f"/v1/stores/{store_id}", headers=h).status_code == 204
    assert not fs.exists(url) and fs.find(url) == []
    assert c.get(f"/v1/stores/{store_id}", headers=h).status_code == 404
    assert c.get(f"{files}/zarr.json", headers=h).status_code == 404


def test_settings_reach_the_worker_through_the_environment(s3_root: str, s3_server: dict[str, Any]) -> None:
    settings = Settings(storage_root=s3_root, storage_options=s3_server)
    env = settings.to_env()
    assert json.loads(env["LOGITSTORE_STORAGE_OPTIONS"]) == s3_server
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        worker = Settings()
    assert (worker.storage_root, worker.storage_options) == (s3_root, s3_server)
    assert not worker.stores_local and worker.store_url("x") == f"{s3_root}/x"
    assert Settings(storage_root=Path("/srv/stores")).store_url("x") == "/srv/stores/x"


@pytest.mark.slow  # ~20 s: a server and its worker process start, capture into moto, read over HTTP
def test_serve_with_s3_storage_root(
    tmp_path: Path, tiny_teacher_dir: Path, s3_root: str, s3_server: dict[str, Any], corpus_slice: Path,
    reference_store: Path, fs: Any,
) -> None:
    s3_flags = ["--storage-root", s3_root, "--storage-options", json.dumps(s3_server)]
    with serve(tmp_path, [f"tiny={tiny_teacher_dir}"], *s3_flags) as client:
        key = make_team(client, "alpha")
        r = client.post("/v1/captures", json={"corpus_id": upload(client, key, corpus_slice), "teacher": "tiny",
                                              **CAPTURE}, headers=auth(key))
        job = wait_for(client, key, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert fs.exists(f"{s3_root}/{job['store_id']}/index.json")
        url = f"{str(client.base_url).rstrip('/')}/v1/stores/{job['store_id']}/zarr"
        remote, local = logitstore.open_store(url, token=key), logitstore.open_store(str(reference_store))
        assert (remote.num_tokens, remote.complete) == (local.num_tokens, True)
        x, y = remote.read(0, remote.num_tokens), local.read(0, local.num_tokens)
        for name in ("input_ids", "topk_ids", "topk_logp", "lse"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
        report = verify(url, storage_options={"headers": auth(key)})
        assert report.ok and report.digest == verify(str(reference_store)).digest
        # Traversal, sent unnormalized: refused before the bucket is asked.
        conn = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=10)
        for raw in ("../zarr.json", "%2e%2e/zarr.json", "segments/../../zarr.json", "./zarr.json"):
            conn.request("GET", f"/v1/stores/{job['store_id']}/zarr/{raw}", headers=auth(key))
            response = conn.getresponse()
            assert (response.status, b"zarr_format" in response.read()) == (400, False), raw
        conn.close()
    assert not (tmp_path / "data" / "stores").exists()


@pytest.mark.slow  # ~40 s: two worker processes, 8 segments into moto, a local twin
def test_sigkilled_worker_resumes_in_the_bucket(
    tmp_path: Path, tiny_teacher_dir: Path, s3_root: str, s3_server: dict[str, Any], fs: Any
) -> None:
    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec, CaptureTuning

    corpus = ROOT / "examples" / "data" / "tinyshakespeare.txt"
    settings = {"mode": "topk", "k": 8, "temperatures": [1.0, 2.0], "max_len": 128, "max_tokens": 2000,
                "unit_tokens": 256}
    s3_flags = ["--storage-root", s3_root, "--storage-options", json.dumps(s3_server)]
    worker_args = ["worker", "--data-dir", str(tmp_path / "data"), "--teacher", f"tiny={tiny_teacher_dir}",
                   "--heartbeat-s", "0.5", "--stale-after-s", "3", *s3_flags]
    with serve(tmp_path, [f"tiny={tiny_teacher_dir}"], "--no-worker", *s3_flags) as client:
        key = make_team(client, "alpha")
        job_id = capture_and_kill_worker(client, key, corpus, settings, worker_args, tmp_path, after_tokens=600)
        store_url = f"{s3_root}/{client.get(f'/v1/jobs/{job_id}', headers=auth(key)).json()['store_id']}"
        assert not fs.exists(f"{store_url}/index.json")
        with running(worker_args, {}, tmp_path / "worker2.log"):
            job = wait_for(client, key, job_id)
        assert (job["state"], job["attempts"]) == ("succeeded", 2), job
        detail = client.get(f"/v1/stores/{job['store_id']}", headers=auth(key)).json()
        assert detail["info"]["complete"] and detail["info"]["tokens"] == 2000

    reference = tmp_path / "uninterrupted"
    spec = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=128, max_tokens=2000)
    capture(load_teacher(str(tiny_teacher_dir)), [corpus], str(reference), spec, tuning=CaptureTuning(unit_tokens=256))
    resumed = verify(store_url, storage_options=s3_server)
    assert resumed.ok and resumed.digest == verify(str(reference)).digest
