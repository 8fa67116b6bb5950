"""Train students from a logitstore store.

`from trainer import kd_loss, kd_loss_from_hidden, teacher_logprobs_at_temperature` imports
them (and torch) on first use, so that `logitstore-train --help` (`trainer.cli`) does not.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["kd_loss", "kd_loss_from_hidden", "teacher_logprobs_at_temperature"]
_HOME = {"kd_loss": "trainer.kd_loss", "kd_loss_from_hidden": "trainer.kd_loss_from_hidden",
         "teacher_logprobs_at_temperature": "trainer.kd_loss"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


class _Package(types.ModuleType):
    """Loading a submodule sets it as an attribute of its package: `trainer.kd_loss` would then
    be the module `trainer/kd_loss.py`, not its function. Keep the function there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _HOME.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
