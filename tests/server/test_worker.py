"""The job queue on SQLite and a real PostgreSQL: atomic claims by racing workers, reclaim of
a job whose worker went silent, and cancellation of a running job."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import update

from server.db import Database, Job
from server.worker import Worker
from tests.server.conftest import Api


def _queue_jobs(api: Api, corpus_slice: Path, n: int) -> tuple[str, list[str]]:
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    return key, [api.capture(key, corpus, k=k).json()["id"] for k in range(1, n + 1)]


def test_racing_workers_claim_each_job_exactly_once(api: Api, corpus_slice: Path) -> None:
    _, jobs = _queue_jobs(api, corpus_slice, 12)
    workers = [Worker(api.settings, worker_id=f"w{i}") for i in range(4)]
    claimed: dict[str, list[str]] = {w.id: [] for w in workers}
    start = threading.Barrier(len(workers))

    def drain(w: Worker) -> None:
        start.wait()
        while (job := w.claim()) is not None:
            claimed[w.id].append(job.id)

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [j for ids in claimed.values() for j in ids]
    assert sorted(everything) == sorted(jobs)  # all claimed, none twice
    for w in workers:
        w.db.dispose()
    db = Database(api.settings.db_url)
    with db.session() as s:
        rows = [s.get(Job, j) for j in jobs]
        assert {(r.state, r.attempts) for r in rows} == {("running", 1)}
        assert all(r.id in claimed[r.worker_id] for r in rows)
    db.dispose()


def test_a_silent_workers_job_is_reclaimed(make_settings, api: Api, corpus_slice: Path) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    settings = make_settings(stale_after_s=30)
    dead, alive = Worker(settings, worker_id="dead"), Worker(settings, worker_id="alive")
    assert dead.claim().id == job_id
    assert alive.claim() is None  # its heartbeat is fresh
    with dead.db.session() as s:  # the dead worker's last heartbeat was a minute ago
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=Job.heartbeat_at - 60))
    job = alive.claim()
    assert job.id == job_id
    alive.execute(job)  # resumes (here: starts) the capture and finishes it
    dead._finish(job_id, "failed", "a late message from the presumed-dead worker")  # ignored: not its job now
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert (r["state"], r["attempts"], r["error"]) == ("succeeded", 2, None)
    dead.db.dispose()
    alive.db.dispose()


def test_cancel_a_running_job(api: Api, corpus_slice: Path) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    worker = Worker(api.settings)
    job = worker.claim()
    r = api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert (r["state"], r["cancel_requested"]) == ("running", True)
    worker.execute(job)  # stops at its first progress report
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert (r["state"], r["error"], r["cancel_requested"]) == ("cancelled", "cancelled by request", False)
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["state"] == "cancelled"
    worker.db.dispose()


def test_a_stopping_worker_hands_its_job_back(api: Api, corpus_slice: Path) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    worker = Worker(api.settings)
    job = worker.claim()
    worker.stop.set()  # what SIGTERM does: the capture stops at its next progress report
    worker.execute(job)
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert r["state"] == "queued"
    other = Worker(api.settings)
    assert other.run_once() == job_id  # picked up at once, no heartbeat timeout to wait for
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["state"] == "succeeded"
    worker.db.dispose()
    other.db.dispose()
