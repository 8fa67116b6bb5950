"""Top-k KD loss from the student's last hidden states, without materializing [N, V] logits.

`kd_loss_from_hidden(hidden, lm_head_weight, ...)` equals `kd_loss(hidden @ lm_head_weight.T,
...)` but walks the rows in chunks, like Liger's fused linear losses and Cut Cross-Entropy: a
chunk's logits are computed, turned into their gradient by the fused kernel, pushed through the
linear layer and freed before the next chunk. Peak extra memory is one [chunk, V] buffer plus
the gradients of hidden and of the weight, instead of [N, V] logits and their [N, V] gradient.
Math, chunk rule and measurements: docs/kd_loss.md ("kd_loss_from_hidden").
"""

from __future__ import annotations

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

__all__ = ["default_chunk_size", "kd_loss_from_hidden"]

# Logits elements per chunk: 256 MiB in bf16, 512 MiB in fp32 (see default_chunk_size).
CHUNK_LOGITS_ELEMENTS = 2**27
# The torch path (CPU) holds about six fp32 arrays of the chunk's shape through autograd, so its
# chunks are 128 times smaller: 24 MiB at the peak, 21 rows at V = 49152.
CHUNK_LOGITS_ELEMENTS_TORCH = 2**20


def default_chunk_size(n: int, vocab_size: int, backend: str = "triton") -> int:
    """Rows per chunk: as many as fit CHUNK_LOGITS_ELEMENTS (2^27) logits, at most N, at least 1
    (CHUNK_LOGITS_ELEMENTS_TORCH on the torch path).

    Why a fixed logits budget rather than Liger's "chunk logits ~ size of hidden" (rows ~ N H / V):
    * memory: the chunk's [rows, V] buffer (logits, then their gradient in place) is the only
      thing that grows with V, so a fixed budget bounds it whatever N is; 256 MiB in bf16 is
      small next to the weight's fp32 gradient accumulator (V H 4 bytes: 1 GiB at V = 128256,
      H = 2048), which the chunking cannot avoid;
    * time: every chunk re-reads the [V, H] weight in three GEMMs and adds a [V, H] partial
      gradient into the accumulator, so a chunk must hold enough rows for the GEMMs to be
      compute-bound and for that per-chunk V H traffic to be amortized. 2^27 / V gives 1046
      rows at V = 128256 and 2730 at V = 49152 (8 and 3 chunks at N = 8192), where Liger's
      rule would give 128-256 rows and 30-60 chunks.
    """
    budget = CHUNK_LOGITS_ELEMENTS if backend == "triton" else CHUNK_LOGITS_ELEMENTS_TORCH
    return max(1, min(n, budget // max(vocab_size, 1)))


# ---------------------------------------------------------------------------------------------
# Math. With logits Z = X W^T (X = hidden [N, H], W = lm_head_weight [V, H]) and G = dL/dZ [N, V]
# (what kd_loss's kernel writes, or autograd gives the reference), the chain rule through the
# linear layer is
#
#     dL/dX = G W        [N, H]          dL/dW = G^T X        [V, H]
#
# and both are sums over rows, so with row chunks c (Z_c = X_c W^T, G_c its rows of G):
#
#     dL/dX_c = G_c W                    dL/dW = sum_c G_c^T X_c    (accumulated in fp32)
#
# G_c must be the rows of the *global* G. kd_loss is a mean over the n counted rows of its
# input (label != ignore_index when alpha > 0, else rows with a teacher id), L = sum_r l_r / n,
# so a chunk's part of it is sum_{r in c} l_r / n: its rows' terms over the batch's n. The
# Triton path gives the kernel the global n in place of the chunk's count, so it writes G_c
# directly; the torch path differentiates sum_{r in c} l_r / n (loss_from_parts with the global
# n). n stays a device tensor: no host sync per chunk. n = 0 gives a zero loss and zero
# gradients (the kernel and the reference zero every uncounted row, and 1 / max(n, 1) stays
# finite). The per-row T^2 D and CE sums are carried along for the log (return_parts).
#
# Backward gets dOut/dL (a scalar) and multiplies the saved dL/dX and dL/dW by it.
# ---------------------------------------------------------------------------------------------


class KDLossFromHiddenFunction(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: SparseTarget,
        labels: torch.Tensor | None,
        n_total: torch.Tensor,
        loss: LossConfig,
        with_kd: bool,
        backend: str,
        chunk_size: int,
        grad_hidden_needed: bool,
        grad_weight_needed: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _ = hidden.shape
        v = weight.shape[0]
        device, dtype = hidden.device, hidden.dtype

        grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden_needed else None
        # fp32 accumulator for dL/dW: with bf16 weights each chunk's G_c^T X_c is rounded once,
        # and the sum over chunks is not rounded again. fp32 weights accumulate in place.
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=device) if grad_weight_needed else None
        partial_w = None  # reused [V, H] buffer for one chunk's G_c^T X_c in a 16-bit dtype
        logits_buf = torch.empty((min(chunk_size, n), v), dtype=dtype, device=device)
        part_sums = torch.zeros(2, dtype=torch.float32, device=device)  # sum of T^2 D, sum of CE
        compute_grad = grad_hidden_needed or grad_weight_needed

        if backend == "triton":
            from trainer.losses.triton_kernel import launch

        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            x_c = hidden[start:stop]
            target_c = target.rows(start, stop)
            lab_c = None if labels is None else labels[start:stop]
            logits_c = torch.mm(x_c, weight.t(), out=logits_buf[: stop - start])
            if backend == "triton":
                # In place: the kernel turns the chunk's logits into their gradient G_c.
                parts_c, g_c = launch(
                    logits_c, target_c, lab_c, loss,
                    inplace_grad=True, compute_grad=compute_grad, with_kd=with_kd, n_rows=n_total,
                )  # fmt: skip
            else:
                with torch.enable_grad():
                    z_c = logits_c.detach().requires_grad_(compute_grad)
                    parts_c = kd_loss_parts_reference(z_c, target_c, loss, labels=lab_c, with_kd=with_kd)
                    # The chunk's share of the global mean: its rows' terms over the batch's n.
                    g_c = None
                    if compute_grad:
                        (g_c,) = torch.autograd.grad(loss_from_parts(parts_c, loss.alpha, n_total), z_c)
            part_sums += parts_c.detach().sum(dim=0)
            if grad_hidden is not None:
                torch.mm(g_c, weight, out=grad_hidden[start:stop])
            if grad_w32 is not None:
                if dtype == torch.float32:
                    grad_w32.addmm_(g_c.t(), x_c)
                else:
                    partial_w = torch.mm(g_c.t(), x_c, out=partial_w)
                    grad_w32 += partial_w
            del g_c, logits_c, parts_c

        del logits_buf, partial_w
        grad_weight = None if grad_w32 is None else grad_w32.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.scaled = False
        ctx.mark_non_differentiable(part_sums)
        return loss_from_parts(part_sums[None], loss.alpha, n_total), part_sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, _grad_sums: torch.Tensor | None):  # type: ignore[override]
        if ctx.scaled:
            raise RuntimeError(
                "kd_loss_from_hidden: backward ran twice through the same graph (retain_graph=True); its "
                "saved gradients were already scaled in place. Recompute the loss for each backward."
            )
        ctx.scaled = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place (the saved gradients have no other user, and a copy would add a
        # [V, H] buffer at the backward's peak); a scalar multiply over [N, H] and [V, H] is
        # cheap next to the forward, and skipping it when grad_output == 1 would need a host
        # sync to know.
        scale = grad_output.reshape(()).float()
        if grad_hidden is not None:
            grad_hidden.mul_(scale)
        if grad_weight is not None:
            grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def _check_hidden_args(hidden: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 2:
        raise ValueError(
            "kd_loss_from_hidden: hidden must be a 2-D tensor [N, H]; flatten batch and length first "
            f"(got {getattr(hidden, 'shape', type(hidden).__name__)})"
        )
    if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.ndim != 2:
        raise ValueError(
            "kd_loss_from_hidden: lm_head_weight must be a 2-D tensor [V, H] (nn.Linear.weight layout), "
            f"got {getattr(lm_head_weight, 'shape', type(lm_head_weight).__name__)}"
        )
    if lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"kd_loss_from_hidden: hidden is [N, H={hidden.shape[1]}] but lm_head_weight is "
            f"{tuple(lm_head_weight.shape)}; it must be [V, H={hidden.shape[1]}] (pass the Linear's "
            "weight, not its transpose)"
        )
    if lm_head_weight.dtype != hidden.dtype:
        raise ValueError(
            f"kd_loss_from_hidden: hidden ({hidden.dtype}) and lm_head_weight ({lm_head_weight.dtype}) "
            "must have the same dtype"
        )
    if lm_head_weight.device != hidden.device:
        raise ValueError(
            f"kd_loss_from_hidden: lm_head_weight is on {lm_head_weight.device} but hidden is on {hidden.device}"
        )


def kd_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    target: SparseTarget,
    loss: LossConfig = LossConfig(),
    *,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kd_loss(hidden @ lm_head_weight.T, target, loss, ...)` without the [N, V] logits.

    Args:
        hidden: [N, H] the student's final hidden states (after the last norm), float32 /
            bfloat16 / float16.
        lm_head_weight: [V, H] the output projection's weight (`nn.Linear(H, V).weight`), same
            dtype and device as `hidden`. A bias is not supported (LM heads have none).
        target, loss, labels, return_parts: as for `trainer.losses.kd_loss.kd_loss`
            (same checks, same semantics).
        chunk_size: rows of logits materialized at once; None picks `default_chunk_size(N, V)`
            (as many rows as fit 2^27 logits, 2^20 on the torch path: bounded memory, GEMMs
            large enough to stay efficient; the docstring there says why).

    Returns:
        A float32 scalar (or `(loss, kd, ce)`): the mean over the counted rows of the whole batch
        (not of a chunk). Gradients flow to `hidden` and `lm_head_weight` (computed in the
        forward, chunk by chunk, in their dtype; the weight's is accumulated in fp32 across
        chunks), not to the target. A batch with no counted row gives 0 with zero
        gradients.
    """
    _check_hidden_args(hidden, lm_head_weight)
    n, v = hidden.shape[0], lm_head_weight.shape[0]
    # kd_loss's checks on a stand-in for the logits: a 0-d tensor expanded to [N, V] has their
    # shape, dtype and device but occupies one element.
    logits_like = hidden.new_empty(()).expand(n, v)
    check_kd_loss_args(logits_like, target, loss, labels=labels)
    backend = loss.backend
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "torch"
    if chunk_size is None:
        chunk_size = default_chunk_size(n, v, backend)
    elif not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"kd_loss_from_hidden: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if backend == "triton":
        from trainer.losses.triton_kernel import require_runnable

        require_runnable(hidden)
    # The count of the whole batch, as a device tensor (no host sync per chunk).
    n_total = count_rows(target.ids, v, labels, loss).reshape(1)
    grad_on = torch.is_grad_enabled()
    value, part_sums = KDLossFromHiddenFunction.apply(
        hidden,
        lm_head_weight,
        target,
        labels,
        n_total,
        loss,
        return_parts or loss.alpha < 1,
        backend,
        chunk_size,
        grad_on and hidden.requires_grad,
        grad_on and lm_head_weight.requires_grad,
    )
    if not return_parts:
        return value
    return (value, *part_means(part_sums[None], n_total, labels, loss.ignore_index))
