"""The comparison losses against independent references: float64 loops over one row, torch's
kl_div, and each other where they must agree (K = V: renormalizing changes nothing and the
K+1-bucket loss has an empty tail)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses.baselines import full_vocab_kl, renormalized_topk_kl
from trainer.losses.config import LossConfig
from trainer.losses.kd_loss import kd_loss
from trainer.losses.sparse_target import SparseTarget


def row_reference(z: list[float], ids: list[int], logp: list[float], temperature: float) -> float:
    """KL(p~ || q~) over the valid ids of one row, in float64 with plain Python."""
    pairs = [(i, lp) for i, lp in zip(ids, logp, strict=True) if i >= 0]
    t_norm = math.log(sum(math.exp(lp) for _, lp in pairs))
    s = [z[i] / temperature for i, _ in pairs]
    s_norm = math.log(sum(math.exp(x) for x in s))
    return sum(math.exp(lp - t_norm) * ((lp - t_norm) - (x - s_norm)) for (_, lp), x in zip(pairs, s, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_renormalized_topk_matches_a_row_by_row_reference(temperature):
    g = torch.Generator().manual_seed(0)
    n, v, k = 7, 37, 5
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logp = torch.randn(n, k, generator=g, dtype=torch.float64) - 3  # not normalized: renormalized inside
    ids[1, 3:] = -1  # padding
    ids[4] = -1  # a row with no id: left out
    mask = torch.ones(n, dtype=torch.bool)
    mask[5] = False  # a masked token: left out
    rows = [r for r in range(n) if r not in (4, 5)]
    expected = temperature**2 * sum(
        row_reference(z[r].tolist(), ids[r].tolist(), logp[r].tolist(), temperature) for r in rows
    ) / len(rows)
    z32 = z.float().requires_grad_()
    got = renormalized_topk_kl(z32, ids, logp.float(), mask, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    got.backward()
    grad = z32.grad
    assert torch.isfinite(grad).all()
    # Only the stored ids of counted rows get gradient: the rest of the vocabulary is ignored.
    touched = torch.zeros(n, v, dtype=torch.bool)
    for r in rows:
        touched[r, ids[r][ids[r] >= 0]] = True
    assert (grad[~touched] == 0).all() and (grad[touched] != 0).any()


def test_with_every_id_stored_all_three_losses_agree():
    """K = V: renormalization is the identity and the tail is empty, so the cached losses equal
    the online full-vocabulary KL."""
    g = torch.Generator().manual_seed(1)
    n, v, temperature = 9, 23, 2.0
    z, teacher = torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2
    mask = torch.rand(n, generator=g) > 0.3
    logp_t = (teacher / temperature).log_softmax(-1)
    ids = torch.arange(v).expand(n, v).contiguous()
    online = full_vocab_kl(z, teacher, mask, temperature)
    reference = temperature**2 * (
        F.kl_div((z / temperature).log_softmax(-1), logp_t, log_target=True, reduction="none").sum(-1)[mask].mean()
    )
    assert float(online) == pytest.approx(float(reference), rel=1e-5)
    assert float(renormalized_topk_kl(z, ids, logp_t, mask, temperature)) == pytest.approx(float(online), rel=1e-4)
    masked_ids = torch.where(mask[:, None], ids, -1)  # at alpha = 0 the rows with teacher ids count
    bucket = kd_loss(z, SparseTarget(masked_ids, logp_t), LossConfig(temperature=temperature, backend="torch"))
    assert float(bucket) == pytest.approx(float(online), rel=1e-4)


def test_renormalized_topk_ignores_the_tail_that_the_bucket_loss_sees():
    """A student equal to the teacher on the top-k ratios but wrong on the tail mass has zero
    renormalized loss; the K+1-bucket loss is positive."""
    v, k = 10, 3
    teacher = torch.tensor([[4.0, 3.0, 2.0] + [0.0] * (v - k)])
    student = torch.tensor([[4.0, 3.0, 2.0] + [3.0] * (v - k)])  # same top-3 ratios, far more tail
    ids = torch.tensor([[0, 1, 2]])
    logp = teacher.log_softmax(-1)[:, :k]
    mask = torch.tensor([True])
    assert float(renormalized_topk_kl(student, ids, logp, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(student, SparseTarget(ids, logp), LossConfig(backend="torch"))) > 0.1
