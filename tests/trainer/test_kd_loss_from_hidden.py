"""Tests of kd_loss_from_hidden: the chunked linear + KD loss against materialized logits.

The expectation materializes `logits = hidden @ W.T` (in the input dtype, as a model would)
and differentiates `kd_loss(logits, target, LossConfig(backend="torch"))` with autograd through the matmul;
it shares neither the chunking, the chunk weighting nor the hand-written chain rule with the
code under test. The kernel itself is tested against a dense oracle in test_kd_loss.py; here
the Triton path runs in the interpreter (tests/conftest.py), which costs ~0.05 s per row per
call, so its cases are few and small.
"""

from __future__ import annotations

import pytest
import torch

from trainer import LossConfig, SparseTarget, kd_loss, kd_loss_from_hidden
from trainer.losses.from_hidden import CHUNK_LOGITS_ELEMENTS, default_chunk_size

# The interpreter evaluates both sides of tl.where in numpy (see test_kd_loss.py).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
N, H, V, K = 37, 24, 301, 9
GRAD_SCALE = 1.7  # every test backpropagates GRAD_SCALE * loss: grad_output != 1

# Measured worst cases on CPU over this file (both backends, chunk sizes 1..N+), as max |error|
# next to max |gradient| ~ 0.05: fp32 loss 5e-7 relative, gradients 6e-8; bf16 loss 5e-7
# relative (the same rounded logits), gradients 2.4e-4 for hidden and 4.9e-4 for W (1-2 bf16
# ulps: the chunk's gradient is rounded to bf16 before each matmul, the weight's partial sums
# are rounded per chunk, and the interpreter's bf16 cast truncates). Bounds leave ~10x / 2x.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}
GRAD_TOL = {torch.float32: dict(atol=1e-6, rtol=1e-4), torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2)}


def make_case(n: int = N, *, dtype: torch.dtype = torch.float32, seed: int = 0):
    """hidden [n, H], W [V, H], teacher top-k with padding rows and a repeat, labels with ignores.

    Row 0 repeats an id, row 1 is half padding, row 2 is all padding, rows 3 and every 7th
    have an ignored label.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (3 / H**0.5)).to(dtype)  # logits ~ N(0, 9)
    teacher = torch.randn(n, V, generator=g) * 3
    top = torch.topk(teacher, K, dim=1)
    ids = top.indices
    logp = top.values - torch.logsumexp(teacher, dim=1, keepdim=True)
    ids[0, -1] = ids[0, 0]
    ids[1, K // 2 :] = -1
    ids[2, :] = -1
    labels = torch.randint(0, V, (n,), generator=g)
    labels[3] = IGNORE
    labels[::7] = IGNORE
    return hidden.to(DEVICE), weight.to(DEVICE), ids.to(DEVICE), logp.to(DEVICE), labels.to(DEVICE)


def expected(hidden, weight, ids, logp, *, labels=None, **settings):
    """(loss, grad hidden, grad W) of GRAD_SCALE * kd_loss(hidden @ W.T) by autograd; `settings`
    are LossConfig's fields."""
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = kd_loss(x @ w.T, SparseTarget(ids, logp), LossConfig(backend="torch", **settings), labels=labels)
    (loss * GRAD_SCALE).backward()
    return loss.detach(), x.grad, w.grad


def chunked(backend, hidden, weight, ids, logp, *, labels=None, chunk_size=None, **settings):
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = kd_loss_from_hidden(x, w, SparseTarget(ids, logp), LossConfig(backend=backend, **settings), labels=labels,
                               chunk_size=chunk_size)  # fmt: skip
    (loss * GRAD_SCALE).backward()
    return loss.detach(), x.grad, w.grad


def assert_matches(got, want, dtype):
    (loss, gx, gw), (loss_e, gx_e, gw_e) = got, want
    torch.testing.assert_close(loss, loss_e, rtol=LOSS_RTOL[dtype], atol=1e-7)
    assert gx.dtype == gx_e.dtype == dtype and gw.dtype == gw_e.dtype == dtype
    torch.testing.assert_close(gx.float(), gx_e.float(), **GRAD_TOL[dtype])
    torch.testing.assert_close(gw.float(), gw_e.float(), **GRAD_TOL[dtype])


# ----------------------------------------------------------------------------------------------
# Against materialized logits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
def test_torch_backend_every_chunk_size(divergence, alpha, dtype):
    hidden, weight, ids, logp, labels = make_case(dtype=dtype, seed=1)
    kw = dict(temperature=2.0, divergence=divergence, alpha=alpha, labels=labels)
    want = expected(hidden, weight, ids, logp, **kw)
    for chunk_size in (1, 5, 16, N, N + 10, None):  # None: the default, N rows here
        assert_matches(chunked("torch", hidden, weight, ids, logp, chunk_size=chunk_size, **kw), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_chunked_and_unchunked(dtype):
    """Labels with ignored rows, padding rows, alpha > 0; several chunks with a ragged last one."""
    hidden, weight, ids, logp, labels = make_case(dtype=dtype, seed=2)
    kw = dict(temperature=2.0, divergence="jsd", alpha=0.3, labels=labels)
    want = expected(hidden, weight, ids, logp, **kw)
    got = {cs: chunked("triton", hidden, weight, ids, logp, chunk_size=cs, **kw) for cs in (16, N + 3)}
    for g in got.values():
        assert_matches(g, want, dtype)
    # chunked == unchunked: the same per-row gradients, only the sums' order differs
    for a, b in zip(got[16], got[N + 3], strict=True):
        torch.testing.assert_close(a, b, **GRAD_TOL[dtype])


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "tvd"])
def test_triton_backend_divergences_without_labels(divergence):
    """No labels: the mean is over rows with a teacher id (row 2, all padding, is not counted)."""
    hidden, weight, ids, logp, _ = make_case(n=13, seed=3)
    kw = dict(temperature=1.5, divergence=divergence)
    got = chunked("triton", hidden, weight, ids, logp, chunk_size=5, **kw)
    assert_matches(got, expected(hidden, weight, ids, logp, **kw), torch.float32)
    assert torch.all(got[1][2] == 0)


def test_triton_backend_chunk_of_one_row():
    hidden, weight, ids, logp, labels = make_case(n=7, seed=4)
    kw = dict(divergence="fkl", alpha=0.3, labels=labels)
    got = chunked("triton", hidden, weight, ids, logp, chunk_size=1, **kw)
    assert_matches(got, expected(hidden, weight, ids, logp, **kw), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("how", ["labels_all_ignored", "teacher_all_padding"])
def test_batch_without_counted_rows(backend, how):
    hidden, weight, ids, logp, labels = make_case(n=6, seed=5)
    kw: dict = dict(temperature=2.0, divergence="fkl", chunk_size=4)
    if how == "teacher_all_padding":
        ids = torch.full_like(ids, -1)
    else:
        kw.update(labels=torch.full_like(labels, IGNORE), alpha=0.5)
    loss, gx, gw = chunked(backend, hidden, weight, ids, logp, **kw)
    assert loss.item() == 0.0
    assert torch.all(gx == 0) and torch.all(gw == 0)


# ----------------------------------------------------------------------------------------------
# Autograd plumbing
# ----------------------------------------------------------------------------------------------


def test_frozen_weight_and_no_grad_mode():
    hidden, weight, ids, logp, labels = make_case(seed=6)
    want_loss, want_gx, _ = expected(hidden, weight, ids, logp, divergence="fkl", alpha=0.3, labels=labels)
    kw = dict(labels=labels, chunk_size=8)
    x = hidden.clone().requires_grad_()
    loss = kd_loss_from_hidden(x, weight, SparseTarget(ids, logp), LossConfig(divergence="fkl", alpha=0.3), **kw)
    (loss * GRAD_SCALE).backward()
    torch.testing.assert_close(x.grad, want_gx, **GRAD_TOL[torch.float32])
    with torch.no_grad():
        assert torch.equal(
            kd_loss_from_hidden(x, weight, SparseTarget(ids, logp), LossConfig(alpha=0.3), **kw), loss.detach()
        )
    torch.testing.assert_close(loss.detach(), want_loss)


def test_second_backward_through_the_graph_raises():
    hidden, weight, ids, logp, _ = make_case(n=5, seed=7)
    x = hidden.clone().requires_grad_()
    loss = kd_loss_from_hidden(x, weight, SparseTarget(ids, logp))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_default_chunk_size_bounds_the_logits():
    assert default_chunk_size(8192, 128256) == CHUNK_LOGITS_ELEMENTS // 128256 == 1046
    assert default_chunk_size(8192, 49152) == 2730
    assert default_chunk_size(100, 301) == 100  # never more rows than N
    assert default_chunk_size(10, 2**28) == 1  # never 0 rows


# ----------------------------------------------------------------------------------------------
# Argument errors
# ----------------------------------------------------------------------------------------------


def _bad(case: str):
    hidden, weight, ids, logp, _ = (t.cpu() for t in make_case(n=5, seed=8))
    kw: dict = {}
    if case == "hidden_1d":
        hidden = hidden[0]
    elif case == "weight_transposed":
        weight = weight.T
    elif case == "h_mismatch":
        weight = weight[:, :-1]
    elif case == "dtype_mismatch":
        weight = weight.double()
    elif case == "int_hidden":
        hidden, weight = hidden.long(), weight.long()
    elif case == "ids_rows":
        ids = ids[:-1]
    elif case == "id_beyond_vocab":
        ids = ids.clone()
        ids[0, 0] = V
    elif case == "chunk_size":
        kw["chunk_size"] = 0
    elif case == "alpha_without_labels":
        kw["loss"] = LossConfig(alpha=0.5)
    return hidden, weight, ids, logp, kw


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("hidden_1d", r"hidden must be a 2-D tensor \[N, H\]"),
        ("weight_transposed", r"it must be \[V, H=24\]"),
        ("h_mismatch", r"it must be \[V, H=24\]"),
        ("dtype_mismatch", "same dtype"),
        ("int_hidden", "float32, bfloat16 or float16"),
        ("ids_rows", r"target\.ids must be \[N=5, K\]"),
        ("id_beyond_vocab", r"target\.ids must lie in \[0, V=301\)"),
        ("chunk_size", "chunk_size must be"),
        ("alpha_without_labels", "labels"),
    ],
)
def test_bad_arguments_raise_value_error(case, match):
    hidden, weight, ids, logp, kw = _bad(case)
    with pytest.raises(ValueError, match=match):
        kd_loss_from_hidden(hidden, weight, SparseTarget(ids, logp), **kw)


# ----------------------------------------------------------------------------------------------
# Real shapes on a GPU
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "h", "v", "k"), [(8192, 576, 49152, 64), (8192, 2048, 128256, 64)])
def test_gpu_real_shapes_match_materialized(n, h, v, k):
    """bf16 at real shapes: the same gradients as materialized logits, in less memory.

    Expected peak extra memory of the chunked path: the chunk's logits (c V, bf16), the hidden
    gradient (N H, bf16), the weight's fp32 accumulator plus one bf16 partial (6 V H bytes)
    then the bf16 result (2 V H); the materialized path holds 2 N V bf16 (logits + gradient).
    """
    g = torch.Generator(device="cuda").manual_seed(9)
    hidden = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) * (3 / h**0.5)).bfloat16()
    teacher = torch.randn(n, v, device="cuda", generator=g) * 3
    top = torch.topk(teacher, k, dim=1)
    logp = (top.values - torch.logsumexp(teacher, 1, keepdim=True)).float()
    ids = top.indices.int()
    del teacher, top
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::5] = IGNORE
    kw = dict(loss=LossConfig(temperature=2.0, divergence="fkl", alpha=0.1), labels=labels)

    def peak_extra(fn):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out

    def materialized():
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = kd_loss(x @ w.T, SparseTarget(ids, logp), **kw)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    def from_hidden():
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = kd_loss_from_hidden(x, w, SparseTarget(ids, logp), **kw)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    mem_materialized, want = peak_extra(materialized)
    mem_chunked, got = peak_extra(from_hidden)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-6)
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())
    # the clones of hidden and W are inside both measurements alike
    inputs = 2 * (n * h + v * h)
    bound = inputs + 2 * default_chunk_size(n, v) * v + 2 * n * h + 8 * v * h + 128 * 2**20
    assert mem_chunked <= bound, (mem_chunked, bound)
    assert mem_chunked < mem_materialized, (mem_chunked, mem_materialized)
