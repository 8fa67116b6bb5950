"""Where a run's records go: `OUT/metrics.jsonl` always, plus the `--report-to` destinations.

A record is a dict with a `step` (the training records: loss, kd_loss, ce_loss, lr, tokens_per_s;
the evaluation records: eval_ppl, eval_kl, ...). `--report-to tensorboard` also writes every
number of every record as a TensorBoard scalar, tagged with its key, at its step, under
`OUT/tensorboard/`. Only rank 0 opens a `RunRecords`.

Torch-free at import (TrainConfig's checks use `REPORT_TO`, and `--help` must not import torch);
`torch.utils.tensorboard`, which imports the `tensorboard` package, is imported only when asked for.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT_TO = ("none", "tensorboard")  # the values --report-to accepts
TENSORBOARD_DIR = "tensorboard"  # under the run's --out


class RunRecords:
    """Appends records to `OUT/metrics.jsonl` and to the TensorBoard event files when asked for.

    `step` is where the run starts (the resumed checkpoint's step, 0 for a fresh run): records
    after it, left by an earlier run that got further, are hidden in TensorBoard (for
    metrics.jsonl `trainer.train._truncate_metrics` drops them).
    """

    def __init__(self, out: Path, report_to: Sequence[str], step: int) -> None:
        self._jsonl = open(out / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())
        self._tensorboard = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run writes a new event file in the same directory; purge_step makes
            # TensorBoard drop the earlier files' events at steps > `step`, as metrics.jsonl does.
            self._tensorboard = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """One record; flushed at once, so a run killed later keeps everything it logged."""
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            step = record["step"]
            for key, value in record.items():
                # bool is an int: not a curve. Strings or lists a record might carry are not scalars.
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
