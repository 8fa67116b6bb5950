"""Multi-process capture under `torchrun`: who am I, wait for the others, launch the workers.

`torchrun --nproc-per-node G -m logitstore.capture ...` starts G processes with RANK,
WORLD_SIZE and a rendezvous in their environment (multi-node: the same command under
torchrun's rendezvous flags). Each joins the process group here; the capture engine then
splits work units by rank (`capture` in engine.py). Without torchrun, world size is 1 and
nothing here does anything.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from logitstore.errors import LogitStoreError


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (no-op without torchrun)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for_rank(device: str) -> str:
    """One GPU per process: `auto`/`cuda` become `cuda:LOCAL_RANK` under torchrun."""
    if dist.is_initialized() and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_failed_together = False


def share_outcome(error: str | None) -> None:
    """Rank 0 tells every rank whether its step (creating the store) failed; the other ranks
    then raise the same one-line error instead of waiting forever on a barrier."""
    global _failed_together
    if not dist.is_initialized():
        return
    box = [error]
    dist.broadcast_object_list(box, src=0)
    _failed_together = bool(box[0])
    if box[0] and dist.get_rank() != 0:
        raise LogitStoreError(box[0])


def failed_together() -> bool:
    """Whether every rank is failing with the error `share_outcome` passed around."""
    return _failed_together


def launch(nproc: int, capture_argv: list[str]) -> int:
    """Run `torchrun --nproc-per-node nproc -m logitstore.capture ARGV` and wait for it.

    A failed worker has already printed its own one-line error; torchrun's traceback of the
    failure is replaced by one more line naming the failed rank(s)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--nproc-per-node", str(nproc), "--standalone", "-m", "logitstore.capture", *capture_argv])
    try:
        run(args)
    except ChildFailedError as e:
        ranks = sorted(e.failures)
        raise LogitStoreError(
            f"capture failed on rank(s) {ranks} (their errors are above); committed work units are kept: "
            "fix the cause and run the same command with --resume"
        ) from None
    return 0
