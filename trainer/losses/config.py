"""`LossConfig`: the settings of the KD loss, checked once, shared by every loss entry point.

Torch-free, so that `trainer.config` (and with it `logitstore-train --help`) can build one
without importing torch. Per-call tensors (labels, weights) are arguments of the loss functions,
not settings: they change every batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BACKENDS", "DIVERGENCES", "LossConfig"]

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LossConfig:
    """Mean over tokens of alpha * CE(z, labels) + (1 - alpha) * T^2 * D(p_T || q_T).

    temperature: T > 0; the student is softmax(logits / T), the divergence is scaled by T^2.
    divergence: "fkl" KL(p||q), "rkl" KL(q||p), "jsd" beta KL(p||M) + (1-beta) KL(q||M) with
        M = beta p + (1-beta) q, or "tvd" sum |p - q| / 2. Drawn ids (weights) take "fkl" only.
    beta: JSD mixing weight in [0, 1]; "jsd" needs 0 < beta < 1 (0 or 1 make it identically 0).
    alpha: weight of the hard-label cross-entropy at T = 1, in [0, 1] (> 0 needs labels).
    ignore_index: label value of ignored tokens.
    backend: "auto" (Triton on CUDA, torch on CPU), "triton" (on CPU tensors only under
        TRITON_INTERPRET=1), or "torch".

    Invalid values raise ValueError naming the field. Numbers are stored as Python float/int,
    which is what the kernel launcher passes on.
    """

    temperature: float = 1.0
    divergence: str = "fkl"
    beta: float = 0.5
    alpha: float = 0.0
    ignore_index: int = -100
    backend: str = "auto"

    def __post_init__(self) -> None:
        temperature = _number("temperature", self.temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise _invalid("temperature", "a finite number > 0", self.temperature)
        if self.divergence not in DIVERGENCES:
            raise _invalid("divergence", f"one of {', '.join(DIVERGENCES)}", self.divergence)
        beta = _number("beta", self.beta)
        if not 0.0 <= beta <= 1.0:
            raise _invalid("beta", "in [0, 1]", self.beta)
        if self.divergence == "jsd" and not 0.0 < beta < 1.0:
            raise ValueError(
                f"LossConfig.beta must be in (0, 1) for jsd, got {self.beta!r} (beta = 0 or 1 makes JSD "
                "identically 0; use divergence='fkl' or 'rkl' for those limits)"
            )
        alpha = _number("alpha", self.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise _invalid("alpha", "in [0, 1]", self.alpha)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise _invalid("ignore_index", "an int", self.ignore_index)
        if self.backend not in BACKENDS:
            raise _invalid("backend", f"one of {', '.join(BACKENDS)}", self.backend)
        # Plain floats (an int temperature, say) for the kernel's scalar arguments.
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "alpha", alpha)


def _invalid(field: str, requirement: str, value: Any) -> ValueError:
    return ValueError(f"LossConfig.{field} must be {requirement}, got {value!r}")


def _number(field: str, value: Any) -> float:
    """`value` as a float; a bool or a non-number is refused (True would pass as 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(field, "a number", value)
    return float(value)
