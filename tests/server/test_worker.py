"""The job queue on SQLite and a real PostgreSQL: atomic claims by racing workers, reclaim of
a job whose worker went silent (or keeps dying), cancellation of a running job, and a worker
that outlives database errors and stops when its lease runs out."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from logitstore import open_store
from logitstore.verify import verify
from server.db import Database, Job
from server.worker import Worker, physical_device, teacher_devices
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


def test_a_job_on_two_ranks_writes_the_store_of_one_process(make_settings, api: Api, corpus_slice: Path,
                                                               reference_store: Path) -> None:
    """gpus_per_job 2: two rank processes (gloo on CPU) split the units; same digest, job fully counted."""
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    job = api.capture(key, corpus).json()
    worker = Worker(make_settings(gpus_per_job=2))
    assert worker.run_once() == job["id"]
    done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
    assert done["state"] == "succeeded", done
    assert done["tokens_done"] == done["tokens_total"] == 640 and done["devices"] == ["cpu", "cpu"]
    store = api.settings.stores_dir / job["store_id"]
    assert len(open_store(str(store)).segments) > 2  # several units, dealt to both ranks
    assert verify(str(store)).digest == verify(str(reference_store)).digest
    worker.db.dispose()


def test_a_worker_places_its_teacher_by_device_map(make_settings, api: Api, corpus_slice: Path,
                                                   reference_store: Path) -> None:
    """teacher_device_map: the job runs on a teacher loaded with accelerate's placement (on a machine
    without GPUs transformers keeps it whole on the CPU) and writes the reference store."""
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    job = api.capture(key, corpus).json()
    worker = Worker(make_settings(teacher_device_map="auto"))
    assert worker.run_once() == job["id"]
    done = api.client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json()
    assert (done["state"], done["devices"]) == ("succeeded", ["cpu"]), done
    assert verify(str(api.settings.stores_dir / job["store_id"])).digest == verify(str(reference_store)).digest
    with pytest.raises(ValidationError, match="give one of them"):
        make_settings(teacher_device_map="auto", gpus_per_job=2)
    worker.db.dispose()


def test_cancelling_a_job_on_two_ranks_ends_both(make_settings, api: Api, corpus_slice: Path) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    worker = Worker(make_settings(gpus_per_job=2))
    job = worker.claim()
    api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth(key))
    worker.execute(job)  # stops at its first progress check, while the ranks still load the teacher
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert (r["state"], r["error"]) == ("cancelled", "cancelled by request")
    assert multiprocessing.active_children() == []  # no rank left running
    worker.db.dispose()


def test_a_teacher_placed_by_a_device_map_shows_where_its_layers_went(tiny_teacher_dir, tmp_path) -> None:
    from logitstore.capture.teacher import load_teacher

    offloaded = load_teacher(str(tiny_teacher_dir), device_map="auto", max_memory={"cpu": "64KB"},
                             offload_folder=str(tmp_path))  # fmt: skip
    assert teacher_devices(offloaded.model) == ["disk"]
    assert teacher_devices(load_teacher(str(tiny_teacher_dir)).model) == ["cpu"]


def test_devices_are_named_as_the_machine_numbers_them(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [physical_device(d) for d in ("cuda:0", "cuda:1", "cuda:2", "cpu")] == ["cuda:4", "cuda:6", "cuda:2", "cpu"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5f1c")  # UUIDs: no index to map
    assert physical_device("cuda:0") == "cuda:0"


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


class _FlakyHeartbeat(Worker):
    """A worker whose first `failures` heartbeats (all of them with None) hit a database error."""

    def __init__(self, settings, failures: int | None, **kw) -> None:
        super().__init__(settings, **kw)
        self.failures, self.beats = failures, 0

    def _beat(self, job_id: str) -> bool:
        self.beats += 1
        if self.failures is None or self.beats <= self.failures:
            raise OperationalError("UPDATE jobs ...", {}, Exception("database is locked"))
        return super()._beat(job_id)


def test_the_heartbeat_outlives_database_errors(make_settings, api: Api, corpus_slice: Path) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    worker = _FlakyHeartbeat(make_settings(heartbeat_s=0.005), failures=3)
    worker.execute(worker.claim())
    assert worker.beats > 3  # still beating after the errors
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["state"] == "succeeded"
    worker.db.dispose()


def test_a_worker_whose_lease_runs_out_stops_and_its_job_is_reclaimed(
    make_settings, api: Api, corpus_slice: Path
) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    settings = make_settings(stale_after_s=0.02, heartbeat_s=0.005)  # a 10 ms lease
    cut_off = _FlakyHeartbeat(settings, failures=None, worker_id="cut-off")
    cut_off.execute(cut_off.claim())  # loading the teacher alone outlasts the lease: stops at the first report
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert (r["state"], r["tokens_done"], r["error"]) == ("running", 0, None)  # left as it was, for a reclaim
    other = Worker(make_settings(stale_after_s=0.5, heartbeat_s=0.05), worker_id="other")
    time.sleep(0.5)  # the cut-off worker's last heartbeat, at its claim, is now stale for the other
    assert other.run_once() == job_id
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert (r["state"], r["attempts"]) == ("succeeded", 2)
    cut_off.db.dispose()
    other.db.dispose()


def test_a_job_that_keeps_killing_its_worker_is_failed_then_can_be_requested_again(
    make_settings, api: Api, corpus_slice: Path
) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    settings = make_settings(max_attempts=2)
    worker = Worker(settings)
    for _ in range(2):  # claimed, then its worker dies (the heartbeat goes stale)
        assert worker.claim().id == job_id
        with worker.db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=Job.heartbeat_at - 3600))
    assert worker.claim() is None
    r = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()
    assert (r["state"], r["attempts"]) == ("failed", 2)
    assert "stopped responding on each of 2 attempts" in r["error"]
    corpus_id = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["corpus_id"]
    again = api.capture(key, corpus_id, k=1)
    assert again.status_code == 201 and (again.json()["id"], again.json()["state"], again.json()["attempts"]) == (
        job_id, "queued", 0)
    assert worker.run_once() == job_id
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["state"] == "succeeded"
    worker.db.dispose()


def test_the_polling_loop_outlives_database_errors(make_settings) -> None:
    class FlakyClaims(Worker):
        calls = 0

        def claim(self):
            self.calls += 1
            if self.calls == 1:
                raise OperationalError("SELECT jobs ...", {}, Exception("server closed the connection"))
            self.stop.set()
            return None

    worker = FlakyClaims(make_settings(poll_s=0.01))
    worker.run()  # returns once stopped, not at the first error
    assert worker.calls == 2
    worker.db.dispose()


def test_requesting_a_capture_again_withdraws_its_pending_cancel(api: Api, corpus_slice: Path) -> None:
    key, [job_id] = _queue_jobs(api, corpus_slice, 1)
    worker = Worker(api.settings)
    job = worker.claim()
    assert api.client.delete(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["cancel_requested"] is True
    corpus_id = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["corpus_id"]
    again = api.capture(key, corpus_id, k=1)
    assert (again.status_code, again.json()["id"], again.json()["cancel_requested"]) == (200, job_id, False)
    worker.execute(job)
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.auth(key)).json()["state"] == "succeeded"
    worker.db.dispose()


def test_a_heartbeat_slower_than_the_lease_is_refused(make_settings) -> None:
    with pytest.raises(ValidationError, match=r"heartbeat_s \(30\) must be below half of stale_after_s \(60\)"):
        make_settings(heartbeat_s=30, stale_after_s=60)
