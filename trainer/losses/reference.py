"""Pure-torch reference of the top-k knowledge-distillation loss.

This module defines the semantics of :func:`trainer.losses.kd_loss.kd_loss`: the fused Triton kernel
(`trainer/losses/triton_kernel.py`) must agree with :func:`kd_loss_reference`, and on CPU `kd_loss`
simply runs it. It is written with differentiable torch ops only, so autograd produces the
gradient; the math is derived in `docs/kd_loss.md`.

Per row (token) the teacher is known exactly on its top-k set S and as one tail bucket,
so both distributions are compared over K+1 buckets:

    q_i    = softmax(z / T)_i                  i in S
    q_tail = sum_{j not in S} softmax(z / T)_j (from the tail's own logsumexp)
    p_i    = exp(topk_logp_i)                  i in S
    p_tail = max(0, 1 - sum_S p_i)             (0 when S covers all V ids: empty tail)

Padding ids (negative, or >= V) and repeated ids (every occurrence after the first) are not
part of S: they contribute nothing and their teacher mass is not counted.
"""

from __future__ import annotations

import math

import torch

from trainer.losses.config import DIVERGENCES, LossConfig
from trainer.losses.sparse_target import SparseTarget

__all__ = ["check_kd_loss_args", "kd_loss_parts_reference", "kd_loss_reference", "valid_teacher_ids"]

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NEG_INF = float("-inf")
# Largest K the fused kernel takes (its [K] vectors live in registers: tests/trainer/test_ptx.py).
MAX_K = 4096


def check_kd_loss_args(
    logits: torch.Tensor, target: SparseTarget, loss: LossConfig, *, labels: torch.Tensor | None
) -> None:
    """Raise ValueError, saying what to change, when the tensors of `kd_loss` are unusable.

    The settings were checked when `loss` was built; here are the tensors and what they must
    agree on with the settings. Shapes, dtypes and devices are always checked. The *values* of `target.ids` and
    `labels` are checked only on CPU: on CUDA that check would need a host sync per step, so
    there the kernel treats out-of-range ids as padding instead (see docs/kd_loss.md).
    """
    if not isinstance(target, SparseTarget):
        raise ValueError(
            f"kd_loss: the teacher must be a trainer.losses.sparse_target.SparseTarget, got {_describe(target)}; "
            "wrap the stored tensors: SparseTarget(topk_ids, topk_logp) or SparseTarget(ids, logp, weights)"
        )
    ids, logp, weights = target.ids, target.logp, target.weights
    if not isinstance(loss, LossConfig):
        raise ValueError(f"kd_loss: the settings must be a trainer.losses.config.LossConfig, got {_describe(loss)}")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(
            "kd_loss: logits must be a 2-D tensor [N, V]; flatten batch and length first "
            f"(got {_describe(logits)})"
        )
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"kd_loss: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    n, v = logits.shape
    if v < 1:
        raise ValueError("kd_loss: logits has an empty vocabulary axis (V = 0)")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != n:
        raise ValueError(f"kd_loss: target.ids must be [N={n}, K], got {_describe(ids)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kd_loss: target.ids must be int32 or int64, got {ids.dtype}")
    if ids.shape[1] < 1:
        raise ValueError("kd_loss: target.ids has K = 0 columns; pass at least one teacher id per row")
    if logp is None and weights is None:
        raise ValueError("kd_loss: target.logp is required (it may be None only with weights, for a counts-only store)")
    for name, t in (("target.logp", logp), ("target.weights", weights)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != ids.shape:
            raise ValueError(
                f"kd_loss: {name} must have the shape of target.ids {tuple(ids.shape)}, got {_describe(t)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"kd_loss: {name} must be a float tensor, got {t.dtype}")
    if weights is not None and loss.divergence != "fkl":
        raise ValueError(
            f"kd_loss: divergence {loss.divergence!r} has no unbiased estimate from drawn ids (target.weights); "
            "only 'fkl' does. Train a sampled store with divergence='fkl', or capture a top-k store for rkl/jsd/tvd"
        )
    if ids.shape[1] > MAX_K:
        raise ValueError(f"kd_loss: at most {MAX_K} teacher ids per row, got K = {ids.shape[1]}")
    for name, t in (("target.ids", ids), ("target.logp", logp), ("target.weights", weights), ("labels", labels)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"kd_loss: {name} is on {t.device} but logits is on {logits.device}")
    if loss.alpha > 0 and labels is None:
        raise ValueError("kd_loss: alpha > 0 weights a hard-label cross-entropy, so labels [N] are required")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
            raise ValueError(f"kd_loss: labels must be [N={n}], got {_describe(labels)}")
        if labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kd_loss: labels must be int32 or int64, got {labels.dtype}")
    if logits.device.type == "cpu":
        # Cheap on CPU (no device sync); catches a student/teacher vocabulary mismatch early.
        if bool((ids < -1).any()) or bool((ids >= v).any()):
            raise ValueError(
                f"kd_loss: target.ids must lie in [0, V={v}) or be -1 (padding); found "
                f"min {int(ids.min())}, max {int(ids.max())}. Does the store's tokenizer "
                "match the student's vocabulary?"
            )
        if labels is not None:
            bad = (labels != loss.ignore_index) & ((labels < 0) | (labels >= v))
            if bool(bad.any()):
                raise ValueError(
                    f"kd_loss: labels must lie in [0, V={v}) or equal ignore_index={loss.ignore_index}; "
                    f"found {int(labels[bad][0])}"
                )


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def valid_teacher_ids(topk_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, K] bool: True where the id is in [0, V) and is its row's first occurrence of that id.

    A stable sort brings equal ids together in their original order, so the first of each run
    is the first occurrence; the flags are then scattered back to the original positions.
    """
    in_range = (topk_ids >= 0) & (topk_ids < vocab_size)
    keyed = torch.where(in_range, topk_ids.long(), -1)
    sorted_ids, perm = torch.sort(keyed, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    repeat = torch.empty_like(repeat_sorted).scatter_(1, perm, repeat_sorted)
    return in_range & ~repeat


def row_mask(
    valid: torch.Tensor, labels: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """[N] bool: rows that count towards the mean (label not ignored, or any teacher id)."""
    if labels is not None:
        return labels != ignore_index
    return valid.any(dim=1)


def _plogr(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a * (log a - log b) with a = exp(log_a), and 0 where a == 0 (0 log 0 = 0).

    Both branches of torch.where are differentiated, so masked entries are replaced by 0
    *before* the arithmetic; otherwise -inf - -inf would put NaN into the gradient.
    """
    pos = log_a > _NEG_INF
    la = torch.where(pos, log_a, 0.0)
    lb = torch.where(pos, log_b, 0.0)
    return torch.where(pos, la.exp() * (la - lb), 0.0)


def _bucket_divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float
) -> torch.Tensor:
    """Per-row divergence D(p || q) over buckets given as log-probabilities [N, K+1]."""
    if divergence == "fkl":
        return _plogr(log_p, log_q).sum(dim=1)
    if divergence == "rkl":
        return _plogr(log_q, log_p).sum(dim=1)
    if divergence == "jsd":
        # M = beta p + (1 - beta) q in log space; a bucket empty on both sides stays empty
        # (logaddexp(-inf, -inf) has a NaN gradient, so it is kept out of the op).
        both_empty = (log_p == _NEG_INF) & (log_q == _NEG_INF)
        lp = torch.where(both_empty, 0.0, log_p)
        lq = torch.where(both_empty, 0.0, log_q)
        log_m = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        log_m = torch.where(both_empty, _NEG_INF, log_m)
        kl_pm = _plogr(log_p, log_m).sum(dim=1)
        kl_qm = _plogr(log_q, log_m).sum(dim=1)
        return beta * kl_pm + (1.0 - beta) * kl_qm
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=1)
    raise ValueError(f"kd_loss: unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


def count_rows(ids: torch.Tensor, vocab_size: int, labels: torch.Tensor | None, loss: LossConfig) -> torch.Tensor:
    """Counted rows as a float32 device scalar: labelled rows when alpha > 0, else rows with an id."""
    labels = labels if loss.alpha > 0 else None
    return row_mask((ids >= 0) & (ids < vocab_size), labels, loss.ignore_index).sum(dtype=torch.float32)


def loss_from_parts(parts: torch.Tensor, alpha: float, n_rows: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) mean T^2 D + alpha mean CE from per-row parts [N, 2] over n counted rows.

    A fixed-order sum (deterministic, no atomics); 0 when n = 0.
    """
    sums = parts.sum(dim=0)
    total = sums[0] if alpha == 0.0 else sums[1] if alpha == 1.0 else (1.0 - alpha) * sums[0] + alpha * sums[1]
    return total / n_rows.reshape(()).clamp(min=1.0)


def part_means(
    parts: torch.Tensor, n_rows: torch.Tensor, labels: torch.Tensor | None, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean T^2 D over the counted rows, mean CE over the labelled rows; NaN without labels).

    Device scalars, detached: what the trainer logs, without a host sync until it prints them.
    """
    sums = parts.detach().sum(dim=0)
    kd = sums[0] / n_rows.reshape(()).clamp(min=1.0)
    if labels is None:
        return kd, torch.full_like(kd, float("nan"))
    return kd, sums[1] / (labels != ignore_index).sum(dtype=torch.float32).clamp(min=1.0)


def kd_loss_parts_reference(
    logits: torch.Tensor, target: SparseTarget, loss: LossConfig, *, labels: torch.Tensor | None, with_kd: bool = True
) -> torch.Tensor:
    """Per-row parts [N, 2] in plain torch (fp32 math whatever the input dtype): each counted
    row's T^2 D (0 elsewhere) and each labelled row's CE (0 elsewhere, and without labels).

    The semantics of the fused kernel (`trainer.losses.triton_kernel.launch`); differentiable by
    autograd. Memory: besides autograd's saved tensors it holds at most about three [N, V] fp32
    arrays (the upcast logits, z / T, and in BUCKET mode a copy with the stored ids masked out
    for the tail's own logsumexp). The full log-softmax is never materialized: only [N, K]
    gathers and [N] normalizers are. `with_kd=False` (alpha = 1 only) skips the KD term.
    """
    n, v = logits.shape
    t = loss.temperature
    topk_ids = target.ids
    z = logits.float()
    valid = valid_teacher_ids(topk_ids, v)  # [N, K]
    rows = row_mask(valid, labels if loss.alpha > 0 else None, loss.ignore_index)  # [N]
    zero = torch.zeros(n, dtype=torch.float32, device=logits.device)
    kd, ce = zero, zero

    if labels is not None:
        has_label = labels != loss.ignore_index
        y = torch.where(has_label, labels, 0).long()
        ce = torch.where(has_label, torch.logsumexp(z, dim=1) - z.gather(1, y[:, None]).squeeze(1), 0.0)

    if with_kd or loss.alpha < 1:
        u = z * (1.0 / t) if t != 1.0 else z  # multiply like the kernel does, not divide
        ids = torch.where(valid, topk_ids, 0).long()
        u_s = u.gather(1, ids)  # [N, K]
        if target.weights is not None:
            d = _weighted_divergence(u, u_s, valid, target.logp, target.weights)
        else:
            d = _bucket_divergence_of(u, u_s, ids, valid, target.logp, loss.divergence, loss.beta)
        kd = torch.where(rows, t * t * d, 0.0)
    return torch.stack([kd, ce], dim=1)


def _weighted_divergence(
    u: torch.Tensor, u_s: torch.Tensor, valid: torch.Tensor, logp: torch.Tensor | None, weights: torch.Tensor
) -> torch.Tensor:
    """Per row sum_S w (lp - log q), or -sum_S w log q without lp: the draws' fkl estimator."""
    log_q = u_s - torch.logsumexp(u, dim=1, keepdim=True)
    w = torch.where(valid, weights.detach().float(), 0.0)
    lp = torch.where(valid, logp.detach().float(), 0.0) if logp is not None else torch.zeros_like(w)
    return torch.where(w != 0, w * (lp - log_q), 0.0).sum(dim=1)


def _bucket_divergence_of(
    u: torch.Tensor, u_s: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, topk_logp: torch.Tensor,
    divergence: str, beta: float,
) -> torch.Tensor:  # fmt: skip
    """Per row D(p || q) over the K+1 buckets of the stored ids and the tail."""
    n, v = u.shape
    # Tail logsumexp from the tail's own elements: mask S out of a copy of u. Two extra
    # columns: column V is 0 for rows whose tail is empty (so logsumexp stays finite and
    # its gradient NaN-free; the result is discarded), column V+1 soaks up the scatter of
    # invalid slots.
    tail_empty = valid.sum(dim=1) == v
    extra = torch.full((n, 2), _NEG_INF, device=u.device)
    extra[:, 0] = torch.where(tail_empty, 0.0, _NEG_INF)
    u_tail = torch.cat([u, extra], dim=1)
    u_tail.scatter_(1, torch.where(valid, ids, v + 1), _NEG_INF)
    lse_tail = torch.where(tail_empty, _NEG_INF, torch.logsumexp(u_tail, dim=1))

    # lse(z / T) = logaddexp(lse over S, lse over the tail): no second pass over V.
    no_s = ~valid.any(dim=1, keepdim=True)
    u_s_pad = torch.cat([torch.where(valid, u_s, _NEG_INF), torch.where(no_s, 0.0, _NEG_INF)], dim=1)
    lse_s = torch.where(no_s.squeeze(1), _NEG_INF, torch.logsumexp(u_s_pad, dim=1))
    lse = torch.logaddexp(lse_tail, lse_s)

    log_q = torch.cat([torch.where(valid, u_s - lse[:, None], _NEG_INF), (lse_tail - lse)[:, None]], dim=1)

    log_p_s = torch.where(valid, topk_logp.detach().float(), _NEG_INF)
    # An empty tail (S covers the vocabulary) is empty for the teacher too: 1 - sum p is
    # then rounding residue, and keeping it would make fkl = +inf against q_tail = 0.
    # The sum is taken in fp64: 1 - sum p cancels when the top-k holds nearly all the mass,
    # and rkl/jsd are very sensitive to a small p_tail.
    p_tail = (1.0 - log_p_s.double().exp().sum(dim=1)).clamp(min=0.0).float()
    p_tail = torch.where(tail_empty, 0.0, p_tail)
    log_p = torch.cat([log_p_s, p_tail.log()[:, None]], dim=1)
    return _bucket_divergence(log_p, log_q, divergence, beta)


def kd_loss_reference(
    logits: torch.Tensor, target: SparseTarget, loss: LossConfig = LossConfig(), *, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of `kd_loss_parts_reference` (same arguments): the masked means, mixed by alpha."""
    parts = kd_loss_parts_reference(logits, target, loss, labels=labels)
    return loss_from_parts(parts, loss.alpha, count_rows(target.ids, logits.shape[1], labels, loss))
