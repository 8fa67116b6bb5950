"""The teacher's side of one loss call: per row K ids and what the loss knows of them.

Every loss entry point (`kd_loss`, `kd_loss_from_hidden`, the torch reference, the kernel's
launcher) takes the teacher as one `SparseTarget`; `trainer.losses.targets` builds it from a
store batch of any mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseTarget"]


@dataclass(frozen=True)
class SparseTarget:
    """The teacher at N rows, as K ids per row.

    ids: [N, K] int32/int64 teacher ids (K <= 4096); -1 is padding. A repeated id counts once
        (its first occurrence; later repeats are treated as padding).
    logp: [N, K] teacher log-probs at the training temperature, normalized over the full
        vocabulary. Without `weights` the target is exact on these ids plus a tail bucket of
        mass 1 - sum(exp(logp)), clamped at 0. With `weights` they only enter the value (the
        teacher's entropy term); None there (a counts-only store) makes the value a
        cross-entropy with the same gradient.
    weights: [N, K] target mass on each id, for stores with drawn ids: the loss is then the
        unbiased estimate sum_k w_k (logp_k - log q_k) of the forward KL, with no tail bucket.
        None: exact ids plus the tail bucket.
    """

    ids: torch.Tensor
    logp: torch.Tensor | None
    weights: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> SparseTarget:
        """The target at rows [start, stop) (views, no copy)."""
        return SparseTarget(*(None if t is None else t[start:stop] for t in (self.ids, self.logp, self.weights)))

    def contiguous(self) -> SparseTarget:
        """The same target with contiguous tensors (what the kernel indexes)."""
        return SparseTarget(*(None if t is None else t.contiguous() for t in (self.ids, self.logp, self.weights)))
