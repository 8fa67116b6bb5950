"""The acceptance-rate bounds of the store eval against the exact sum_v min(p_v, q_v) of dense
distributions."""

from __future__ import annotations

import pytest
import torch

from trainer.evaluate import acceptance_bounds


@pytest.mark.parametrize("k", [1, 5, 17, 50])
@pytest.mark.parametrize("choose", ["topk", "random"])
def test_bounds_hold_the_exact_acceptance_and_meet_it_on_the_whole_vocabulary(k, choose):
    g = torch.Generator().manual_seed(k)
    n, v = 64, 50
    log_p = (torch.randn(n, v, generator=g) * 2).log_softmax(-1)
    z = torch.randn(n, v, generator=g) * 2
    exact = torch.minimum(log_p.exp(), z.softmax(-1)).sum(-1)
    if choose == "topk":
        ids = log_p.topk(k, dim=-1).indices
    else:
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ids[0, -1] = -1  # a padding slot
    logp = torch.where(ids >= 0, log_p.gather(1, ids.clamp(min=0)), float("-inf"))
    low, high = acceptance_bounds(z, ids, logp)
    assert torch.all(low <= exact + 1e-6) and torch.all(exact <= high + 1e-6)
    if k == v:  # every id stored (but the padded row): no tail left to bound
        torch.testing.assert_close(low[1:], exact[1:], atol=1e-6, rtol=0)
        torch.testing.assert_close(high[1:], exact[1:], atol=1e-6, rtol=0)
    assert torch.all(high <= 1 + 1e-6) and torch.all(low >= 0)
