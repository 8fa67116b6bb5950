"""`torchrun --nproc-per-node G -m logitstore.capture ARGS`: one capture process per rank.

ARGS are those of `logitstore capture` (without `--gpus`). Each process joins the process
group torchrun set up, loads the teacher on its own device and computes its share of the
work units; see logitstore/capture/engine.py.
"""

from __future__ import annotations

import sys

from logitstore.capture import distributed
from logitstore.cli import main


def run(argv: list[str] | None = None) -> int:
    distributed.init_from_env()
    try:
        return main(["capture", *(sys.argv[1:] if argv is None else argv)])
    finally:
        if distributed.rank_and_world()[1] > 1:
            import torch.distributed as dist

            if distributed.failed_together():
                # Every rank has printed its error by now; wait for the others before exiting,
                # because torchrun kills the remaining ranks as soon as one exits non-zero.
                distributed.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run())
