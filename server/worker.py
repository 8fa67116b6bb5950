"""The worker: claims capture jobs from the database and runs them.

Claiming is atomic, so any number of workers on any number of machines can share one
database: PostgreSQL hands each worker a different row with `FOR UPDATE SKIP LOCKED`;
SQLite (one box) does it with a single guarded `UPDATE ... WHERE state = 'queued'`,
which only one writer can win. A running job's worker refreshes its heartbeat from a
thread; a job whose heartbeat is older than `stale_after_s` is claimed again by another
worker and resumed from its committed segments (the capture is deterministic, so the
finished store is the one an uninterrupted run would have written). A job whose worker went
silent on its `max_attempts`-th claim (a teacher that kills its worker, say out of memory) is
failed instead of being claimed forever.

The heartbeat is also this worker's lease on the job: a worker whose beats have not reached
the database for `stale_after_s / 2` stops at its next progress report, before another worker
may take the job over and remove the segment it would otherwise still be writing. A database
error neither kills the heartbeat nor the worker: both log it and try again.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, or_, select, update

from logitstore import storage
from logitstore.errors import LogitStoreError
from server.capture_settings import job_capture
from server.db import Corpus, Database, Job, now
from server.settings import Settings
from server.teachers import teacher_fingerprint, teacher_source

log = logging.getLogger(__name__)

# Progress (tokens done, rate, ETA) and the cancel flag go through the job row at most this often.
PROGRESS_WRITE_S = 1.0


class JobCancelled(Exception):
    """The job's owner asked to cancel it."""


class JobLost(Exception):
    """Another worker took the job over (this one was presumed dead)."""


class WorkerStopping(Exception):
    """The worker was asked to stop; the job goes back to the queue."""


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    corpus_path: Path
    teacher: str
    teacher_fingerprint: str
    settings: dict
    store_id: str
    text_field: str  # the corpus's, given at upload
    messages_field: str  # the corpus's chat rows' field, given at upload


class Worker:
    """Runs jobs one at a time. `run()` loops until `stop` is set; `run_once()` does one job."""

    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.db = Database(settings.db_url)
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stop = threading.Event()
        self._teachers: dict[tuple[str, str], object] = {}  # (source, dtype) -> loaded Teacher, reused
        self._lease_until = 0.0  # time.monotonic() until which the running job is surely still ours

    def run(self) -> None:
        self.db.migrate()
        log.info("worker %s polling %s", self.id, self.settings.db_url.split("@")[-1])
        while not self.stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the database went away: a job left running is reclaimed once stale
                log.exception("worker %s: polling failed; retrying in %.0f s", self.id, self.settings.poll_s)
                ran = None
            if ran is None:
                self.stop.wait(self.settings.poll_s)

    def run_once(self) -> str | None:
        """Claim and run one job; its id, or None when nothing was claimable."""
        job = self.claim()
        if job is not None:
            self.execute(job)
        return job and job.id

    def claim(self) -> ClaimedJob | None:
        cutoff = now() - self.settings.stale_after_s
        stale = and_(Job.state == "running", Job.heartbeat_at < cutoff)
        claimable = or_(Job.state == "queued", and_(stale, Job.attempts < self.settings.max_attempts))
        taken = {"state": "running", "worker_id": self.id, "heartbeat_at": now(), "attempts": Job.attempts + 1}
        with self.db.session() as s:
            s.execute(
                update(Job).where(stale, Job.attempts >= self.settings.max_attempts).values(
                    state="failed", finished_at=now(), cancel_requested=False,
                    error=f"its worker stopped responding on each of {self.settings.max_attempts} attempts (killed, "
                    "for example out of memory); the committed part of the store is kept: request the capture "
                    "again to resume it",
                )
            )  # fmt: skip
            if self.db.is_postgresql:
                job = s.scalar(
                    select(Job).where(claimable).order_by(Job.created_at).limit(1).with_for_update(skip_locked=True)
                )
                if job is None:
                    return None
                s.execute(update(Job).where(Job.id == job.id).values(**taken, started_at=job.started_at or now()))
            else:
                job = None
                for job_id in s.scalars(select(Job.id).where(claimable).order_by(Job.created_at).limit(16)):
                    won = s.execute(update(Job).where(Job.id == job_id, claimable).values(**taken)).rowcount
                    if won:
                        job = s.get(Job, job_id)
                        break
                if job is None:
                    return None
                s.refresh(job)
                job.started_at = job.started_at or now()
            corpus = s.get(Corpus, job.corpus_id)
            claimed = ClaimedJob(
                id=job.id,
                corpus_path=self.settings.corpora_dir / f"{corpus.id}{corpus.suffix}",
                teacher=job.teacher,
                teacher_fingerprint=job.teacher_fingerprint,
                settings=dict(job.settings),
                store_id=job.store_id,
                text_field=corpus.text_field,
                messages_field=corpus.messages_field,
            )
        log.info("worker %s claimed job %s", self.id, claimed.id)
        return claimed

    def execute(self, job: ClaimedJob) -> None:
        """Run the capture; the job ends succeeded, failed or cancelled (or back in the queue on stop)."""
        beat = threading.Event()
        self._lease_until = time.monotonic() + self.settings.stale_after_s / 2  # just claimed
        heart = threading.Thread(target=self._heartbeat, args=(job.id, beat), daemon=True, name="heartbeat")
        heart.start()
        try:
            self._capture(job)
            self._finish(job.id, "succeeded", None)
        except JobCancelled:
            self._finish(job.id, "cancelled", "cancelled by request")
        except JobLost:
            log.warning("job %s was taken over by another worker; leaving it", job.id)
        except WorkerStopping:
            self._requeue(job.id)
        except LogitStoreError as e:  # the user's to fix; the corpus is named by its file name, not our path
            self._finish(job.id, "failed", str(e).replace(str(job.corpus_path), job.corpus_path.name))
        except Exception as e:
            log.exception("job %s failed", job.id)
            self._finish(job.id, "failed", f"internal error: {type(e).__name__}: {e}")
        finally:
            beat.set()
            heart.join()

    def _capture(self, job: ClaimedJob) -> None:
        # No progress bars in worker logs (teacher loading, GGUF de-quantization: the job row has
        # the progress). tqdm reads TQDM_* once, on import, which the first capture triggers here.
        os.environ.setdefault("TQDM_DISABLE", "1")
        # torch loads only in the process that captures.
        from transformers.utils import logging as hf_logging

        from logitstore.capture.engine import CaptureProgress, capture
        from logitstore.capture.generate import generate
        from logitstore.capture.teacher import load_teacher

        hf_logging.disable_progress_bar()

        source = teacher_source(self.settings.teachers, job.teacher)
        if teacher_fingerprint(source) != job.teacher_fingerprint:
            raise LogitStoreError(
                f"worker {self.id} has a different teacher {job.teacher!r} ({source}) than the one the job was "
                "requested for; give every worker the same teacher files"
            )
        # A job row older than corpora keeping their text_field carries its own.
        spec, tuning, legacy_text_field = job_capture(job.settings)
        ranks = self.settings.gpus_per_job or 1
        if ranks > 1:
            from server.job_ranks import rank_devices, run_ranks

            devices = rank_devices(ranks)
        else:
            if (source, spec.dtype) not in self._teachers:
                self._teachers[source, spec.dtype] = load_teacher(
                    source, device=self.settings.device, dtype=spec.dtype, device_map=self.settings.teacher_device_map
                )
            devices = teacher_devices(self._teachers[source, spec.dtype].model)
        self._record_devices(job.id, [physical_device(d) for d in devices])
        out, options = self.settings.store_url(job.store_id), self.settings.storage_options
        resume = storage.key_exists(storage.open_kv(out, read_only=True, storage_options=options), "zarr.json")
        if not resume:
            storage.remove_tree(out, options)  # killed before the store existed: nothing to keep

        written_at = -math.inf

        def progress(p: CaptureProgress) -> None:  # after every teacher forward
            nonlocal written_at
            if time.monotonic() > self._lease_until:
                log.warning("job %s: no heartbeat reached the database for %.3g s; stopping before another "
                            "worker takes it over", job.id, self.settings.stale_after_s / 2)
                raise JobLost(job.id)
            if self.stop.is_set():
                raise WorkerStopping(job.id)
            if time.monotonic() - written_at < PROGRESS_WRITE_S and p.tokens_done < p.tokens_total:
                return  # a fast teacher would otherwise write the row many times a second
            written_at = time.monotonic()
            with self.db.session() as s:
                row = s.get(Job, job.id)
                if row.worker_id != self.id or row.state != "running":
                    raise JobLost(job.id)
                if row.cancel_requested:
                    raise JobCancelled(job.id)
                row.tokens_done, row.tokens_total = p.tokens_done, p.tokens_total
                row.tokens_per_s, row.eta_s = p.tokens_per_s, p.eta_s

        text_field = legacy_text_field or job.text_field
        if ranks > 1:
            run_ranks(ranks, source, job.corpus_path, out, spec, tuning, text_field=text_field,
                      messages_field=job.messages_field, resume=resume, storage_options=options,
                      progress=progress)  # fmt: skip
            return
        run = generate if spec.generate is not None else capture  # a generation job: its corpus holds the prompts
        run(self._teachers[source, spec.dtype], [job.corpus_path], out, spec, tuning=tuning, text_field=text_field,
            messages_field=job.messages_field, resume=resume, progress=progress, storage_options=options)

    def _record_devices(self, job_id: str, devices: list[str]) -> None:
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.worker_id == self.id).values(devices=devices))

    def _heartbeat(self, job_id: str, done: threading.Event) -> None:
        while not done.wait(self.settings.heartbeat_s):
            try:
                still_ours = self._beat(job_id)
            except Exception as e:  # keep beating: the capture goes on, and the lease runs out if this persists
                log.warning("job %s: heartbeat failed (%s: %s); retrying", job_id, type(e).__name__, e)
                continue
            if still_ours:
                self._lease_until = time.monotonic() + self.settings.stale_after_s / 2

    def _beat(self, job_id: str) -> bool:
        """Mark the job alive; False when it is no longer this worker's."""
        with self.db.session() as s:
            owned = (Job.id == job_id, Job.worker_id == self.id, Job.state == "running")
            return s.execute(update(Job).where(*owned).values(heartbeat_at=now())).rowcount == 1

    def _finish(self, job_id: str, state: str, error: str | None) -> None:
        with self.db.session() as s:
            values = {"state": state, "error": error, "finished_at": now(), "cancel_requested": False}
            if state == "succeeded":  # the last progress report may have been skipped (PROGRESS_WRITE_S)
                values["eta_s"], values["tokens_done"] = 0.0, Job.tokens_total
            s.execute(update(Job).where(Job.id == job_id, Job.worker_id == self.id).values(**values))
        log.info("job %s %s%s", job_id, state, f": {error}" if error else "")

    def _requeue(self, job_id: str) -> None:
        with self.db.session() as s:
            s.execute(
                update(Job).where(Job.id == job_id, Job.worker_id == self.id).values(state="queued", worker_id=None)
            )
        log.info("job %s handed back to the queue", job_id)


def teacher_devices(model: object) -> list[str]:
    """Where a loaded teacher computes: the devices of its layers when placed by a device map
    (offloaded ones shown as "cpu" or "disk"), else the device of its weights."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        names = {f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values()}
        return sorted(names)
    return [str(next(model.parameters()).device)]


def physical_device(device: str) -> str:
    """`cuda:i` as the machine numbers its GPUs: the i-th of CUDA_VISIBLE_DEVICES when that lists
    indices (what an operator sees in nvidia-smi); any other device as it is."""
    kind, _, index = device.partition(":")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if kind == "cuda" and index.isdigit() and all(v.strip().isdigit() for v in visible) and int(index) < len(visible):
        return f"cuda:{visible[int(index)].strip()}"
    return device


def run_worker(settings: Settings) -> None:
    """The `logitstore-server worker` process: SIGTERM/SIGINT finish the current teacher batch, requeue, exit."""
    worker = Worker(settings)

    def _stop(signum, _frame) -> None:
        log.info("worker %s stopping (signal %d)", worker.id, signum)
        worker.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    parent = os.environ.get(PARENT_PID_ENV)
    if parent:  # an embedded worker: it must not outlive its server, or a restarted server runs two
        stop_with_parent(int(parent), worker.stop)
    worker.run()


# Set by the server in the environment of the embedded worker it starts: the server's process id.
PARENT_PID_ENV = "LOGITSTORE_WORKER_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def signal_on_parent_death(sig: signal.Signals) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (Linux PR_SET_PDEATHSIG);
    False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


def stop_with_parent(parent_pid: int, stop: threading.Event, poll_s: float = 1.0) -> None:
    """Stop this worker (as SIGTERM does) when process `parent_pid`, the server that started it, dies,
    even by SIGKILL. On Linux the kernel sends SIGTERM at once (PR_SET_PDEATHSIG); everywhere, a thread
    notices within `poll_s` that this process was handed to another parent."""
    if not signal_on_parent_death(signal.SIGTERM):
        log.warning("prctl(PR_SET_PDEATHSIG) is unavailable; watching the parent process instead")
    threading.Thread(target=_watch_parent, args=(parent_pid, stop, poll_s), daemon=True, name="parent").start()


def _watch_parent(parent_pid: int, stop: threading.Event, poll_s: float) -> None:
    # Also covers a parent that died before prctl above took effect.
    while os.getppid() == parent_pid:
        if stop.wait(poll_s):
            return
    log.warning("the server process %d that started this worker is gone; stopping", parent_pid)
    stop.set()
