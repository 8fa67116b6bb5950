"""The sparse-target loss with weights (drawn ids), the per-row parts, and precision at every T.

Both backends against dense float64 oracles that share no code with them: the weighted target
is scattered into a dense [N, V] vector and the loss differentiated by autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_kd_loss import DEVICE, GRAD_ATOL, GRAD_RTOL, IGNORE, LOSS_RTOL, dense_oracle, make_case

from trainer import LossConfig, SparseTarget, kd_loss, kd_loss_from_hidden

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
BACKENDS = ["torch", "triton"]


def make_weighted(n=9, v=53, k=11, *, temperature=1.0, dtype=torch.float32, seed=0, with_logp=True):
    """A sampled-store-like row set: distinct ids with positive weights, padding, a repeat."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 3).to(dtype)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    weights = torch.rand(n, k, generator=g) / k * 1.5  # sum ~ 0.75, as a head + draws row
    logp = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * 2 / temperature, 1)
    logp = logp.gather(1, ids).float()
    ids[1, k // 2 :] = -1  # padding
    ids[2, :] = -1  # a row without ids
    ids[0, -1] = ids[0, 0]  # a repeat: counts once, at its first occurrence
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = IGNORE
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(z), to(ids), to(logp) if with_logp else None, to(weights), to(labels)


def weighted_oracle(z, ids, logp, weights, *, temperature, alpha=0.0, labels=None):
    """(loss, grad, kd mean, ce mean) in float64: T^2 sum_v t_v (lp_v - log q_v) with a dense t."""
    z = z.detach().cpu().double().requires_grad_()
    n, v = z.shape
    t = torch.zeros(n, v, dtype=torch.float64)
    lp = torch.zeros(n, v, dtype=torch.float64)
    seen = torch.zeros(n, v, dtype=torch.bool)
    for r in range(n):
        for c in range(ids.shape[1]):
            i = int(ids[r, c])
            if i >= 0 and not seen[r, i]:
                seen[r, i] = True
                t[r, i] = float(weights[r, c])
                lp[r, i] = float(logp[r, c]) if logp is not None else 0.0
    log_q = torch.log_softmax(z / temperature, dim=1)
    kd_row = temperature**2 * (t * (lp - log_q)).sum(1)
    ce_row = None
    if labels is not None:
        has = labels.cpu() != IGNORE
        ce_row = torch.where(has, F.cross_entropy(z, torch.where(has, labels.cpu(), 0), reduction="none"), 0.0)
    rows = (labels.cpu() != IGNORE) if alpha > 0 else seen.any(1)
    per_row = (1 - alpha) * kd_row + (alpha * ce_row if alpha > 0 else 0.0)
    loss = torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp(min=1)
    loss.backward()
    kd_mean = torch.where(rows, kd_row, 0.0).sum().detach() / rows.sum().clamp(min=1)
    ce_mean = None if ce_row is None else ce_row.sum().detach() / has.sum()
    return loss.detach(), z.grad, kd_mean, ce_mean


@pytest.mark.parametrize("with_logp", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_matches_dense_oracle(backend, temperature, alpha, with_logp):
    z, ids, logp, w, labels = make_weighted(temperature=temperature, seed=int(4 * temperature), with_logp=with_logp)
    zz = z.clone().requires_grad_()
    loss_config = LossConfig(temperature=temperature, alpha=alpha, backend=backend)
    loss, kd, ce = kd_loss(zz, SparseTarget(ids, logp, w), loss_config, labels=labels, return_parts=True)
    loss.backward()
    ref_loss, ref_grad, ref_kd, ref_ce = weighted_oracle(z, ids, logp, w, temperature=temperature, alpha=alpha,
                                                         labels=labels)  # fmt: skip
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zz.grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kd.cpu().double(), ref_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce.cpu().double(), ref_ce, rtol=1e-5, atol=1e-6)
    assert torch.all(zz.grad[2] == 0) if alpha == 0 else torch.all(zz.grad[3] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_input_dtypes(backend, dtype):
    z, ids, logp, w, labels = make_weighted(v=37, k=7, temperature=2.0, dtype=dtype, seed=5)
    zz = z.clone().requires_grad_()
    loss = kd_loss(
        zz, SparseTarget(ids, logp, w), LossConfig(temperature=2.0, alpha=0.3, backend=backend), labels=labels
    )
    loss.backward()
    ref_loss, ref_grad, _, _ = weighted_oracle(z, ids, logp, w, temperature=2.0, alpha=0.3, labels=labels)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=LOSS_RTOL[dtype], atol=1e-6)
    torch.testing.assert_close(zz.grad.cpu().double(), ref_grad, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])


def test_weighted_many_vocab_blocks_and_large_k():
    """Tiny vocabulary blocks (many iterations) and K past the 128 of the sort's small cases."""
    from trainer.losses.triton_kernel import kd_loss_triton

    z, ids, logp, w, labels = make_weighted(n=5, v=301, k=150, seed=7)
    zz = z.clone().requires_grad_()
    loss, _ = kd_loss_triton(zz, SparseTarget(ids, logp, w), labels, LossConfig(temperature=2.0, alpha=0.3), block_v=32)
    loss.backward()
    ref_loss, ref_grad, _, _ = weighted_oracle(z, ids, logp, w, temperature=2.0, alpha=0.3, labels=labels)
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zz.grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", ["rkl", "jsd", "tvd"])
def test_weighted_refuses_divergences_without_an_unbiased_estimate(divergence):
    z, ids, logp, w, _ = make_weighted()
    with pytest.raises(ValueError, match="no unbiased estimate from drawn ids"):
        kd_loss(z, SparseTarget(ids, logp, w), LossConfig(divergence=divergence))
    with pytest.raises(ValueError, match=r"target\.logp is required"):
        kd_loss(z, SparseTarget(ids, None))


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("divergence", ["fkl", "jsd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parts_are_the_two_means_of_the_loss(backend, divergence, alpha):
    """kd and ce from the same pass: each equals its own loss (alpha = 0 / alpha = 1) on the same rows."""
    z, ids, logp, labels = make_case(temperature=2.0, seed=4)
    kw = dict(temperature=2.0, divergence=divergence, backend=backend)
    loss, kd, ce = kd_loss(z, SparseTarget(ids, logp), LossConfig(alpha=alpha, **kw), labels=labels, return_parts=True)
    has = labels != IGNORE
    ref_ce = F.cross_entropy(z.float()[has], labels[has])
    # the KD mean is over the rows the loss counts: labelled ones when alpha > 0 (a labelled row
    # without teacher ids adds 0 to it), else those with a teacher id
    has_ids = (ids >= 0).any(1)
    rows = has if alpha > 0 else has_ids
    ref_kd = kd_loss(z[rows & has_ids], SparseTarget(ids[rows & has_ids], logp[rows & has_ids]), LossConfig(**kw))
    ref_kd = ref_kd * (rows & has_ids).sum() / rows.sum()
    torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd, ref_kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, (1 - alpha) * kd + alpha * ce, rtol=1e-5, atol=1e-6)
    _, _, no_ce = kd_loss(z, SparseTarget(ids, logp), LossConfig(**kw), return_parts=True)
    assert torch.isnan(no_ce)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_logp", [True, False])
def test_weighted_from_hidden_equals_materialized(backend, with_logp):
    g = torch.Generator().manual_seed(3)
    n, h, v, k = 23, 16, 53, 11
    hidden = torch.randn(n, h, generator=g).to(DEVICE)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(DEVICE)
    _, ids, logp, w, labels = make_weighted(n=n, v=v, k=k, seed=9, with_logp=with_logp)
    loss = LossConfig(temperature=2.0, alpha=0.3, backend=backend)
    kw = dict(labels=labels, return_parts=True)

    x1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1, kd1, ce1 = kd_loss(x1 @ w1.T, SparseTarget(ids, logp, w), loss, **kw)
    loss1.backward()
    x2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss2, kd2, ce2 = kd_loss_from_hidden(x2, w2, SparseTarget(ids, logp, w), loss, chunk_size=5, **kw)
    loss2.backward()
    for a, b in ((loss1, loss2), (kd1, kd2), (ce1, ce2), (x1.grad, x2.grad), (w1.grad, w2.grad)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
def test_kernel_precision_is_no_worse_than_torch_fp32(divergence, temperature):
    """fp32 gradients against the float64 oracle, relative to max |grad|: the kernel <= 2e-6 (the
    issue's bound is 2e-5; measured <= 8.2e-7) and no worse than the torch path, including a
    peaked T = 0.5 where lse ~ 20 (the torch path is at 3.4e-5 there for tvd)."""
    worst = {}
    for seed in range(3):
        z, ids, logp, _ = make_case(n=16, v=301, k=17, temperature=temperature, seed=seed)
        _, ref = dense_oracle(z, ids, logp, temperature=temperature, divergence=divergence)
        for backend in BACKENDS:
            zz = z.clone().requires_grad_()
            loss = LossConfig(temperature=temperature, divergence=divergence, backend=backend)
            kd_loss(zz, SparseTarget(ids, logp), loss).backward()
            err = ((zz.grad.cpu().double() - ref).abs().max() / ref.abs().max()).item()
            worst[backend] = max(worst.get(backend, 0.0), err)
    assert worst["triton"] <= 2e-6, worst
    assert worst["triton"] <= worst["torch"] + 1e-7, worst
