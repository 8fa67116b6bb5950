"""Fused top-k KD loss: one Triton launch computes the loss and the gradient (Liger style).

Layout: math (this comment block) -> `@triton.jit` kernel -> launcher -> autograd.Function.
`trainer.kd_loss.kd_loss` is the public entry point; this module is imported lazily by it so
that `import trainer` does not import triton (TRITON_INTERPRET is read when the kernels below
are decorated, i.e. when this module is first imported).

Math, per row (token). Student logits z in R^V, u = z / T, teacher top-k set S (ids that are
in [0, V) and first in their row; repeats and padding are dropped), K+1 buckets b in S + {tail}:

    lse    = logsumexp_j u_j               lset = logsumexp_{j not in S} u_j   (tail's own LSE)
    q_k    = exp(u_k - lse)   (k in S)     q_t  = exp(lset - lse)
    p_k    = exp(topk_logp_k) (k in S)     p_t  = max(0, 1 - sum_S p_k),   P = sum_S p_k + p_t
    (p_t = 0 when S covers all V ids: the tail bucket is then empty on both sides)

For any divergence D(q) over the buckets, with g_b = dD/dq_b and gbar = sum_b q_b g_b, the
softmax chain rule through the bucket sums gives, for element j in bucket b(j),

    dD/du_j = q_j (g_b(j) - gbar),          dD/dz_j = dD/du_j / T.

Within the tail q_j = q_t * e_j with e_j = exp(u_j - lset), so every tail element shares one
per-row scalar: dD/du_j = e_j * C_t with C_t = q_t (g_t - gbar). Per divergence
(0 log 0 = 0 throughout):

    fkl  D = sum_b p_b log(p_b / q_b)              g_b = -p_b / q_b,      gbar = -P
         dD/du_k = q_k P - p_k                     C_t = q_t P - p_t
    rkl  D = sum_b q_b log(q_b / p_b)              g_b = log(q_b/p_b) + 1, gbar = D + 1
         dD/du_k = q_k (log(q_k/p_k) - D)          C_t = q_t (log(q_t/p_t) - D)
    jsd  M = beta p + (1 - beta) q (logaddexp in log space)
         D = beta KL(p||M) + (1 - beta) KL(q||M)   g_b = (1 - beta) log(q_b / M_b)
         dD/du_k = (1-beta) q_k (log(q_k/M_k) - KL(q||M))   C_t likewise with q_t, M_t
    tvd  D = 1/2 sum_b |p_b - q_b|                 g_b = sign(q_b - p_b) / 2 (sign(0) = 0)
         dD/du_k = q_k (g_k - gbar)                C_t = q_t (g_t - gbar)

The fkl tail gradient is e_j (q_t P - p_t) = q_j P - p_t q_j / q_t: the ratio q_j / q_t = e_j
comes from the tail's own LSE, so it is exact even when q_t underflows.

Loss per row = alpha * CE(z, y) + (1 - alpha) T^2 D, CE = lse(z) - z_y at T = 1 with
dCE/dz_j = softmax(z)_j - [j == y]; the mean divides by the number of counted rows n
(label != ignore_index, or any teacher id when there are no labels). So

    grad z_j = (alpha (softmax(z)_j - [j == y]) + (1 - alpha) T dD/du_j) / n.

Kernel plan (one program per row):
  0. load the K teacher ids, drop repeats (first occurrence wins) and padding; load the K
     student logits z_S and z_y BEFORE anything is written (the gradient may overwrite z);
     sort the valid ids into a small [N, KP] scratch so that pass 1 can mark S block by block.
  1. stream z once: online softmax over the tail (S masked to -inf) at T, and over all of z
     at T = 1 for the CE; lse = logaddexp(lset, lse over z_S / T).
  2. stream z again and write the tail formula for every j; after a CTA barrier, overwrite
     the K entries of S (and the CE's -1 at y, which is folded in) with their own formula.
Everything is fp32; the gradient is rounded once when stored in the input dtype.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["KDLossFunction", "block_v_for", "interpreting", "kd_loss_triton", "require_runnable"]

_DIVERGENCE_CODE = {"fkl": 0, "rkl": 1, "jsd": 2, "tvd": 3}


@triton.jit
def _logaddexp(a, b):
    """log(exp(a) + exp(b)) that returns -inf (not NaN) when both are -inf."""
    m = tl.maximum(a, b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe))


@triton.jit
def _plogr(log_a, log_b):
    """a * (log a - log b) with a = exp(log_a); 0 where a == 0 (0 log 0 = 0)."""
    pos = log_a > float("-inf")
    la = tl.where(pos, log_a, 0.0)
    return tl.where(pos, tl.exp(la) * (la - log_b), 0.0)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _kd_loss_kernel(
    logits_ptr,
    logits_stride,
    grad_ptr,
    grad_stride,
    ids_ptr,  # [N, K] int32/int64, contiguous
    logp_ptr,  # [N, K] float, contiguous
    labels_ptr,  # [N] int (dummy unless HAS_LABELS)
    sorted_ptr,  # [N, KP] int32 scratch (dummy unless HAS_KD)
    n_rows_ptr,  # [1] float32: number of counted rows
    loss_ptr,  # [N] float32: this row's share of the mean
    V,
    K,
    ignore_index,
    inv_t,
    t,
    alpha,
    beta,
    log_beta,
    log_1m_beta,
    DIVERGENCE: tl.constexpr,  # 0 fkl, 1 rkl, 2 jsd, 3 tvd
    HAS_KD: tl.constexpr,  # alpha < 1
    HAS_CE: tl.constexpr,  # alpha > 0
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    KP: tl.constexpr,  # K rounded up to a power of two
    KB: tl.constexpr,  # chunk of ids compared at once by the de-duplication
    BLOCK_V: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at N*V >= 2^31
    x_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride

    # ---- 0. teacher ids: in range, first occurrence only -------------------------------------
    offs_k = tl.arange(0, KP)
    ids_raw = tl.load(ids_ptr + row * K + offs_k, mask=offs_k < K, other=-1)
    valid = (ids_raw >= 0) & (ids_raw < V)  # on the raw (maybe int64) values, before narrowing
    ids = tl.where(valid, ids_raw, -1).to(tl.int32)
    repeat = tl.zeros([KP], dtype=tl.int32)
    for kb in tl.static_range(0, KP, KB):
        offs_b = kb + tl.arange(0, KB)
        ids_b = tl.load(ids_ptr + row * K + offs_b, mask=offs_b < K, other=-1)
        ids_b = tl.where((ids_b >= 0) & (ids_b < V), ids_b, -1).to(tl.int32)  # int64 could wrap
        earlier = (ids[:, None] == ids_b[None, :]) & (offs_b[None, :] < offs_k[:, None])
        repeat = tl.maximum(repeat, tl.max(earlier.to(tl.int32), axis=1))
    valid = valid & (repeat == 0)
    ids_safe = tl.where(valid, ids, 0)

    if HAS_LABELS:
        y_raw = tl.load(labels_ptr + row)
        row_valid = y_raw != ignore_index
        y_ok = row_valid & (y_raw >= 0) & (y_raw < V)
        y = tl.where(y_ok, y_raw, -1).to(tl.int32)
    else:
        row_valid = tl.sum(valid.to(tl.int32)) > 0
        y = -1

    # Student logits at S and at the label: loaded before pass 2 may overwrite them in place.
    z_s = tl.load(x_row + ids_safe, mask=valid, other=0.0).to(tl.float32)
    if HAS_CE:
        z_y = tl.load(x_row + tl.where(y_ok, y, 0), mask=y_ok, other=NEG_INF).to(tl.float32)

    n_rows = tl.load(n_rows_ptr)
    scale = 1.0 / tl.maximum(n_rows, 1.0)

    if HAS_KD:
        # Sorted valid ids (BIG past the end) let pass 1 mark S in each block with a handful of
        # compares per id instead of a [BLOCK_V, K] compare per block.
        srt = tl.sort(tl.where(valid, ids, BIG))
        tl.store(sorted_ptr + row * KP + offs_k, srt)
        tl.debug_barrier()  # the scalar loads below read other threads' stores

    # ---- 1. one streaming pass: tail online softmax at T, full online softmax at 1 -----------
    m_t = NEG_INF
    d_t = 0.0
    m_1 = NEG_INF
    d_1 = 0.0
    t_idx = 0
    nxt = BIG
    if HAS_KD:
        nxt = tl.load(sorted_ptr + row * KP)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        if HAS_KD:
            in_s = offs < 0
            while nxt < v0 + BLOCK_V:
                in_s = in_s | (offs == nxt)
                t_idx += 1
                nxt = tl.load(sorted_ptr + row * KP + t_idx, mask=t_idx < KP, other=BIG)
            u = tl.where(in_s, NEG_INF, x * inv_t)
            m_new = tl.maximum(m_t, tl.max(u, axis=0))
            m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
            d_t = d_t * tl.exp(m_t - m_safe) + tl.sum(tl.exp(u - m_safe), axis=0)
            m_t = m_new
        if HAS_CE:
            m_new1 = tl.maximum(m_1, tl.max(x, axis=0))
            m_safe1 = tl.where(m_new1 == NEG_INF, 0.0, m_new1)
            d_1 = d_1 * tl.exp(m_1 - m_safe1) + tl.sum(tl.exp(x - m_safe1), axis=0)
            m_1 = m_new1

    loss = 0.0
    if HAS_CE:
        lse_1 = m_1 + tl.log(d_1)
        loss += alpha * (lse_1 - z_y)

    if HAS_KD:
        lset = m_t + tl.log(d_t)  # -inf when S covers the whole vocabulary
        u_s = z_s * inv_t
        m_s = tl.max(tl.where(valid, u_s, NEG_INF), axis=0)
        m_s_safe = tl.where(m_s == NEG_INF, 0.0, m_s)
        lse_s = m_s_safe + tl.log(tl.sum(tl.where(valid, tl.exp(u_s - m_s_safe), 0.0), axis=0))
        lse = _logaddexp(lset, lse_s)
        lq_s = tl.where(valid, u_s - lse, NEG_INF)
        q_s = tl.exp(lq_s)
        lq_t = lset - lse
        q_t = tl.exp(lq_t)

        lp_s = tl.load(logp_ptr + row * K + offs_k, mask=valid, other=NEG_INF).to(tl.float32)
        lp_s = tl.where(valid, lp_s, NEG_INF)
        p_s = tl.exp(lp_s)
        # 1 - sum p cancels when the top-k holds nearly all the mass, and rkl/jsd are very
        # sensitive to a small p_t (d/dp_t of q_t log(q_t/p_t) is -q_t/p_t): so the sum is
        # taken in fp64 (K values per row, negligible next to the V stream).
        p_sum64 = tl.sum(tl.exp(lp_s.to(tl.float64)), axis=0)
        p_sum = p_sum64.to(tl.float32)
        # When S covers the vocabulary the tail bucket is empty on both sides; the teacher's
        # 1 - sum p is then only rounding residue (it would make fkl = +inf against q_t = 0).
        tail_empty = tl.sum(valid.to(tl.int32), axis=0) == V
        p_t = tl.where(tail_empty, 0.0, tl.maximum(1.0 - p_sum64, 0.0).to(tl.float32))
        lp_t = tl.log(p_t)

        if DIVERGENCE == 0:  # forward KL
            big_p = p_sum + p_t
            div = tl.sum(_plogr(lp_s, lq_s), axis=0) + _plogr(lp_t, lq_t)
            gu_s = q_s * big_p - p_s
            c_t = q_t * big_p - p_t
        elif DIVERGENCE == 1:  # reverse KL
            div = tl.sum(_plogr(lq_s, lp_s), axis=0) + _plogr(lq_t, lp_t)
            gu_s = tl.where(q_s > 0, q_s * (lq_s - lp_s - div), 0.0)
            c_t = tl.where(q_t > 0, q_t * (lq_t - lp_t - div), 0.0)
        elif DIVERGENCE == 2:  # generalized JSD
            lm_s = _logaddexp(log_beta + lp_s, log_1m_beta + lq_s)
            lm_t = _logaddexp(log_beta + lp_t, log_1m_beta + lq_t)
            kl_qm = tl.sum(_plogr(lq_s, lm_s), axis=0) + _plogr(lq_t, lm_t)
            kl_pm = tl.sum(_plogr(lp_s, lm_s), axis=0) + _plogr(lp_t, lm_t)
            div = beta * kl_pm + (1.0 - beta) * kl_qm
            gu_s = tl.where(q_s > 0, (1.0 - beta) * q_s * (lq_s - lm_s - kl_qm), 0.0)
            c_t = tl.where(q_t > 0, (1.0 - beta) * q_t * (lq_t - lm_t - kl_qm), 0.0)
        else:  # total variation
            sg_s = 0.5 * _sign(q_s - p_s)
            sg_t = 0.5 * _sign(q_t - p_t)
            div = 0.5 * (tl.sum(tl.abs(p_s - q_s), axis=0) + tl.abs(p_t - q_t))
            gbar = tl.sum(q_s * sg_s, axis=0) + q_t * sg_t
            gu_s = q_s * (sg_s - gbar)
            c_t = q_t * (sg_t - gbar)
        loss += (1.0 - alpha) * t * t * div

    tl.store(loss_ptr + row, tl.where(row_valid, loss * scale, 0.0))

    # ---- 2. gradient: tail formula everywhere, then the K entries of S -----------------------
    if COMPUTE_GRAD:
        kd_coef = (1.0 - alpha) * t * scale  # T^2 from the loss times 1/T from u = z / T
        ce_coef = alpha * scale
        if HAS_KD:
            tail_coef = kd_coef * c_t
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            vmask = offs < V
            x = tl.load(x_row + offs, mask=vmask, other=0.0).to(tl.float32)
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_KD:
                # e_j = q_j / q_t; clamped at 1 because for j in S (overwritten below) it can
                # overflow, and for j in the tail it is <= 1 anyway.
                g += tail_coef * tl.exp(tl.minimum(x * inv_t - lset, 0.0))
            if HAS_CE:
                g += ce_coef * (tl.exp(x - lse_1) - tl.where(offs == y, 1.0, 0.0))
            g = tl.where(row_valid, g, 0.0)
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=vmask)
        if HAS_KD:
            tl.debug_barrier()  # every thread's pass-2 store lands before S is overwritten
            g_s = kd_coef * gu_s
            if HAS_CE:
                g_s += ce_coef * (tl.exp(z_s - lse_1) - tl.where(ids == y, 1.0, 0.0))
            # where(), not `valid & row_valid`: the interpreter turns a vector & scalar mask into int
            tl.store(g_row + ids_safe, g_s.to(grad_ptr.dtype.element_ty), mask=tl.where(row_valid, valid, False))


@triton.jit
def _scale_kernel(grad_ptr, grad_stride, scale_ptr, V, BLOCK_V: tl.constexpr):
    """grad *= scale in place, in fp32 (a bf16 product would round the scale first).

    The test for scale == 1 happens on the device, per row: the common `loss.backward()` then
    costs no memory traffic, and the host never has to read grad_output (no sync).
    """
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(scale_ptr).to(tl.float32)
    if s != 1.0:
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            ptr = grad_ptr + row * grad_stride + offs
            g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptr, (g * s).to(grad_ptr.dtype.element_ty), mask=mask)


def interpreting() -> bool:
    """True when the kernels can run in the Triton interpreter.

    Both our kernels and triton's own jit'd library functions (`tl.sum`, `tl.sort`...) must have
    been built with TRITON_INTERPRET=1: if `triton` was imported before it was set, the
    library functions are compiled-mode and an interpreted kernel cannot call them.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kd_loss_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)


def block_v_for(vocab_size: int, k: int) -> int:
    """Vocabulary block streamed per loop iteration.

    Marking S costs about BLOCK_V compares per teacher id per row (K * BLOCK_V in all) against
    V loads per pass, so BLOCK_V shrinks as K grows to keep that under ~2 compares per element
    at V >= 128k; 1024 is the floor below which loop overhead dominates, and 8192 fp32 values
    (32 per thread at 8 warps) the ceiling for registers. Small vocabularies use one block.
    These are starting points chosen on paper; docs/kd_loss.md says how to re-tune on a GPU.
    """
    if k <= 32:
        bv = 8192
    elif k <= 64:
        bv = 4096
    elif k <= 128:
        bv = 2048
    else:
        bv = 1024
    return min(bv, max(16, triton.next_power_of_2(vocab_size)))


def _launch(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logp: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    divergence: str,
    beta: float,
    alpha: float,
    ignore_index: int,
    inplace_grad: bool,
    compute_grad: bool,
    block_v: int | None,
    n_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the fused kernel; returns (scalar fp32 loss, gradient in logits' dtype or None).

    The loss and gradient are divided by the number of counted rows of `logits`, or by
    `n_rows` (a [1] float32 device tensor) when given: `kd_loss_from_hidden` passes the count
    of the whole batch so that each row chunk gets its share of the global mean directly.
    """
    n, v = logits.shape
    k = topk_ids.shape[1]
    device = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the in-place gradient then lands in this copy
    ids = topk_ids.contiguous()
    logp = topk_logp.contiguous()
    has_kd = alpha < 1.0
    has_ce = alpha > 0.0

    grad = None
    if compute_grad:
        grad = logits if inplace_grad else torch.empty((n, v), dtype=logits.dtype, device=device)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=device), grad

    # The number of counted rows stays on the device: no .item() sync.
    if labels is not None:
        labels = labels.contiguous()
    if n_rows is None and labels is not None:
        n_rows = (labels != ignore_index).sum(dtype=torch.float32).reshape(1)
    elif n_rows is None:
        n_rows = ((ids >= 0) & (ids < v)).any(dim=1).sum(dtype=torch.float32).reshape(1)

    kp = max(16, triton.next_power_of_2(k))
    bv = block_v or block_v_for(v, k)
    loss_rows = torch.empty(n, dtype=torch.float32, device=device)
    scratch = torch.empty((n, kp) if has_kd else (1,), dtype=torch.int32, device=device)
    _kd_loss_kernel[(n,)](
        logits,
        logits.stride(0),
        grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0,
        ids,
        logp,
        labels if labels is not None else loss_rows,
        scratch,
        n_rows,
        loss_rows,
        v,
        k,
        ignore_index,
        1.0 / temperature,
        float(temperature),
        float(alpha),
        float(beta),
        math.log(beta) if 0 < beta < 1 else 0.0,
        math.log1p(-beta) if 0 < beta < 1 else 0.0,
        DIVERGENCE=_DIVERGENCE_CODE[divergence],
        HAS_KD=has_kd,
        HAS_CE=has_ce,
        HAS_LABELS=labels is not None,
        COMPUTE_GRAD=compute_grad,
        KP=kp,
        KB=min(kp, 32),
        BLOCK_V=bv,
        num_warps=8 if bv >= 4096 else 4,
    )
    # A fixed-order sum of per-row terms: deterministic, unlike an atomic add.
    return loss_rows.sum(), grad


class KDLossFunction(torch.autograd.Function):
    """Forward computes and stores the gradient; backward only scales it by grad_output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_logp: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        divergence: str,
        beta: float,
        alpha: float,
        ignore_index: int,
        inplace_grad: bool,
        block_v: int | None,
        compute_grad: bool,
    ) -> torch.Tensor:
        loss, grad = _launch(
            logits,
            topk_ids,
            topk_logp,
            labels,
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            alpha=alpha,
            ignore_index=ignore_index,
            inplace_grad=inplace_grad,
            compute_grad=compute_grad,
            block_v=block_v,
        )
        if grad is not None:
            if grad is logits:
                # The kernel overwrote an input behind autograd's back: bump its version so
                # that any other op that saved `logits` fails loudly instead of silently
                # differentiating through gradient values.
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(grad.detach())
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_logits = None
        if ctx.needs_input_grad[0]:
            (grad,) = ctx.saved_tensors
            n, v = grad.shape
            if n > 0:
                bv = min(4096, triton.next_power_of_2(v))
                scale = grad_output.reshape(1).float()
                _scale_kernel[(n,)](grad, grad.stride(0), scale, v, BLOCK_V=bv, num_warps=8 if bv >= 4096 else 4)
            grad_logits = grad
        return grad_logits, None, None, None, None, None, None, None, None, None, None, None


def require_runnable(t: torch.Tensor) -> None:
    """Raise ValueError when the kernel cannot run on `t`'s device (CPU without the interpreter)."""
    if not t.is_cuda and not interpreting():
        raise ValueError(
            "kd_loss: backend='triton' got CPU tensors but the Triton interpreter is off; set "
            "TRITON_INTERPRET=1 before triton is first imported (by this module or any other), or use "
            "backend='torch'"
            + (" (TRITON_INTERPRET is set now, but was not at import)" if os.environ.get("TRITON_INTERPRET") else "")
        )


def kd_loss_triton(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logp: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    inplace_grad: bool = False,
    block_v: int | None = None,
) -> torch.Tensor:
    """The fused kernel behind `kd_loss(..., backend="triton")`; arguments are assumed checked.

    `block_v` overrides the vocabulary block (tests use tiny blocks to cover many iterations).
    """
    require_runnable(logits)
    return KDLossFunction.apply(
        logits,
        topk_ids,
        topk_logp,
        labels,
        float(temperature),
        divergence,
        float(beta),
        float(alpha),
        int(ignore_index),
        bool(inplace_grad),
        block_v,
        # Decided here, not from ctx.needs_input_grad inside forward: that is True under
        # torch.no_grad() too, and an eval pass must not pay for (or write in place) a gradient.
        torch.is_grad_enabled() and logits.requires_grad,
    )
