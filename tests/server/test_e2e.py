"""End to end through a real `logitstore-server serve` (uvicorn on a loopback port, embedded
worker process): upload, capture, poll, and read the store over HTTP with `open_store`,
compared with a local capture of the same corpus and settings; the auth matrix; raw
path-traversal requests; and a worker SIGKILLed mid-capture whose job a new worker finishes.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

import logitstore
from logitstore.errors import NotAStoreError
from logitstore.verify import verify
from tests.server.conftest import ADMIN_KEY, CAPTURE, free_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", *args], env={**os.environ, **env}, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def serve(tmp: Path, teachers: list[str], *extra: str) -> Iterator[httpx.Client]:
    port = free_port()
    args = ["serve", "--port", str(port), "--data-dir", str(tmp / "data"), "--heartbeat-s", "0.5",
            *(f for t in teachers for f in ("--teacher", t)), *extra]
    with running(args, {"LOGITSTORE_ADMIN_KEY": ADMIN_KEY}, tmp / "server.log") as proc:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        try:
            yield client
        finally:
            client.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_team(client: httpx.Client, name: str) -> str:
    assert client.post("/v1/teams", json={"name": name}, headers=auth(ADMIN_KEY)).status_code == 201
    return client.post(f"/v1/teams/{name}/keys", headers=auth(ADMIN_KEY)).json()["key"]


def upload(client: httpx.Client, key: str, path: Path) -> str:
    with path.open("rb") as f:
        r = client.post("/v1/corpora", params={"filename": path.name}, content=f, headers=auth(key))
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def wait_for(client: httpx.Client, key: str, job_id: str, states=("succeeded", "failed", "cancelled"),
             timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job still {job['state']}: {job}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> Iterator[httpx.Client]:
    with serve(tmp_path_factory.mktemp("live"), [f"tiny={tiny_teacher_dir}"]) as client:
        yield client


def test_capture_over_http_equals_local_capture(live: httpx.Client, corpus_slice: Path, reference_store: Path) -> None:
    key, other = make_team(live, "alpha"), make_team(live, "beta")
    corpus = upload(live, key, corpus_slice)
    r = live.post("/v1/captures", json={"corpus_id": corpus, "teacher": "tiny", **CAPTURE}, headers=auth(key))
    assert r.status_code == 201, r.text
    job = wait_for(live, key, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["tokens_done"] == job["tokens_total"] == CAPTURE["max_tokens"]

    url = f"{str(live.base_url).rstrip('/')}/v1/stores/{job['store_id']}/zarr"
    remote, local = logitstore.open_store(url, token=key), logitstore.open_store(str(reference_store))
    assert (remote.num_tokens, remote.num_sequences, remote.complete) == (local.num_tokens, local.num_sequences, True)
    for a, b in [(0, 100), (123, 517), (0, remote.num_tokens)]:
        x, y = remote.read(a, b), local.read(a, b)
        for name in ("input_ids", "topk_ids", "topk_logp", "lse"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=name)
    np.testing.assert_array_equal(remote.sequence(3).topk_ids, local.sequence(3).topk_ids)
    remote_report = verify(url, storage_options={"headers": auth(key)})
    assert remote_report.ok and remote_report.digest == verify(str(reference_store)).digest

    # The auth matrix, over the network.
    store = job["store_id"]
    assert live.get(f"/v1/stores/{store}").status_code == 401
    assert live.get(f"/v1/stores/{store}/zarr/zarr.json").status_code == 401
    for path in (f"/v1/stores/{store}", f"/v1/stores/{store}/zarr/zarr.json", f"/v1/jobs/{job['id']}"):
        assert live.get(path, headers=auth(other)).status_code == 404, path
    assert live.delete(f"/v1/stores/{store}", headers=auth(other)).status_code == 404
    with pytest.raises(NotAStoreError, match="no such store, or not shared with your team"):
        logitstore.open_store(url, token=other)
    assert live.post(f"/v1/stores/{store}/grants", json={"team": "beta"}, headers=auth(key)).status_code == 201
    assert logitstore.open_store(url, token=other).read(0, 10).topk_ids.shape == (10, CAPTURE["k"])
    assert live.delete(f"/v1/stores/{store}", headers=auth(other)).status_code == 403
    assert live.delete(f"/v1/jobs/{job['id']}", headers=auth(other)).status_code == 403
    assert live.delete(f"/v1/stores/{store}/grants/beta", headers=auth(key)).status_code == 204
    assert live.get(f"/v1/stores/{store}/zarr/zarr.json", headers=auth(other)).status_code == 404

    # Cancel: a second, different capture, cancelled while queued or running, ends cancelled.
    r = live.post("/v1/captures", json={"corpus_id": corpus, "teacher": "tiny", **CAPTURE, "k": 3},
                  headers=auth(key)).json()
    live.delete(f"/v1/jobs/{r['id']}", headers=auth(key))
    assert wait_for(live, key, r["id"], states=("cancelled", "succeeded"))["state"] in ("cancelled", "succeeded")


def test_trainer_streams_and_trains_from_the_server(
    live: httpx.Client, corpus_slice: Path, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """StoreDataset over the server's URL (opened lazily inside a DataLoader worker) yields the
    batches it yields from a local capture with the same segments; a short training run reads
    and evaluates over HTTP."""
    import torch
    from transformers import LlamaConfig

    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec, CaptureTuning
    from trainer.data import StoreDataset, make_loader
    from trainer.train import TrainConfig, train

    # The data order follows the segments (reads are chunk-aligned runs inside one), so the
    # local twin is cut into the same units as the server's.
    local_store = tmp_path / "local"
    spec = CaptureSpec.parse({name: value for name, value in CAPTURE.items() if name != "unit_tokens"})
    capture(load_teacher(str(tiny_teacher_dir)), [corpus_slice], str(local_store), spec,
            tuning=CaptureTuning(unit_tokens=CAPTURE["unit_tokens"]))

    key = make_team(live, "trainers")
    corpus = upload(live, key, corpus_slice)
    r = live.post("/v1/captures", json={"corpus_id": corpus, "teacher": "tiny", **CAPTURE}, headers=auth(key))
    job = wait_for(live, key, r.json()["id"])
    assert job["state"] == "succeeded", job
    url = f"{str(live.base_url).rstrip('/')}/v1/stores/{job['store_id']}/zarr"

    def batches(store: str, token: str | None) -> list[dict]:
        ds = StoreDataset(store, seq_len=32, batch_size=4, seed=3, token=token)
        it = iter(make_loader(ds, num_workers=1))
        return [next(it) for _ in range(6)]

    for remote, local in zip(batches(url, key), batches(str(local_store), None), strict=True):
        assert remote.keys() == local.keys()
        for name in remote:
            assert torch.equal(remote[name], local[name]), name
    with pytest.raises(NotAStoreError, match=r"access refused \(401\).*API key"):
        next(iter(make_loader(StoreDataset(url, seq_len=32, batch_size=4, token="wrong-key"))))

    student = tmp_path / "student.json"
    LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True).to_json_file(str(student))
    cfg = TrainConfig(store=url, token=key, student=str(student), out=str(tmp_path / "run"), steps=3, batch_size=4,
                      seq_len=32, warmup_steps=1, save_every=0, eval_store=url, eval_tokens=256, device="cpu")
    final = train(cfg, progress=False)
    assert (final / "config.json").is_file()
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"eval_kl"' in records and key not in (tmp_path / "run" / "config.json").read_text()


@pytest.mark.parametrize(
    "raw",
    ["../zarr.json", "../../../../etc/passwd", "%2e%2e/zarr.json", "%2E%2E%2Fzarr.json", "..%2fzarr.json",
     "%252e%252e/zarr.json", "..\\zarr.json", "..%5czarr.json", "/etc/passwd", "%2fetc%2fpasswd", "./../zarr.json",
     "segments/../../zarr.json", "%00zarr.json"],
)
def test_raw_traversal_requests_are_refused(live: httpx.Client, corpus_slice: Path, raw: str) -> None:
    key = _traversal_key(live, corpus_slice)
    store = live.get("/v1/stores", headers=auth(key)).json()[0]["id"]
    conn = http.client.HTTPConnection(live.base_url.host, live.base_url.port, timeout=10)
    conn.request("GET", f"/v1/stores/{store}/zarr/{raw}", headers=auth(key))  # sent as is, no normalization
    r = conn.getresponse()
    body = r.read()
    assert r.status in (400, 404), (raw, r.status, body)
    assert b"root:" not in body and b"logitstore" not in body


_teams: dict[str, str] = {}


def _traversal_key(live: httpx.Client, corpus_slice: Path) -> str:
    """One team with one finished store, shared by the traversal cases."""
    if "key" not in _teams:
        key = make_team(live, "traversal")
        corpus = upload(live, key, corpus_slice)
        r = live.post("/v1/captures", json={"corpus_id": corpus, "teacher": "tiny", **CAPTURE, "k": 2},
                      headers=auth(key))
        assert wait_for(live, key, r.json()["id"])["state"] == "succeeded"
        _teams["key"] = key
    return _teams["key"]


@pytest.mark.slow  # ~15 s: two API processes, one capture
def test_several_http_workers_share_one_capture_worker(
    tmp_path: Path, tiny_teacher_dir: Path, corpus_slice: Path, reference_store: Path
) -> None:
    """`serve --http-workers 2`: two API processes answer (uvicorn logs each one's pid), one
    capture worker runs the job, and the store reads back over HTTP as the local capture."""
    with serve(tmp_path, [f"tiny={tiny_teacher_dir}"], "--http-workers", "2") as client:
        key = make_team(client, "alpha")
        r = client.post("/v1/captures", json={"corpus_id": upload(client, key, corpus_slice), "teacher": "tiny",
                                              **CAPTURE}, headers=auth(key))
        job = wait_for(client, key, r.json()["id"])
        assert job["state"] == "succeeded", job
        url = f"{str(client.base_url).rstrip('/')}/v1/stores/{job['store_id']}/zarr"
        assert verify(url, storage_options={"headers": auth(key)}).digest == verify(str(reference_store)).digest
    log = (tmp_path / "server.log").read_text()
    assert len(set(re.findall(r"Started server process \[(\d+)\]", log))) == 2, log
    assert len(re.findall(r"worker \S+ polling", log)) == 1, log


def capture_and_kill_worker(
    client: httpx.Client, key: str, corpus: Path, settings: dict, worker_args: list[str], tmp_path: Path,
    after_tokens: int,
) -> str:
    """Request a capture, run one worker until it has committed `after_tokens`, SIGKILL it, and
    check that the job is left running and unfinished; returns the job id."""
    job_id = client.post("/v1/captures", json={"corpus_id": upload(client, key, corpus), "teacher": "tiny",
                                               **settings}, headers=auth(key)).json()["id"]
    with running(worker_args, {}, tmp_path / "worker1.log") as first:
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json())["tokens_done"] < after_tokens:
            assert time.monotonic() < deadline and job["state"] in ("queued", "running"), job
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
    assert killed_at["state"] == "running" and killed_at["tokens_done"] < killed_at["tokens_total"], killed_at
    return job_id


@pytest.mark.slow
def test_sigkilled_worker_job_is_resumed_by_a_new_worker(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec, CaptureTuning

    corpus = ROOT / "examples" / "data" / "tinyshakespeare.txt"
    settings = {"mode": "topk", "k": 8, "temperatures": [1.0, 2.0], "max_len": 128, "max_tokens": 6000,
                "unit_tokens": 256}
    worker_args = ["worker", "--data-dir", str(tmp_path / "data"), "--teacher", f"tiny={tiny_teacher_dir}",
                   "--heartbeat-s", "0.5", "--stale-after-s", "3"]
    with serve(tmp_path, [f"tiny={tiny_teacher_dir}"], "--no-worker") as client:
        key = make_team(client, "alpha")
        job_id = capture_and_kill_worker(client, key, corpus, settings, worker_args, tmp_path, after_tokens=1000)
        with running(worker_args, {}, tmp_path / "worker2.log"):
            job = wait_for(client, key, job_id)
        assert (job["state"], job["attempts"]) == ("succeeded", 2), job
        store = tmp_path / "data" / "stores" / job["store_id"]

    reference = tmp_path / "uninterrupted"
    spec = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=128, max_tokens=6000)
    capture(load_teacher(str(tiny_teacher_dir)), [corpus], str(reference), spec, tuning=CaptureTuning(unit_tokens=256))
    resumed = verify(str(store))
    assert resumed.ok and resumed.digest == verify(str(reference)).digest


@pytest.mark.slow
def test_smollm2_capture_through_the_server(tmp_path: Path, smollm2_teacher, corpus_slice: Path) -> None:
    from logitstore.capture.engine import capture
    from logitstore.spec import CaptureSpec

    settings = {"mode": "topk", "k": 16, "temperatures": [1.0, 2.0], "max_len": 128, "max_tokens": 200}
    with serve(tmp_path, ["smollm2-135m=smollm2-135m"]) as client:
        key = make_team(client, "alpha")
        r = client.post("/v1/captures", json={"corpus_id": upload(client, key, corpus_slice),
                                              "teacher": "smollm2-135m", **settings}, headers=auth(key))
        job = wait_for(client, key, r.json()["id"])
        assert job["state"] == "succeeded", job
        url = f"{str(client.base_url).rstrip('/')}/v1/stores/{job['store_id']}/zarr"
        remote = verify(url, storage_options={"headers": auth(key)})
    local = tmp_path / "local"
    capture(smollm2_teacher, [corpus_slice], str(local), CaptureSpec(mode="topk", k=16, temperatures=(1.0, 2.0),
                                                                     max_len=128, max_tokens=200))
    assert remote.ok and remote.tokens == 200 and remote.digest == verify(str(local)).digest
