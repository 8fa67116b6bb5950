"""Tests of the top-k KD loss: the fused Triton kernel and the torch reference.

The oracle materializes dense float64 distributions (q = softmax(z / T) over all V ids, the
buckets formed by a dense membership mask, the tail as a plain sum of q over non-members) and
differentiates them with autograd, so it shares no code or formula with either backend.
On CPU the kernel runs under TRITON_INTERPRET=1 (tests/trainer/conftest.py); with CUDA the
same tests run on the GPU, and the @pytest.mark.gpu tests add real shapes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from trainer import LossConfig, SparseTarget, kd_loss, teacher_logprobs_at_temperature
from trainer.losses.reference import kd_loss_reference

# The interpreter evaluates both sides of tl.where in numpy, so masked lanes (-inf - -inf,
# log 0) raise numpy RuntimeWarnings that say nothing about the result.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "triton"]
DIVERGENCES = ["fkl", "rkl", "jsd", "tvd"]
IGNORE = -100

# Measured worst cases over test_matches_dense_oracle / test_input_dtypes (docs/kd_loss.md):
# loss relative error <= 6.4e-7 for every dtype (fp32 math on the same rounded logits);
# gradient absolute error fp32 9e-8, fp16 2.9e-5, bf16 2.4e-4 (4.7e-4 for the kernel under
# the interpreter, whose bf16 cast truncates). Gradients are O(T / N), so errors are absolute,
# plus a relative term for the largest entries; the bounds leave about 10x headroom.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_ATOL = {torch.float32: 1e-6, torch.bfloat16: 2e-3, torch.float16: 3e-4}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 8e-3, torch.float16: 1e-3}


# ----------------------------------------------------------------------------------------------
# Inputs and the dense oracle
# ----------------------------------------------------------------------------------------------


def make_case(
    n: int = 7,
    v: int = 61,
    k: int = 9,
    *,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    pad_and_dup: bool = True,
    full_vocab: bool = False,
):
    """Student logits, teacher top-k (at `temperature`) with padding/duplicates, and labels.

    Row 0 repeats an id (the repeat carries a wrong log-prob that must be ignored), row 1 is
    padded, row 2 is all padding, row 3's label is ignored.
    """
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 3).to(dtype)
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    logp_full = torch.log_softmax(teacher / temperature, dim=1)
    if full_vocab:
        ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    else:
        ids = torch.topk(teacher, k, dim=1).indices
    logp = logp_full.gather(1, ids).float()
    if pad_and_dup and not full_vocab:
        ids[0, -1] = ids[0, 0]
        logp[0, -1] = -0.25  # a duplicate's log-prob is not used
        ids[1, k // 2 :] = -1
        logp[1, k // 2 :] = 0.0  # neither is padding's
        ids[2, :] = -1
        logp[2, :] = float("-inf")
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = IGNORE
    return z.to(DEVICE), ids.to(DEVICE), logp.to(DEVICE), labels.to(DEVICE)


def _xlogy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * log b, 0 where a == 0, with a NaN-free gradient there."""
    pos = a > 0
    return torch.where(pos, a * torch.log(torch.where(pos, b, 1.0)), 0.0)


def dense_oracle(z, ids, logp, *, temperature, divergence, beta=0.5, alpha=0.0, labels=None):
    """(loss, grad) in float64 from materialized [N, V+1] bucket distributions."""
    z = z.detach().cpu().double().requires_grad_()
    ids, logp = ids.cpu(), logp.cpu().double()
    n, v = z.shape
    member = torch.zeros(n, v, dtype=torch.bool)
    p_dense = torch.zeros(n, v, dtype=torch.float64)
    for r in range(n):
        for c in range(ids.shape[1]):
            i = int(ids[r, c])
            if 0 <= i < v and not member[r, i]:  # first occurrence wins
                member[r, i] = True
                p_dense[r, i] = math.exp(float(logp[r, c]))
    q = torch.softmax(z / temperature, dim=1)
    q_b = torch.cat([q * member, (q * ~member).sum(1, keepdim=True)], dim=1)
    tail_empty = member.all(1, keepdim=True)
    p_tail = torch.where(tail_empty, 0.0, (1 - p_dense.sum(1, keepdim=True)).clamp(min=0))
    p_b = torch.cat([p_dense, p_tail], dim=1)
    if divergence == "fkl":
        d = (_xlogy(p_b, p_b) - _xlogy(p_b, q_b)).sum(1)
    elif divergence == "rkl":
        d = (_xlogy(q_b, q_b) - _xlogy(q_b, p_b)).sum(1)
    elif divergence == "jsd":
        m = beta * p_b + (1 - beta) * q_b
        d = beta * (_xlogy(p_b, p_b) - _xlogy(p_b, m)).sum(1) + (1 - beta) * (
            _xlogy(q_b, q_b) - _xlogy(q_b, m)
        ).sum(1)
    else:
        d = 0.5 * (p_b - q_b).abs().sum(1)
    per_row = (1 - alpha) * temperature**2 * d
    if labels is not None and alpha > 0:  # labels choose the rows only when the CE is in the loss
        rows = labels.cpu() != IGNORE
        ce = F.cross_entropy(z, torch.where(rows, labels.cpu(), 0), reduction="none")
        per_row = per_row + alpha * ce
    else:
        rows = member.any(1)
    loss = torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp(min=1)
    loss.backward()
    return loss.detach(), z.grad


def run(backend, z, ids, logp, *, grad_scale: float = 1.0, labels=None, **settings):
    """(loss, grad of grad_scale * loss) for one backend; z is not modified. `settings` are
    LossConfig's fields (the dense oracle's keywords)."""
    zz = z.detach().clone().requires_grad_()
    loss = kd_loss(zz, SparseTarget(ids, logp), LossConfig(backend=backend, **settings), labels=labels)
    (loss * grad_scale).backward()
    return loss.detach().cpu().double(), zz.grad.cpu().double()


def assert_close_to_oracle(loss, grad, ref_loss, ref_grad, dtype=torch.float32):
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL[dtype], atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])


# ----------------------------------------------------------------------------------------------
# Agreement with the oracle
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense_oracle(backend, divergence, temperature, alpha):
    seed = 10 * DIVERGENCES.index(divergence) + int(2 * temperature)
    z, ids, logp, labels = make_case(temperature=temperature, seed=seed)
    kw = dict(temperature=temperature, divergence=divergence, alpha=alpha, labels=labels)
    loss, grad = run(backend, z, ids, logp, **kw)
    ref_loss, ref_grad = dense_oracle(z, ids, logp, **kw)
    assert_close_to_oracle(loss, grad, ref_loss, ref_grad)
    if alpha > 0:  # at alpha = 0 the labels do not choose the rows: row 3 has teacher ids
        assert torch.all(grad[3] == 0), "the ignored row must get an exactly zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtypes(backend, divergence, dtype):
    # The oracle sees the same (rounded) logits, so the only dtype error left is the single
    # rounding of the gradient to `dtype`.
    z, ids, logp, labels = make_case(v=37, k=7, temperature=2.0, dtype=dtype, seed=1)
    kw = dict(temperature=2.0, divergence=divergence, alpha=0.3, labels=labels)
    loss, grad = run(backend, z, ids, logp, **kw)
    ref_loss, ref_grad = dense_oracle(z, ids, logp, **kw)
    assert_close_to_oracle(loss, grad, ref_loss, ref_grad, dtype)
    # One rounding: the gradient is the fp32 gradient of the same logits, rounded once.
    _, g32 = run(backend, z.float(), ids, logp, **kw)
    g32 = g32.float()
    rounded = g32.to(dtype).double()
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED:
        # The interpreter's fp32 -> bf16 cast truncates (a GPU rounds to nearest even), so
        # accept either rounding of the same fp32 value, elementwise.
        truncated = (g32.view(torch.int32) & -65536).view(torch.float32).to(dtype).double()
        assert torch.all((grad == rounded) | (grad == truncated))
    else:
        torch.testing.assert_close(grad, rounded, rtol=0, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_vocabulary_is_exact(backend, divergence, temperature):
    """With K = V (ids in random order) the K+1-bucket loss is the full-vocabulary divergence."""
    v, t, beta = 37, temperature, 0.5
    z, ids, logp, _ = make_case(v=v, k=v, temperature=t, full_vocab=True, seed=2)
    loss, grad = run(backend, z, ids, logp, temperature=t, divergence=divergence, beta=beta)

    zz = z.detach().cpu().double().requires_grad_()
    log_q = torch.log_softmax(zz / t, dim=1)
    log_p = torch.empty_like(log_q).scatter_(1, ids.cpu(), logp.cpu().double())
    p, q = log_p.exp(), log_q.exp()
    if divergence == "fkl":
        d = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(1)
    elif divergence == "rkl":
        d = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(1)
    elif divergence == "jsd":
        log_m = torch.log(beta * p + (1 - beta) * q)
        d = beta * (p * (log_p - log_m)).sum(1) + (1 - beta) * (q * (log_q - log_m)).sum(1)
    else:
        d = 0.5 * (p - q).abs().sum(1)
    expected = t * t * d.mean()
    expected.backward()
    assert_close_to_oracle(loss, grad, expected.detach(), zz.grad)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_many_vocab_blocks(divergence):
    """Tiny vocabulary blocks: S spans many blocks, several ids share one, the last is partial."""
    from trainer.losses.triton_kernel import kd_loss_triton

    z, ids, logp, labels = make_case(v=129, k=40, temperature=2.0, seed=3)
    ids[4, :6] = torch.arange(16, 22)  # a run of ids inside one block
    ids[5, :3] = torch.tensor([0, 127, 128])  # the first and last vocabulary entries
    settings = dict(temperature=2.0, divergence=divergence, alpha=0.3)
    zz = z.clone().requires_grad_()
    loss, _ = kd_loss_triton(zz, SparseTarget(ids, logp), labels, LossConfig(**settings), block_v=16)
    loss.backward()
    ref_loss, ref_grad = dense_oracle(z, ids, logp, labels=labels, **settings)
    assert_close_to_oracle(loss.detach().cpu().double(), zz.grad.cpu().double(), ref_loss, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_student_tail_is_exact(backend):
    """q_tail ~ 1e-13: 1 - sum_S q would be pure rounding, the tail's own LSE is not."""
    z, ids, logp, _ = make_case(v=61, k=8, pad_and_dup=False, seed=4)
    z = z.float().scatter(1, ids, 40.0)  # the student puts all but ~1e-13 of its mass on S
    logp = logp - torch.logsumexp(logp, 1, keepdim=True) + math.log(0.95)  # teacher tail = 0.05
    loss, grad = run(backend, z, ids, logp, divergence="fkl")
    ref_loss, ref_grad = dense_oracle(z, ids, logp, temperature=1.0, divergence="fkl")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    tail = torch.ones_like(grad, dtype=torch.bool).scatter_(1, ids.cpu(), False)
    # Tail-id gradients are ~1e-3 here; check them relative to themselves, not to S's.
    torch.testing.assert_close(grad[tail], ref_grad[tail], rtol=1e-4, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_logits_stay_finite(backend):
    z, ids, logp, labels = make_case(temperature=0.5, seed=5)
    z = z * 40  # logit gaps in the hundreds
    kw = dict(temperature=0.5, divergence="jsd", alpha=0.3, labels=labels)
    loss, grad = run(backend, z, ids, logp, **kw)
    ref_loss, ref_grad = dense_oracle(z, ids, logp, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close_to_oracle(loss, grad, ref_loss, ref_grad)


# ----------------------------------------------------------------------------------------------
# Padding, duplicates, ignored tokens
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_count_once(backend, divergence):
    z, ids, logp, labels = make_case(v=37, k=6, pad_and_dup=False, seed=6)
    dup_ids, dup_logp = ids.clone(), logp.clone()
    dup_ids[:, 3] = dup_ids[:, 1]
    dup_ids[:, 5] = dup_ids[:, 1]
    dup_logp[:, 3] = -0.1  # the repeats' log-probs must be ignored
    dedup_ids, dedup_logp = dup_ids.clone(), dup_logp.clone()
    dedup_ids[:, [3, 5]] = -1
    kw = dict(temperature=2.0, divergence=divergence, alpha=0.3, labels=labels)
    loss_dup, grad_dup = run(backend, z, dup_ids, dup_logp, **kw)
    loss_ref, grad_ref = run(backend, z, dedup_ids, dedup_logp, **kw)
    # Equal up to the order of the kernel's sums (a repeat sits next to its first occurrence in
    # the sorted ids, padding at the end).
    torch.testing.assert_close(loss_dup, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_dup, grad_ref, rtol=1e-6, atol=1e-10)
    # ... and not "last occurrence wins", which would use the repeat's log-prob
    last_ids = dup_ids.clone()
    last_ids[:, [1, 5]] = -1
    loss_last, _ = run(backend, z, last_ids, dup_logp, **kw)
    assert not torch.allclose(loss_dup, loss_last)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["teacher_all_padding", "alpha_ce_all_ignored"])
def test_batch_without_valid_tokens(backend, divergence, how):
    z, ids, logp, labels = make_case(seed=7)
    kw = dict(temperature=2.0, divergence=divergence)
    if how == "teacher_all_padding":
        ids = torch.full_like(ids, -1)
    else:
        kw["labels"] = torch.full_like(labels, IGNORE)
        kw["alpha"] = 0.5
    loss, grad = run(backend, z, ids, logp, grad_scale=3.0, **kw)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_none_counts_rows_with_teacher_ids(backend):
    """Without labels the mean is over rows with any non-padding id (row 2 is all padding)."""
    z, ids, logp, _ = make_case(seed=8)
    loss, grad = run(backend, z, ids, logp, temperature=2.0, divergence="fkl")
    ref_loss, ref_grad = dense_oracle(z, ids, logp, temperature=2.0, divergence="fkl")
    assert_close_to_oracle(loss, grad, ref_loss, ref_grad)
    assert torch.all(grad[2] == 0)


# ----------------------------------------------------------------------------------------------
# Autograd plumbing of the kernel
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_grad_output_and_inplace(inplace, dtype):
    z, ids, logp, labels = make_case(v=61, k=9, temperature=2.0, dtype=dtype, seed=9)
    settings = dict(temperature=2.0, divergence="fkl", alpha=0.3)
    leaf = z.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, like a model's output
    loss = kd_loss(
        logits, SparseTarget(ids, logp), LossConfig(backend="triton", **settings), labels=labels, inplace_grad=inplace
    )
    (loss * 2.5).backward()
    ref_loss, ref_grad = dense_oracle(z, ids, logp, labels=labels, **settings)
    assert_close_to_oracle(loss.detach().cpu().double(), leaf.grad.cpu().double() / 2.5, ref_loss, ref_grad, dtype)
    if inplace:
        # the gradient was written into the logits buffer, which is then scaled by grad_output
        assert torch.equal(logits.detach(), leaf.grad)
    else:
        assert torch.equal(logits.detach(), z)


def test_inplace_overwrite_is_detected_by_autograd():
    """A second user of the overwritten logits fails loudly instead of using gradient values."""
    z, ids, logp, _ = make_case(seed=10)
    leaf = z.clone().requires_grad_()
    logits = leaf.exp()  # exp saves its output for backward
    loss = kd_loss(logits, SparseTarget(ids, logp), LossConfig(backend="triton"), inplace_grad=True) + logits.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_grad_only_the_loss_is_computed():
    z, ids, logp, labels = make_case(seed=11)
    with_grad, _ = run("triton", z, ids, logp, divergence="rkl", alpha=0.3, labels=labels)
    before = z.clone()
    loss = kd_loss(z, SparseTarget(ids, logp), LossConfig(divergence="rkl", alpha=0.3, backend="triton"),
                   labels=labels, inplace_grad=True)  # fmt: skip
    assert torch.equal(loss.cpu().double(), with_grad)
    assert torch.equal(z, before), "nothing may be written when no gradient is needed"


def test_no_grad_mode_writes_nothing():
    z, ids, logp, labels = make_case(seed=11)
    with_grad, _ = run("triton", z, ids, logp, divergence="fkl", alpha=0.3, labels=labels)
    leaf = z.clone().requires_grad_()
    with torch.no_grad():
        loss = kd_loss(
            leaf, SparseTarget(ids, logp), LossConfig(alpha=0.3, backend="triton"), labels=labels, inplace_grad=True
        )
    assert torch.equal(loss.cpu().double(), with_grad)
    assert torch.equal(leaf.detach(), z), "an eval pass under no_grad must not overwrite the logits"


def test_auto_backend_on_cpu_is_the_reference():
    z, ids, logp, labels = make_case(seed=12)
    z = z.cpu()
    loss = LossConfig(temperature=2.0, divergence="jsd", alpha=0.3)
    auto = kd_loss(z, SparseTarget(ids.cpu(), logp.cpu()), loss, labels=labels.cpu())
    ref = kd_loss_reference(z, SparseTarget(ids.cpu(), logp.cpu()), loss, labels=labels.cpu())
    assert torch.equal(auto, ref)


@pytest.mark.parametrize(
    "setup",
    [
        "",  # the interpreter never switched on
        "import triton; os.environ['TRITON_INTERPRET'] = '1'",  # switched on after triton was imported
    ],
    ids=["off", "set-after-triton-import"],
)
def test_triton_on_cpu_needs_the_interpreter(setup):
    """Not a crash inside the interpreter: a ValueError that says what to set, and when."""
    script = f"""
import os
import subprocess
import sys
{setup}
import torch
from trainer.losses.config import LossConfig
from trainer.losses.kd_loss import kd_loss
from trainer.losses.sparse_target import SparseTarget
z = torch.randn(3, 50)
ids = torch.topk(z, 5, dim=1).indices
logp = torch.log_softmax(torch.randn(3, 50), 1).gather(1, ids)
try:
    kd_loss(z, SparseTarget(ids, logp), LossConfig(backend="triton"))
except ValueError as e:
    print(e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "set TRITON_INTERPRET=1 before triton is first imported" in run.stdout


# ----------------------------------------------------------------------------------------------
# Teacher at temperature T
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_teacher_logprobs_at_temperature(temperature):
    g = torch.Generator().manual_seed(14)
    n, v, k = 7, 61, 9
    t_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 4
    ids = torch.topk(t_logits, k, dim=1).indices
    logp1 = torch.log_softmax(t_logits, dim=1).gather(1, ids)
    logp1[1, 5:] = float("-inf")  # padding
    lse1 = torch.logsumexp(t_logits, dim=1)
    lse_t = torch.logsumexp(t_logits / temperature, dim=1)
    logp_t, tail = teacher_logprobs_at_temperature(logp1.float(), lse1.float(), lse_t.float(), temperature)

    direct = torch.log_softmax(t_logits / temperature, dim=1)
    expected = direct.gather(1, ids)
    expected[1, 5:] = float("-inf")
    member = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids, True)
    member[1] = False
    member[1, ids[1, :5]] = True
    expected_tail = torch.logsumexp(direct.masked_fill(member, float("-inf")), dim=1)
    assert logp_t.dtype == torch.float32 and tail.shape == (n,)
    torch.testing.assert_close(logp_t.double(), expected, rtol=0, atol=2e-5)
    # The tail's log is ill-conditioned when the top-k holds most of the mass: the fp32
    # inputs alone (|lse| ~ 15 here, divided by T) move the tail's probability by up to ~2e-6
    # (measured 1.1e-6 at T = 0.5), so compare it as a probability.
    torch.testing.assert_close(tail.double().exp(), expected_tail.exp(), rtol=0, atol=5e-6)
    assert torch.all(tail < 0)


def test_teacher_tail_when_topk_holds_all_mass():
    # Exactly all the mass (p = 1 on one id), and rounding past it (sum p > 1): -inf, not NaN.
    logp1 = torch.tensor([[0.0, float("-inf"), float("-inf")], [0.0, -1.0, float("-inf")]])
    _, tail = teacher_logprobs_at_temperature(logp1, torch.zeros(2), torch.zeros(2), 1.0)
    assert torch.all(tail == float("-inf"))
    # K = V from a real softmax: what is left is the fp32 inputs' rounding, far below 1e-5.
    t_logits = torch.randn(3, 5, dtype=torch.float64)
    ids = torch.argsort(t_logits, dim=1, descending=True)
    logp1 = torch.log_softmax(t_logits, 1).gather(1, ids)
    _, tail = teacher_logprobs_at_temperature(
        logp1.float(), torch.logsumexp(t_logits, 1).float(), torch.logsumexp(t_logits / 2, 1).float(), 2.0
    )
    assert torch.all(tail < math.log(1e-5))
    # Nothing on S (all padding): the tail holds everything, log 1 = 0.
    _, tail_pad = teacher_logprobs_at_temperature(
        torch.full((2, 4), float("-inf")), torch.zeros(2), torch.zeros(2), 2.0
    )
    assert torch.all(tail_pad == 0.0)


# ----------------------------------------------------------------------------------------------
# Argument errors
# ----------------------------------------------------------------------------------------------


def _bad_args(case: str):
    """Bad tensors, or tensors that do not fit the settings (bad settings: test_loss_config.py)."""
    z, ids, logp, labels = make_case(seed=15)
    kw: dict = {}
    weights = None
    if case == "3d_logits":
        z = z[None]
    elif case == "int_logits":
        z = z.long()
    elif case == "ids_rows":
        ids = ids[:-1]
    elif case == "ids_float":
        ids = ids.float()
    elif case == "logp_shape":
        logp = logp[:, :-1]
    elif case == "alpha_without_labels":
        kw["loss"] = LossConfig(alpha=0.3)
    elif case == "labels_shape":
        kw["labels"] = labels[:-1]
    elif case == "weights_with_rkl":
        kw["loss"], weights = LossConfig(divergence="rkl"), torch.ones_like(logp)
    elif case == "not_a_target":  # the tensors themselves, as before SparseTarget
        return z.cpu(), ids.cpu(), kw
    elif case == "not_a_config":
        kw["loss"] = dict(temperature=2.0)
    elif case == "id_out_of_range":
        ids = ids.cpu().clone()
        ids[0, 0] = z.shape[1]
    elif case == "label_out_of_range":
        kw.update(labels=labels.cpu().clone().fill_(z.shape[1]))
    return z.cpu(), SparseTarget(ids.cpu(), logp.cpu(), None if weights is None else weights.cpu()), kw


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("3d_logits", "2-D"),
        ("int_logits", "float32, bfloat16 or float16"),
        ("ids_rows", r"target.ids must be \[N=7, K\]"),
        ("ids_float", "int32 or int64"),
        ("logp_shape", "shape of target.ids"),
        ("alpha_without_labels", "labels"),
        ("labels_shape", "labels must be"),
        ("weights_with_rkl", "only 'fkl'"),
        ("not_a_target", "must be a trainer.losses.sparse_target.SparseTarget"),
        ("not_a_config", "must be a trainer.losses.config.LossConfig"),
        ("id_out_of_range", "target.ids must lie in"),
        ("label_out_of_range", "labels must lie in"),
    ],
)
def test_bad_arguments_raise_value_error(case, match):
    z, target, kw = _bad_args(case)
    with pytest.raises(ValueError, match=match):
        kd_loss(z, target, **kw)


# ----------------------------------------------------------------------------------------------
# Real shapes on a GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n", "v", "k", "divergence", "alpha"),
    [(4096, 128256, 64, "fkl", 0.0), (4096, 128256, 64, "jsd", 0.3), (1024, 262144, 256, "rkl", 0.5)],
)
def test_gpu_real_shapes_match_reference(n, v, k, divergence, alpha):
    g = torch.Generator(device="cuda").manual_seed(16)
    z = (torch.randn(n, v, device="cuda", generator=g) * 3).bfloat16()
    teacher = torch.randn(n, v, device="cuda", generator=g) * 3
    top = torch.topk(teacher, k, dim=1)
    logp = (top.values - torch.logsumexp(teacher, 1, keepdim=True)).float()
    ids = top.indices.int()
    ids[::7, k // 2 :] = -1
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::5] = IGNORE
    settings = dict(temperature=2.0, divergence=divergence, alpha=alpha)

    out = {}
    for backend in BACKENDS:
        zz = z.clone().requires_grad_()
        loss = kd_loss(zz, SparseTarget(ids, logp), LossConfig(backend=backend, **settings), labels=labels)
        loss.backward()
        out[backend] = (loss.detach(), zz.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["triton"][1].float(), out["torch"][1].float(), rtol=1e-2, atol=1e-7)

    zz = z.clone().requires_grad_()
    logits = zz * 1
    loss = kd_loss(
        logits, SparseTarget(ids, logp), LossConfig(backend="triton", **settings), labels=labels, inplace_grad=True
    )
    loss.backward()
    torch.testing.assert_close(zz.grad.float(), out["torch"][1].float(), rtol=1e-2, atol=1e-7)
