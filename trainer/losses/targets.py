"""The teacher's side of the loss: a store batch turned into a sparse target on the device.

Every store mode trains through one loss, `kd_loss(logits, target, ...)` (and its from-hidden
twin), whose `SparseTarget` holds per row K ids and either their exact log-probs at the training temperature
plus a tail bucket (`topk_target`: top-k stores), or a weight on each id, the target mass there,
whose expectation is the teacher's probability (`sampled_target`: sampled stores, with or
without an exact head, counts-only or not). This module builds those [N, K] tensors; they are
small next to the [N, V] logits, so plain torch is fine.

Sampled captures (`logitstore capture --mode sampled`): random-sampling KD.

A sampled store keeps, per token, the distinct ids of M draws from the teacher's T=1
distribution p, with their counts c_i and exact log-probs. The empirical distribution
p̂_i = c_i / M is an unbiased estimate of p (E[c_i] = M p_i), and the loss is linear in it:

    L̂ = Σ_i p̂_i (log p_i − log q_i)      E[L̂] = KL(p ‖ q),  E[∇_z L̂] = ∇_z KL(p ‖ q) = q − p

so the student gets an unbiased estimate of the full forward-KL gradient from ~M/3 stored
ids instead of the whole vocabulary. Without `teacher_logp` the Σ p̂_i log p_i term is left
out: the value is then a cross-entropy (KL plus the teacher's entropy, a constant), with the
same gradient.

At a temperature T ≠ 1 the draws still come from p, not from p_T ∝ p^(1/T); each draw is
re-weighted by the exact importance ratio p_T(i) / p(i), computable because the store keeps
log p_i and the full-vocabulary lse at every captured T:
log p_T(i) = (log p_i + lse(1)) / T − lse(T). The weighted sum stays unbiased for
KL(p_T ‖ q_T), but its variance grows with T (ids the draws rarely hit carry more of p_T)
and the per-token weights no longer sum to exactly 1. As in `kd_loss`, the divergence is
scaled by T². Tokens whose draws were dropped for the store's k cap (more distinct ids than
k) lose those draws' weight: that bias is zero when k >= M, the capture's default.

With a head (`capture --head H`), the first H slots hold the teacher's top-H ids with their
exact log-probs, and the M draws come from the tail, p restricted to the other ids and
renormalized, p(j | tail) = p_j / p_tail with p_tail = 1 − Σ_head p_i. Splitting the KL there,

    L̂ = Σ_head p_T(i) (log p_T(i) − log q_T(i)) + p_tail Σ_j (c_j / M) w_j (log p_T(j) − log q_T(j))

is exact on the head and unbiased on the tail (E[c_j / M] = p(j | tail), so the second sum has
mean Σ_tail p_T(j)(…)); the per-slot weights still sum to 1 at T = 1. A counts-only store with
a head keeps the head's log-probs alone (its drawn slots' are NaN): the weights, and so the
gradient, are the same, and the value leaves out the tail's entropy term, as counts-only does. A top-k store's tail
bucket says how much mass the tail has; the draws also say where in the tail it lies, which
the student's gradient q − p needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from logitstore.errors import LogitStoreError
from logitstore.schema import StoreMeta
from trainer.losses.config import LossConfig
from trainer.losses.kd_loss import kd_loss, teacher_logprobs_at_temperature
from trainer.losses.sparse_target import SparseTarget

__all__ = ["StoreTarget", "sampled_kd_loss", "sampled_target", "topk_target"]


@dataclass(frozen=True)
class StoreTarget:
    """How a batch of one store (trainer.data.StoreDataset) becomes the target at one training
    temperature: `StoreTarget.of(meta, T)(batch, device)`."""

    temperature: float
    t_col: int  # lse column of the training temperature
    one_col: int  # lse column of T = 1
    draws: int | None = None  # a sampled-mode store: draws per token
    head: int = 0  # a sampled-mode store: top ids kept exactly before the draws

    @classmethod
    def of(cls, meta: StoreMeta, temperature: float, url: str = "the store") -> StoreTarget:
        """LogitStoreError when `temperature` was not captured (its lse is needed)."""
        captured = meta.capture.temperatures
        t_col = next((i for i, t in enumerate(captured) if abs(t - temperature) <= 1e-6 * max(1.0, t)), None)
        if t_col is None:
            raise LogitStoreError(f"--temperature {temperature:g} was not captured in {url}; captured: "
                                  f"{', '.join(f'{t:g}' for t in captured)}")  # fmt: skip
        draws = meta.capture.draws if meta.capture.mode == "sampled" else None
        return cls(temperature, t_col, captured.index(1.0), draws, meta.capture.head)

    def __call__(self, batch: dict[str, torch.Tensor], device: torch.device) -> SparseTarget:
        """The batch's [B * L, K] target on `device`."""

        def rows(name: str) -> torch.Tensor | None:
            t = batch.get(name)
            return None if t is None else t.to(device, non_blocking=True).reshape(-1, *t.shape[2:])

        ids, logp, lse = rows("topk_ids"), rows("topk_logp"), rows("lse")
        lse_1, lse_t = lse[:, self.one_col], lse[:, self.t_col]
        if self.draws is None:
            return topk_target(ids, logp, lse_1, lse_t, self.temperature)
        return sampled_target(ids, rows("counts"), self.draws, temperature=self.temperature, teacher_logp=logp,
                              lse_1=lse_1, lse_t=lse_t, head=self.head)  # fmt: skip


def topk_target(
    ids: torch.Tensor, logp_t1: torch.Tensor, lse_1: torch.Tensor, lse_t: torch.Tensor, temperature: float
) -> SparseTarget:
    """A top-k store's rows: exact log-probs at T (from the T=1 ones and the stored lse) + the tail."""
    logp = logp_t1.float()
    if temperature != 1.0:
        logp, _tail = teacher_logprobs_at_temperature(logp, lse_1, lse_t, temperature)
    return SparseTarget(ids, logp)


def sampled_target(
    ids: torch.Tensor,
    counts: torch.Tensor,
    draws: int,
    *,
    temperature: float = 1.0,
    teacher_logp: torch.Tensor | None = None,
    lse_1: torch.Tensor | None = None,
    lse_t: torch.Tensor | None = None,
    head: int = 0,
) -> SparseTarget:
    """A sampled store's rows: weights (c_i / M) w_i (times p_tail behind a head; p_T on the head).

    Args:
        ids: [N, K] stored ids, -1 = padding; counts: [N, K] draws per id (0 at padding).
        draws: M, the store's `capture.draws`.
        temperature: T > 0 of the training loss.
        teacher_logp: [N, K] stored log p at T=1; adds the teacher's entropy term so the value
            estimates the KL itself (required when T != 1). NaN where not stored (the drawn slots
            of a counts-only store with a head): that term is then left out there.
        lse_1, lse_t: [N] stored lse at T=1 and at `temperature` (required when T != 1).
        head: the store's `capture.head`: its first slots hold the top ids exactly (needs teacher_logp).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if temperature != 1.0 and (teacher_logp is None or lse_1 is None or lse_t is None):
        raise ValueError("temperature != 1 needs teacher_logp, lse_1 and lse_t to re-weight the T=1 draws")
    if head and teacher_logp is None:
        raise ValueError("a head needs teacher_logp: its ids are weighted by their probabilities")
    if ids.shape != counts.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and counts {tuple(counts.shape)} must agree on [N, K]")
    valid = ids >= 0
    weight = counts.float() / draws * valid
    if teacher_logp is None:
        return SparseTarget(ids, None, weight)
    logp = teacher_logp.float()
    logp = torch.where(valid & ~logp.isnan(), logp, 0.0)
    if temperature == 1.0:
        log_p_t = logp
    else:
        log_p_t = (logp + lse_1.float()[:, None]) / temperature - lse_t.float()[:, None]
        weight = weight * torch.exp(log_p_t - logp)
    if head:
        in_head = valid[:, :head]
        p_tail = (1 - torch.where(in_head, logp[:, :head].exp(), 0.0).sum(-1, keepdim=True)).clamp(min=0)
        head_weight = torch.where(in_head, log_p_t[:, :head].exp(), 0.0)
        weight = torch.cat([head_weight, weight[:, head:] * p_tail], dim=1)
    return SparseTarget(ids, log_p_t, weight)


def sampled_kd_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    draws: int,
    loss: LossConfig = LossConfig(),
    *,
    teacher_logp: torch.Tensor | None = None,
    lse_1: torch.Tensor | None = None,
    lse_t: torch.Tensor | None = None,
    head: int = 0,
) -> torch.Tensor:
    """T² · mean over tokens of Σ_i (c_i / M) w_i (log p_T(i) − log q_T(i)), w_i = p_T(i) / p(i)
    (with a head: the estimator of the module docstring): `kd_loss` on `sampled_target`.

    `loss` as for `kd_loss` (divergence "fkl": the draws estimate the forward KL only); the
    other arguments as for `sampled_target`, at `loss.temperature`. Returns a float32 scalar;
    tokens with no stored id are left out of the mean (none: 0).
    """
    if ids.shape[0] != logits.shape[0]:
        raise ValueError(f"ids {tuple(ids.shape)} and logits {tuple(logits.shape)} must agree on N")
    target = sampled_target(ids, counts, draws, temperature=loss.temperature, teacher_logp=teacher_logp,
                            lse_1=lse_1, lse_t=lse_t, head=head)  # fmt: skip
    return kd_loss(logits, target, loss)
