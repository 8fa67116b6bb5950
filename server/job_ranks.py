"""One capture job over N processes: `gpus_per_job` > 1.

With one device the worker runs a job in its own process (and keeps the teacher loaded
between jobs). With N > 1 it starts N rank processes (spawned; a process group over a free
local port: NCCL on GPUs, gloo on CPU) that each load the teacher on their own GPU
(`distributed.device_for_rank`) and call `capture` with the same arguments, which splits the
work units by rank (logitstore/capture/engine.py) exactly as `logitstore capture --gpus N`
does under torchrun: the finished store has the digest of a one-process capture.

Every rank sends its progress to the worker through a queue; the worker adds them up and
calls its own progress callback (lease, stop, cancel) at least twice a second, also while
the teachers load. When the callback raises, the ranks get SIGTERM: units already committed
stay, so a resumed job continues from them. A worker killed outright takes its ranks with it
(PR_SET_PDEATHSIG), so no rank writes on while another worker resumes the job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
from pathlib import Path
from typing import Any

from logitstore.capture.engine import CaptureProgress, ProgressCallback
from logitstore.errors import LogitStoreError
from logitstore.spec import CaptureSpec, CaptureTuning
from server.worker import signal_on_parent_death

# How often the worker's callback runs when no rank reports (loading, a long batch).
_POLL_S = 0.5


def rank_devices(world: int) -> list[str]:
    """The device of each of `world` ranks: a visible GPU each (LogitStoreError when there are
    fewer), or the CPU on a machine without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return ["cpu"] * world
    visible = torch.cuda.device_count()
    if visible < world:
        raise LogitStoreError(
            f"gpus_per_job is {world} but this worker sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); give it more, or lower gpus_per_job"
        )
    return [f"cuda:{rank}" for rank in range(world)]


def run_ranks(
    world: int, source: str, corpus: Path, out: str, spec: CaptureSpec, tuning: CaptureTuning, *,
    text_field: str, messages_field: str, resume: bool, storage_options: dict[str, Any] | None,
    progress: ProgressCallback,
) -> None:  # fmt: skip
    """Run the capture on `world` rank processes; return when all succeeded, raise otherwise."""
    rank_devices(world)  # enough GPUs, before anything starts
    ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or database handles
    reports: mp.Queue = ctx.Queue()
    port = _free_port()
    args = (os.getpid(), world, port, source, str(corpus), out, spec.model_dump(), tuning, text_field,
            messages_field, resume, storage_options)
    ranks = [ctx.Process(target=_rank_main, args=(rank, *args, reports), name=f"capture-rank{rank}")
             for rank in range(world)]  # fmt: skip
    for p in ranks:
        p.start()
    latest: dict[int, CaptureProgress] = {}
    errors: list[str] = []
    try:
        while True:
            try:
                kind, rank, payload = reports.get(timeout=_POLL_S)
                if kind == "progress":
                    latest[rank] = CaptureProgress(*payload)
                else:
                    errors.append(payload)
            except queue.Empty:
                pass
            if errors:
                raise LogitStoreError(errors[0])
            done = [p.exitcode is not None for p in ranks]
            # Until every rank has counted its share, the total is unknown: report nothing done.
            progress(_total(latest) if len(latest) == world else CaptureProgress(0, 0, 0, 0.0))
            if all(done):
                break
        failed = [p.name for p in ranks if p.exitcode != 0]
        if failed:
            raise LogitStoreError(f"capture processes {', '.join(failed)} died (exit codes "
                                  f"{[p.exitcode for p in ranks]}); committed work units are kept")  # fmt: skip
    finally:
        for p in ranks:
            if p.is_alive():
                p.terminate()
        for p in ranks:
            p.join()


def _total(latest: dict[int, CaptureProgress]) -> CaptureProgress:
    """The job's progress: the ranks' tokens added up, over the slowest rank's time."""
    parts = list(latest.values())
    return CaptureProgress(sum(p.tokens_done for p in parts), sum(p.tokens_total for p in parts),
                           sum(p.tokens_this_run for p in parts), max(p.elapsed_s for p in parts))  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, worker_pid: int, world: int, port: int, source: str, corpus: str, out: str, spec: dict,
    tuning: CaptureTuning, text_field: str, messages_field: str, resume: bool, storage_options: dict[str, Any] | None,
    reports: mp.Queue,
) -> None:  # fmt: skip
    # A worker killed outright (SIGKILL, out of memory) must not leave its ranks writing segments
    # while another worker resumes the job: they die with it. Uncommitted units are redone.
    signal_on_parent_death(signal.SIGKILL)
    if os.getppid() != worker_pid:  # it died before the line above took effect
        raise SystemExit(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TQDM_DISABLE="1")  # fmt: skip
    import torch.distributed as dist

    from logitstore.capture import distributed
    from logitstore.capture.engine import capture
    from logitstore.capture.generate import generate
    from logitstore.capture.teacher import load_teacher

    distributed.init_from_env()
    try:
        spec_ = CaptureSpec.model_validate(spec)
        teacher = load_teacher(source, device=distributed.device_for_rank("auto"), dtype=spec_.dtype)

        def report(p: CaptureProgress) -> None:
            reports.put(("progress", rank, (p.tokens_done, p.tokens_total, p.tokens_this_run, p.elapsed_s)))

        run = generate if spec_.generate is not None else capture
        run(teacher, [corpus], out, spec_, tuning=tuning, text_field=text_field, messages_field=messages_field,
            resume=resume, progress=report, storage_options=storage_options)
    except LogitStoreError as e:
        reports.put(("error", rank, str(e)))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
