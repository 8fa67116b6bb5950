"""Train students from a logitstore store.

`from trainer import LossConfig, SparseTarget, kd_loss, kd_loss_from_hidden, teacher_logprobs_at_temperature`
imports them (and torch) on first use, so that `logitstore-train --help` (`trainer.cli`) does not.
The losses live in `trainer.losses` (docs/kd_loss.md).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LossConfig", "SparseTarget", "kd_loss", "kd_loss_from_hidden", "teacher_logprobs_at_temperature"]
_HOME = {"LossConfig": "trainer.losses.config", "SparseTarget": "trainer.losses.sparse_target",
         "kd_loss": "trainer.losses.kd_loss", "kd_loss_from_hidden": "trainer.losses.from_hidden",
         "teacher_logprobs_at_temperature": "trainer.losses.kd_loss"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
