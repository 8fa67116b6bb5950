"""Knowledge-distillation loss against a cached top-k teacher (public entry point).

`kd_loss` compares the student with the teacher over K+1 buckets (the teacher's top-k ids and
one tail bucket), which is exact when the cache stores full-vocabulary log-probs on the top-k
set; `teacher_logprobs_at_temperature` turns stored T=1 log-probs plus the stored log-sum-exps
into the teacher at the training temperature. Math and tolerances: docs/kd_loss.md.
"""

from __future__ import annotations

import math

import torch

from trainer.losses.config import LossConfig
from trainer.losses.reference import (
    check_kd_loss_args,
    count_rows,
    kd_loss_parts_reference,
    loss_from_parts,
    part_means,
)
from trainer.losses.sparse_target import SparseTarget

__all__ = ["kd_loss", "teacher_logprobs_at_temperature"]


def kd_loss(
    logits: torch.Tensor,
    target: SparseTarget,
    loss: LossConfig = LossConfig(),
    *,
    labels: torch.Tensor | None = None,
    inplace_grad: bool = False,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over tokens of alpha * CE(z, labels) + (1 - alpha) * T^2 * D(p_T || q_T).

    Args:
        logits: [N, V] student logits, float32 / bfloat16 / float16, CPU or CUDA.
        target: the teacher's ids with their log-probs and/or weights (`SparseTarget`: exact
            ids plus a tail bucket, or drawn ids with weights; `trainer.losses.targets` builds
            it from a store batch). Weights estimate the forward KL only: divergence "fkl".
        loss: the settings (temperature, divergence, beta, alpha, ignore_index, backend); see
            `LossConfig`.
        labels: [N] hard labels (required when alpha > 0). With alpha > 0 the tokens equal to
            ignore_index are left out of the mean; with alpha = 0 the mean is over the tokens
            with a teacher id, and labels only feed the CE reported by `return_parts`.
        inplace_grad: let the Triton backend write the gradient into `logits` (saves an [N, V]
            buffer; `logits` must not be used afterwards). Ignored by the torch backend.
        return_parts: also return the mean T^2 D and the mean CE (NaN without labels), detached
            device scalars computed in the same pass.

    Returns:
        A float32 scalar (or `(loss, kd, ce)`). A batch with no counted token gives 0 with zero
        gradients.
    """
    check_kd_loss_args(logits, target, loss, labels=labels)
    with_kd = return_parts or loss.alpha < 1
    backend = loss.backend
    if backend == "auto":
        backend = "triton" if logits.is_cuda else "torch"
    n_rows = count_rows(target.ids, logits.shape[1], labels, loss)
    if backend == "torch":
        parts = kd_loss_parts_reference(logits, target, loss, labels=labels, with_kd=with_kd)
        value = loss_from_parts(parts, loss.alpha, n_rows)
    else:
        # Imported here so that `import trainer` does not import triton, and TRITON_INTERPRET can
        # still be set by the caller before the kernels are built.
        from trainer.losses.triton_kernel import kd_loss_triton

        value, parts = kd_loss_triton(logits, target, labels, loss, with_kd=with_kd, inplace_grad=inplace_grad)
    if not return_parts:
        return value
    return (value, *part_means(parts, n_rows, labels, loss.ignore_index))


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012); -inf at a = 0."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def teacher_logprobs_at_temperature(
    topk_logp_t1: torch.Tensor,
    lse_t1: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs at temperature T from the stored T=1 top-k log-probs and normalizers.

    With z_i = logp_1(i) + lse_1 the teacher's logit on S (up to a shift, which cancels),
    log p_T(i) = z_i / T - lse_T, which is exact on S because lse_T = logsumexp(z / T) was
    stored over the full vocabulary (stores hold it for z = log_softmax(logits), lse_1 = 0).

    Args:
        topk_logp_t1: [N, K] log-probs at T = 1; padding is -inf and stays -inf.
        lse_t1: [N] logsumexp(z) over the full vocabulary.
        lse_t: [N] logsumexp(z / T) over the full vocabulary, for the same z.
        temperature: T > 0, one of the store's captured temperatures.

    Returns:
        (logp_T [N, K], tail_logp_T [N]) in float32; the tail is log(1 - sum_S p_T), computed
        in fp64 from logsumexp(logp_T) with log1mexp, and -inf when the top-k holds all mass.
        Its absolute accuracy as a probability is that of the inputs (~1e-7 for fp32 inputs).
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"teacher_logprobs_at_temperature: temperature must be > 0, got {temperature!r}")
    if topk_logp_t1.ndim != 2:
        raise ValueError(
            f"teacher_logprobs_at_temperature: topk_logp_t1 must be [N, K], got shape {tuple(topk_logp_t1.shape)}"
        )
    n = topk_logp_t1.shape[0]
    for name, t in (("lse_t1", lse_t1), ("lse_t", lse_t)):
        if t.shape != (n,):
            raise ValueError(f"teacher_logprobs_at_temperature: {name} must be [N={n}], got {tuple(t.shape)}")
    # fp64 on [N, K]: log(1 - sum p) cancels when the top-k holds nearly all the mass, and
    # fp32 would add its own rounding to the rounding already in the stored inputs.
    logp_t = (topk_logp_t1.double() + lse_t1.double()[:, None]) / temperature - lse_t.double()[:, None]
    # Rounding can put the top-k mass a hair above 1; the tail is then empty (-inf), not NaN.
    log_mass = torch.logsumexp(logp_t, dim=1).clamp(max=0.0)
    return logp_t.float(), _log1mexp(log_mass).float()
