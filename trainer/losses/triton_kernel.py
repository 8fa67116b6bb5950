"""Fused KD loss against a sparse teacher target: one Triton launch computes loss and gradient.

Layout: math (this comment block) -> `@triton.jit` kernel -> launcher -> autograd.Function.
`trainer.losses.kd_loss.kd_loss` is the public entry point; this module is imported lazily by it so
that `import trainer` does not import triton (TRITON_INTERPRET is read when the kernels below
are decorated, i.e. when this module is first imported).

Per row (token): student logits z in R^V, u = z / T, q = softmax(u). The teacher's side is a
sparse target on the row's stored ids S (in [0, V), first occurrence of each id; padding and
repeats are dropped), in one of two modes:

BUCKET (top-k stores): exact log-probs lp_k = log p_T(k) on S plus one tail bucket, compared
over K+1 buckets:

    lse    = logsumexp_j u_j               lset = logsumexp_{j not in S} u_j   (tail's own LSE)
    q_k    = exp(u_k - lse)   (k in S)     q_t  = exp(lset - lse)
    p_k    = exp(lp_k)        (k in S)     p_t  = max(0, 1 - sum_S p_k),   P = sum_S p_k + p_t
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

WEIGHTED (draws: sampled stores, counts-only, or an exact head + tail draws): a weight w_k on
each stored id, the target mass there (p_T on exact ids, an importance weight on drawn ones,
built by `trainer.losses.targets`), with E[w] = p_T on every id. Only the forward KL has an unbiased
estimator from draws:

    D^ = sum_S w_k (lp_k - log q_k)        (without lp, counts-only: -sum_S w_k log q_k, the
                                            cross-entropy, KL + the teacher's entropy)
    dD^/du_j = W q_j - w_j                 W = sum_S w_k (1 in expectation), w_j = 0 off S

  so every element gets W q_j and the K ids of S get W q_k - w_k: no tail LSE is needed.

Loss per row = alpha * CE(z, y) + (1 - alpha) T^2 D, CE = lse(z) - z_y at T = 1 with
dCE/dz_j = softmax(z)_j - [j == y]; the mean divides by the number of counted rows n (label !=
ignore_index when alpha > 0, else rows with a stored id). So

    grad z_j = (alpha (softmax(z)_j - [j == y]) + (1 - alpha) T dD/du_j) / n.

The kernel also writes each row's T^2 D and CE (before alpha) to an [N, 2] buffer, so the
trainer logs both parts of the loss without another pass over [N, V].

Kernel plan (one program per row):
  0. load the K ids and sort (id, slot) keys: a repeat is an id equal to its sorted neighbour
     (the first occurrence sorts first), so de-duplication costs one sort instead of K^2
     compares. The sorted keys go to a small [N, KP] scratch (read back for the neighbour and,
     in BUCKET mode, to mark S block by block in pass 1). Load the K student logits z_S and z_y
     BEFORE anything is written (the gradient may overwrite z).
  1. stream z once: online softmax at T (over the tail only in BUCKET mode, S masked to -inf)
     and at T = 1 for the CE (shared with the first when T = 1 in WEIGHTED mode).
  2. stream z again and write the per-element formula for every j; after a CTA barrier,
     overwrite the K entries of S (and the CE's -1 at y, folded in) with their own formula.
Everything is fp32 (1 - sum p and the weights' sum are fp64: K values per row), and three
things keep it as exact as the inputs allow: log-probs are formed from log-sums kept as (max,
log of the scaled sum), never as u - lse with lse ~ |u|; rkl and jsd centre their log-ratios on
the bucket that holds most of q (`_centered`); tvd centres its signs by class (`_tvd_centered`).
The gradient is rounded once when stored in the input dtype.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from trainer.losses.config import LossConfig
from trainer.losses.reference import count_rows, loss_from_parts
from trainer.losses.sparse_target import SparseTarget

__all__ = ["KDLossFunction", "block_v_for", "interpreting", "kd_loss_triton", "launch", "require_runnable"]

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
def _centered(q_s, r_s, q_t, r_t):
    """(r_s - rbar, r_t - rbar) with rbar = sum_b q_b r_b over S and the tail (sum_b q_b = 1).

    rkl and jsd gradients are q_b (r_b - rbar). Where one bucket holds nearly all of q, rbar is
    nearly its r and r_b - rbar cancels; so rbar is taken relative to that pivot bucket,
    r_piv - rbar = sum_c q_c (r_piv - r_c), whose terms are small, and r_b - rbar =
    (r_b - r_piv) + (r_piv - rbar). Buckets with q = 0 are left out (their r may be infinite).
    """
    q_max = tl.max(q_s, axis=0)
    r_at_max = tl.max(tl.where((q_s == q_max) & (q_s > 0), r_s, float("-inf")), axis=0)
    r_piv = tl.where(q_t >= q_max, r_t, r_at_max)
    piv_dev = tl.sum(tl.where(q_s > 0, q_s * (r_piv - r_s), 0.0), axis=0)
    piv_dev += tl.where(q_t > 0, q_t * (r_piv - r_t), 0.0)
    return (r_s - r_piv) + piv_dev, (r_t - r_piv) + piv_dev


@triton.jit
def _tvd_centered(g, q_pos, q_neg, q_zero):
    """g - sum_c q_c g_c for tvd's g in {1/2, 0, -1/2}, with q_pos/q_neg/q_zero the mass per class."""
    return tl.where(g > 0, 0.5 * q_zero + q_neg, tl.where(g < 0, -q_pos - 0.5 * q_zero, 0.5 * (q_neg - q_pos)))


@triton.jit
def _online_lse(m, d, u):
    """One block of an online logsumexp: running (max, sum of exp(u - max)) updated with u."""
    m_new = tl.maximum(m, tl.max(u, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, d * tl.exp(m - m_safe) + tl.sum(tl.exp(u - m_safe), axis=0)


@triton.jit
def _kd_loss_kernel(
    logits_ptr,
    logits_stride,
    grad_ptr,
    grad_stride,
    ids_ptr,  # [N, K] int32/int64, contiguous
    logp_ptr,  # [N, K] float, contiguous (dummy unless HAS_LOGP)
    weight_ptr,  # [N, K] float, contiguous (dummy unless WEIGHTED)
    labels_ptr,  # [N] int (dummy unless HAS_LABELS)
    keys_ptr,  # [N, KP] int64 scratch
    n_rows_ptr,  # [1] float32: number of counted rows
    parts_ptr,  # [N, 2] float32: this row's T^2 D (0 when not counted) and CE (0 without a label)
    V,
    K,
    ignore_index,
    inv_t,
    t,
    alpha,
    beta,
    log_beta,
    log_1m_beta,
    DIVERGENCE: tl.constexpr,  # 0 fkl, 1 rkl, 2 jsd, 3 tvd (WEIGHTED: fkl only)
    WEIGHTED: tl.constexpr,  # targets are weights on S, no tail bucket
    HAS_LOGP: tl.constexpr,  # teacher log-probs given (always in BUCKET mode)
    HAS_KD: tl.constexpr,  # compute the KD term (alpha < 1, or asked for the log)
    HAS_LABELS: tl.constexpr,  # compute the CE term
    ROWS_BY_LABELS: tl.constexpr,  # alpha > 0: counted rows are those with a label
    ONE_SOFTMAX: tl.constexpr,  # WEIGHTED, T = 1 and CE: both softmaxes are the same
    COMPUTE_GRAD: tl.constexpr,
    KP: tl.constexpr,  # K rounded up to a power of two
    LOG_KP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 1 << 62
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at N*V >= 2^31
    x_row = logits_ptr + row * logits_stride
    g_row = grad_ptr + row * grad_stride

    # ---- 0. teacher ids: in range, first occurrence only, sorted ------------------------------
    offs_k = tl.arange(0, KP)
    ids_raw = tl.load(ids_ptr + row * K + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
    in_range = (ids_raw >= 0) & (ids_raw < V)
    keys = tl.sort(tl.where(in_range, (ids_raw << LOG_KP) | offs_k, BIG))
    tl.store(keys_ptr + row * KP + offs_k, keys)
    tl.debug_barrier()  # the neighbour loads below (and pass 1's scalar loads) read other threads' stores
    prev = tl.load(keys_ptr + row * KP + offs_k - 1, mask=offs_k > 0, other=-1)
    ids = keys >> LOG_KP
    valid = (keys != BIG) & ((offs_k == 0) | ((prev >> LOG_KP) != ids))
    slot = tl.where(valid, keys & (KP - 1), 0)
    ids_safe = tl.where(valid, ids, 0)
    n_valid = tl.sum(valid.to(tl.int32), axis=0)

    if HAS_LABELS:
        y_raw = tl.load(labels_ptr + row)
        has_label = y_raw != ignore_index
        y_ok = has_label & (y_raw >= 0) & (y_raw < V)
        y = tl.where(y_ok, y_raw, -1)
    else:
        has_label = False
        y = -1
    row_valid = has_label if ROWS_BY_LABELS else n_valid > 0

    # Student logits at S and at the label: loaded before pass 2 may overwrite them in place.
    z_s = tl.load(x_row + ids_safe, mask=valid, other=0.0).to(tl.float32)
    if HAS_LABELS:
        z_y = tl.load(x_row + tl.where(y_ok, y, 0), mask=y_ok, other=NEG_INF).to(tl.float32)

    n_rows = tl.load(n_rows_ptr)
    scale = 1.0 / tl.maximum(n_rows, 1.0)

    # ---- 1. one streaming pass: online softmax at T (tail only in BUCKET mode), and at 1 ------
    m_t = NEG_INF
    d_t = 0.0
    m_1 = NEG_INF
    d_1 = 0.0
    t_idx = 0
    nxt = (tl.load(keys_ptr + row * KP) >> LOG_KP).to(tl.int64)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
        if HAS_KD:
            if WEIGHTED:
                m_t, d_t = _online_lse(m_t, d_t, x * inv_t)
            else:
                # The sorted ids mark S in this block with one compare per id (a repeat marks
                # the same element twice, harmlessly) instead of a [BLOCK_V, K] compare.
                in_s = offs < 0
                while nxt < v0 + BLOCK_V:
                    in_s = in_s | (offs == nxt)
                    t_idx += 1
                    nxt = tl.load(keys_ptr + row * KP + t_idx, mask=t_idx < KP, other=BIG) >> LOG_KP
                m_t, d_t = _online_lse(m_t, d_t, tl.where(in_s, NEG_INF, x * inv_t))
        if HAS_LABELS and not ONE_SOFTMAX:
            m_1, d_1 = _online_lse(m_1, d_1, x)

    # Log-sums are kept as (max, log of the scaled sum) and differences are taken between the
    # maxima first: lse itself is ~|u| (20 at T = 0.5 and |z| = 10), and a log-prob formed as
    # u - lse would inherit its fp32 rounding (1e-6 absolute), which rkl/jsd/tvd amplify.
    kd = 0.0
    ce = 0.0
    if HAS_LABELS:
        if ONE_SOFTMAX:
            m_1 = m_t
            d_1 = d_t
        log_d1 = tl.log(d_1)
        ce = tl.where(has_label, (m_1 - z_y) + log_d1, 0.0)

    if HAS_KD:
        u_s = z_s * inv_t
        if HAS_LOGP:
            lp_s = tl.load(logp_ptr + row * K + slot, mask=valid, other=NEG_INF).to(tl.float32)
            lp_s = tl.where(valid, lp_s, NEG_INF)
        # pass 2's every-element term is exp((u_j - ref_m) - ref_log): q_j (WEIGHTED) or
        # e_j = q_j / q_t (BUCKET, the tail's own LSE)
        ref_m = tl.where(m_t == NEG_INF, 0.0, m_t)
        ref_log = tl.log(d_t)  # -inf when S covers the whole vocabulary
        if WEIGHTED:
            lq_s = tl.where(valid, (u_s - ref_m) - ref_log, NEG_INF)
            q_s = tl.exp(lq_s)
            w_s = tl.load(weight_ptr + row * K + slot, mask=valid, other=0.0).to(tl.float32)
            w_s = tl.where(valid, w_s, 0.0)
            big_w = tl.sum(w_s.to(tl.float64), axis=0).to(tl.float32)
            term = w_s * (lp_s - lq_s) if HAS_LOGP else -w_s * lq_s
            div = tl.sum(tl.where(w_s != 0.0, term, 0.0).to(tl.float64), axis=0).to(tl.float32)
            gu_s = big_w * q_s - w_s
        else:
            m_s = tl.max(tl.where(valid, u_s, NEG_INF), axis=0)
            m_s_safe = tl.where(m_s == NEG_INF, 0.0, m_s)
            log_ds = tl.log(tl.sum(tl.where(valid, tl.exp(u_s - m_s_safe), 0.0), axis=0))
            piv = tl.maximum(m_t, m_s)  # an element of u: finite, since S or the tail is not empty
            a_t = (m_t - piv) + ref_log  # log of the tail's and of S's sums of exp(u - piv)
            a_s = (m_s - piv) + log_ds
            l_all = _logaddexp(a_t, a_s)
            lq_s = tl.where(valid, (u_s - piv) - l_all, NEG_INF)
            q_s = tl.exp(lq_s)
            lq_t = a_t - l_all
            q_t = tl.exp(lq_t)
            p_s = tl.exp(lp_s)
            # 1 - sum p cancels when the top-k holds nearly all the mass, and rkl/jsd are very
            # sensitive to a small p_t (d/dp_t of q_t log(q_t/p_t) is -q_t/p_t): so the sum is
            # taken in fp64 (K values per row, negligible next to the V stream).
            p_sum64 = tl.sum(tl.exp(lp_s.to(tl.float64)), axis=0)
            p_sum = p_sum64.to(tl.float32)
            # When S covers the vocabulary the tail bucket is empty on both sides; the teacher's
            # 1 - sum p is then only rounding residue (it would make fkl = +inf against q_t = 0).
            tail_empty = n_valid == V
            p_t = tl.where(tail_empty, 0.0, tl.maximum(1.0 - p_sum64, 0.0).to(tl.float32))
            lp_t = tl.log(p_t)

            if DIVERGENCE == 0:  # forward KL
                big_p = p_sum + p_t
                div = tl.sum(_plogr(lp_s, lq_s), axis=0) + _plogr(lp_t, lq_t)
                gu_s = q_s * big_p - p_s
                c_t = q_t * big_p - p_t
            elif DIVERGENCE == 1:  # reverse KL
                div = tl.sum(_plogr(lq_s, lp_s), axis=0) + _plogr(lq_t, lp_t)
                dev_s, dev_t = _centered(q_s, lq_s - lp_s, q_t, lq_t - lp_t)
                gu_s = tl.where(q_s > 0, q_s * dev_s, 0.0)
                c_t = tl.where(q_t > 0, q_t * dev_t, 0.0)
            elif DIVERGENCE == 2:  # generalized JSD
                lm_s = _logaddexp(log_beta + lp_s, log_1m_beta + lq_s)
                lm_t = _logaddexp(log_beta + lp_t, log_1m_beta + lq_t)
                kl_qm = tl.sum(_plogr(lq_s, lm_s), axis=0) + _plogr(lq_t, lm_t)
                kl_pm = tl.sum(_plogr(lp_s, lm_s), axis=0) + _plogr(lp_t, lm_t)
                div = beta * kl_pm + (1.0 - beta) * kl_qm
                dev_s, dev_t = _centered(q_s, lq_s - lm_s, q_t, lq_t - lm_t)
                gu_s = tl.where(q_s > 0, (1.0 - beta) * q_s * dev_s, 0.0)
                c_t = tl.where(q_t > 0, (1.0 - beta) * q_t * dev_t, 0.0)
            else:  # total variation
                sg_s = 0.5 * _sign(q_s - p_s)
                sg_t = 0.5 * _sign(q_t - p_t)
                div = 0.5 * (tl.sum(tl.abs(p_s - q_s), axis=0) + tl.abs(p_t - q_t))
                # g_b - gbar = sum_c q_c (g_b - g_c) (sum q = 1) from the student mass in each
                # sign class: no cancellation, where g_b - sum_c q_c g_c loses ~1e-7 absolute.
                q_pos = tl.sum(tl.where(sg_s > 0, q_s, 0.0), axis=0) + tl.where(sg_t > 0, q_t, 0.0)
                q_neg = tl.sum(tl.where(sg_s < 0, q_s, 0.0), axis=0) + tl.where(sg_t < 0, q_t, 0.0)
                q_zero = tl.sum(tl.where(sg_s == 0, q_s, 0.0), axis=0) + tl.where(sg_t == 0, q_t, 0.0)
                gu_s = q_s * _tvd_centered(sg_s, q_pos, q_neg, q_zero)
                c_t = q_t * _tvd_centered(sg_t, q_pos, q_neg, q_zero)
        kd = t * t * div

    tl.store(parts_ptr + row * 2, tl.where(row_valid, kd, 0.0))
    tl.store(parts_ptr + row * 2 + 1, ce)

    # ---- 2. gradient: the every-element formula, then the K entries of S -----------------------
    if COMPUTE_GRAD:
        kd_coef = (1.0 - alpha) * t * scale  # T^2 from the loss times 1/T from u = z / T
        ce_coef = alpha * scale
        if HAS_KD:
            elem_coef = kd_coef * big_w if WEIGHTED else kd_coef * c_t
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            vmask = offs < V
            x = tl.load(x_row + offs, mask=vmask, other=0.0).to(tl.float32)
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_KD:
                # BUCKET: e_j = q_j / q_t, clamped at 1 because for j in S (overwritten below) it
                # can overflow, and for j in the tail it is <= 1 anyway. WEIGHTED: q_j <= 1.
                e = tl.exp(tl.minimum((x * inv_t - ref_m) - ref_log, 0.0))
                g += elem_coef * e
            if ROWS_BY_LABELS:
                sm = e if ONE_SOFTMAX else tl.exp(x - m_1 - log_d1)
                g += ce_coef * (sm - tl.where(offs == y, 1.0, 0.0))
            g = tl.where(row_valid, g, 0.0)
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=vmask)
        if HAS_KD:
            tl.debug_barrier()  # every thread's pass-2 store lands before S is overwritten
            g_s = kd_coef * gu_s
            if ROWS_BY_LABELS:
                g_s += ce_coef * (tl.exp((z_s - m_1) - log_d1) - tl.where(ids == y, 1.0, 0.0))
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


def block_v_for(vocab_size: int, k: int, weighted: bool = False) -> int:
    """Vocabulary block streamed per loop iteration.

    In BUCKET mode marking S costs about BLOCK_V compares per teacher id per row (K * BLOCK_V in
    all) against V loads per pass, so BLOCK_V shrinks as K grows to keep that at most ~2 compares
    per element at V >= 128k; 1024 is the floor below which loop overhead dominates, and 8192 the
    ceiling (16 fp32 values per thread per vector at the 16 warps `num_warps_for` gives it).
    K <= 64 takes 2048 like K <= 128, not 4096: at 8 warps a 4096 block holds 16 values per
    thread per vector, and ptxas spilled 8-16 bytes at 80 registers (fp32/fp16 without CE); at
    2048 every variant fits in 48-60. WEIGHTED mode marks nothing and takes 4096 at any K. Small
    vocabularies use one block. Chosen on paper, then checked to compile without spills on sm_80
    and sm_90 (tests/trainer/test_ptx.py); not yet timed on a GPU: docs/kd_loss.md says how to
    re-tune.
    """
    if weighted:
        bv = 4096
    elif k <= 32:
        bv = 8192
    elif k <= 128:
        bv = 2048
    else:
        bv = 1024
    return min(bv, max(16, triton.next_power_of_2(vocab_size)))


def num_warps_for(block_v: int, kp: int) -> int:
    """Warps per row (one program per row), chosen so that no variant spills registers on sm_80 or
    sm_90 (tests/trainer/test_ptx.py compiles every one and reads `ptxas -v`):

    * 16 for K > 256 (KP >= 512): the [KP] vectors and tl.sort's stages spread over 512 threads.
      At 8 warps K = 4096 took up to 255 registers and spilled 8-32 bytes, and WEIGHTED K = 1024
      spilled 4 bytes on sm_80; at 16 every variant fits in 56-64 (K = 1024) and 84-128
      (K = 4096; 128 is the most a thread can have at 512 threads).
    * 16 for 8192-wide blocks (BUCKET K <= 32): at 8 warps, 32 values per thread per vector took
      128-220 registers and bf16/fp16 spilled 20-28 bytes on sm_80; at 16, 73-127 and no spill.
    * 8 for 2048- and 4096-wide blocks, 4 below (1024: BUCKET 128 < K <= 256).

    ptxas spills a few bytes on its own to reach the next occupancy step when a kernel needs a few
    registers more than one (80 at 8 warps: 3 programs per SM), so a choice that merely fits
    in 255 registers can still spill; only the test tells.
    """
    if kp >= 512 or block_v >= 8192:
        return 16
    return 8 if block_v >= 2048 else 4


def kernel_constexprs(
    *, divergence: str, weighted: bool, has_logp: bool, has_kd: bool, has_labels: bool, rows_by_labels: bool,
    one_softmax: bool, compute_grad: bool, k: int, block_v: int,
) -> dict:
    """The compile-time parameters of one kernel variant (the launcher and tests/trainer/test_ptx.py)."""
    kp = max(16, triton.next_power_of_2(k))
    return dict(
        DIVERGENCE=_DIVERGENCE_CODE[divergence], WEIGHTED=weighted, HAS_LOGP=has_logp, HAS_KD=has_kd,
        HAS_LABELS=has_labels, ROWS_BY_LABELS=rows_by_labels, ONE_SOFTMAX=one_softmax, COMPUTE_GRAD=compute_grad,
        KP=kp, LOG_KP=kp.bit_length() - 1, BLOCK_V=block_v,
    )  # fmt: skip


def launch(
    logits: torch.Tensor,
    target: SparseTarget,
    labels: torch.Tensor | None,
    loss: LossConfig,
    *,
    inplace_grad: bool,
    compute_grad: bool,
    with_kd: bool = True,
    block_v: int | None = None,
    n_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the fused kernel; returns (per-row parts [N, 2] fp32, gradient in logits' dtype or None).

    parts[:, 0] is each counted row's T^2 D and parts[:, 1] each labelled row's CE (`split_parts`
    turns them into the loss and its two means). The gradient is divided by the number of
    counted rows of `logits`, or by `n_rows` (a [1] float32 device tensor) when given:
    `kd_loss_from_hidden` passes the count of the whole batch so that each row chunk gets its
    share of the global mean directly. `with_kd=False` (alpha = 1 only) skips the KD term.
    """
    n, v = logits.shape
    k = target.ids.shape[1]
    device = logits.device
    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the in-place gradient then lands in this copy
    target = target.contiguous()
    ids, logp, weights = target.ids, target.logp, target.weights
    if labels is not None:
        labels = labels.contiguous()
    temperature, beta = loss.temperature, loss.beta
    has_kd = with_kd or loss.alpha < 1.0

    grad = None
    if compute_grad:
        grad = logits if inplace_grad else torch.empty((n, v), dtype=logits.dtype, device=device)
    parts = torch.zeros((n, 2), dtype=torch.float32, device=device)
    if n == 0:
        return parts, grad

    # The number of counted rows stays on the device: no .item() sync.
    if n_rows is None:
        n_rows = count_rows(ids, v, labels, loss).reshape(1)

    const = kernel_constexprs(
        divergence=loss.divergence, weighted=weights is not None, has_logp=logp is not None, has_kd=has_kd,
        has_labels=labels is not None, rows_by_labels=loss.alpha > 0, compute_grad=compute_grad, k=k,
        one_softmax=weights is not None and temperature == 1.0 and labels is not None and has_kd,
        block_v=block_v or block_v_for(v, k, weighted=weights is not None),
    )  # fmt: skip
    keys = torch.empty((n, const["KP"]), dtype=torch.int64, device=device)
    _kd_loss_kernel[(n,)](
        logits,
        logits.stride(0),
        grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0,
        ids,
        logp if logp is not None else parts,
        weights if weights is not None else parts,
        labels if labels is not None else parts,
        keys,
        n_rows,
        parts,
        v,
        k,
        loss.ignore_index,
        1.0 / temperature,
        temperature,
        loss.alpha,
        beta,
        math.log(beta) if 0 < beta < 1 else 0.0,
        math.log1p(-beta) if 0 < beta < 1 else 0.0,
        **const,
        num_warps=num_warps_for(const["BLOCK_V"], const["KP"]),
    )
    return parts, grad




class KDLossFunction(torch.autograd.Function):
    """Forward computes and stores the gradient; backward only scales it by grad_output.

    Returns (loss, parts): the per-row parts [N, 2] of `launch` are not differentiable (they
    are for the log: `part_means`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: torch.Tensor,
        target: SparseTarget,
        labels: torch.Tensor | None,
        n_rows: torch.Tensor,
        loss: LossConfig,
        with_kd: bool,
        inplace_grad: bool,
        block_v: int | None,
        compute_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts, grad = launch(
            logits, target, labels, loss,
            inplace_grad=inplace_grad, compute_grad=compute_grad, with_kd=with_kd, block_v=block_v, n_rows=n_rows,
        )  # fmt: skip
        if grad is not None:
            if grad is logits:
                # The kernel overwrote an input behind autograd's back: bump its version so
                # that any other op that saved `logits` fails loudly instead of silently
                # differentiating through gradient values.
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(grad.detach())
        ctx.mark_non_differentiable(parts)
        return loss_from_parts(parts, loss.alpha, n_rows), parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, _grad_parts: torch.Tensor | None):  # type: ignore[override]
        grad_logits = None
        if ctx.needs_input_grad[0]:
            (grad,) = ctx.saved_tensors
            n, v = grad.shape
            if n > 0:
                bv = min(4096, triton.next_power_of_2(v))
                scale = grad_output.reshape(1).float()
                _scale_kernel[(n,)](grad, grad.stride(0), scale, v, BLOCK_V=bv, num_warps=8 if bv >= 4096 else 4)
            grad_logits = grad
        return grad_logits, None, None, None, None, None, None, None, None


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
    target: SparseTarget,
    labels: torch.Tensor | None,
    loss: LossConfig,
    *,
    with_kd: bool = True,
    inplace_grad: bool = False,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel behind `kd_loss` with backend "triton"; arguments are assumed checked.

    `with_kd=False` (alpha = 1 only) skips the KD term. `block_v` overrides the vocabulary
    block (tests use tiny blocks to cover many iterations). Returns (loss, parts [N, 2]).
    """
    require_runnable(logits)
    n_rows = count_rows(target.ids, logits.shape[1], labels, loss).reshape(1)
    return KDLossFunction.apply(
        logits, target, labels, n_rows, loss, bool(with_kd), bool(inplace_grad), block_v,
        # Decided here, not from ctx.needs_input_grad inside forward: that is True under
        # torch.no_grad() too, and an eval pass must not pay for (or write in place) a gradient.
        torch.is_grad_enabled() and logits.requires_grad,
    )  # fmt: skip
