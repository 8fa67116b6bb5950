"""The sampled-KD estimator against the full-distribution KL: its Monte Carlo mean over many
independent draws (made by the capture's own sampler) matches the exact KL and its gradient."""

from __future__ import annotations

import pytest
import torch

from logitstore.capture.reduce import Reduction
from trainer.losses.config import LossConfig
from trainer.losses.targets import sampled_kd_loss

V, DRAWS, TOKENS = 97, 20, 6000


def draws_for(teacher_z: torch.Tensor, temperatures: tuple[float, ...], head: int = 0):
    """TOKENS independent sampled captures of the same teacher row (distinct keys = independent draws)."""
    reduce = Reduction("sampled", head + DRAWS, temperatures, draws=DRAWS, seed=11, head=head)
    return reduce(teacher_z.expand(TOKENS, V).contiguous(), torch.arange(TOKENS))


@pytest.mark.parametrize("head", [0, 8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_over_draws_is_the_full_kl_and_its_gradient(temperature, head):
    """Plain draws, and draws from the tail behind an exact head of the top 8 ids (~half the mass)."""
    gen = torch.Generator().manual_seed(1)
    teacher_z = torch.randn(1, V, generator=gen, dtype=torch.float64) * 2
    student_z = torch.randn(1, V, generator=gen, dtype=torch.float64)
    temps = (1.0, temperature) if temperature != 1.0 else (1.0,)
    ids, logp, lse, counts = draws_for(teacher_z.float(), temps, head)

    # The same student row for every token: the mean loss over tokens is the Monte Carlo mean.
    student = student_z.float().clone().requires_grad_(True)
    loss_config = LossConfig(temperature=temperature)
    loss = sampled_kd_loss(student.expand(TOKENS, V), ids, counts, DRAWS, loss_config,
                           teacher_logp=logp, lse_1=lse[:, 0], lse_t=lse[:, -1], head=head)
    (grad,) = torch.autograd.grad(loss, student)

    ref_student = student_z.clone().requires_grad_(True)
    p_t = torch.log_softmax(teacher_z / temperature, dim=-1)
    q_t = torch.log_softmax(ref_student / temperature, dim=-1)
    exact = temperature**2 * (p_t.exp() * (p_t - q_t)).sum()
    (exact_grad,) = torch.autograd.grad(exact, ref_student)

    # Standard error of the per-token estimate, from the draws themselves.
    with torch.no_grad():
        per_token = torch.stack([
            sampled_kd_loss(student.expand(TOKENS, V)[i:i + 1], ids[i:i + 1], counts[i:i + 1], DRAWS,
                            loss_config, teacher_logp=logp[i:i + 1], lse_1=lse[i:i + 1, 0],
                            lse_t=lse[i:i + 1, -1], head=head)
            for i in range(0, TOKENS, 10)
        ])
    stderr = per_token.std() / TOKENS**0.5
    assert abs(loss.item() - exact.item()) < 4 * stderr.item()
    # Gradient: the estimator's is q_T - (weighted counts), averaged; compare entry-wise within MC error.
    tol = 4 * temperature * (exact_grad.abs().max().item() + 1) / (TOKENS * DRAWS) ** 0.5
    torch.testing.assert_close(grad.double(), exact_grad, atol=tol, rtol=0)
    assert (grad.double() - exact_grad).abs().max() < 0.1 * exact_grad.abs().max()


@pytest.mark.parametrize("head", [0, 8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_kernel_computes_the_same_estimate(temperature, head):
    """The kernel (interpreted on CPU) on the same draws as above: the same loss and gradient as
    the torch path, whose mean over draws the test above checks against the full KL."""
    gen = torch.Generator().manual_seed(1)
    teacher_z = torch.randn(1, V, generator=gen, dtype=torch.float64) * 2
    student = torch.randn(1, V, generator=gen).expand(200, V)
    temps = (1.0, temperature) if temperature != 1.0 else (1.0,)
    ids, logp, lse, counts = (t[:200] for t in draws_for(teacher_z.float(), temps, head))
    out = {}
    for backend in ("torch", "triton"):
        z = student.clone().requires_grad_(True)
        loss_config = LossConfig(temperature=temperature, backend=backend)
        loss = sampled_kd_loss(z, ids, counts, DRAWS, loss_config, teacher_logp=logp, lse_1=lse[:, 0],
                               lse_t=lse[:, -1], head=head)  # fmt: skip
        loss.backward()
        out[backend] = loss.detach(), z.grad
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-4, atol=1e-7)


def test_without_teacher_logp_the_gradient_is_the_same_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    teacher_z = torch.randn(1, V, generator=gen) * 2
    ids, logp, _, counts = draws_for(teacher_z, (1.0,))
    student = torch.randn(TOKENS, V, generator=gen, requires_grad=True)
    kl = sampled_kd_loss(student, ids, counts, DRAWS, teacher_logp=logp)
    ce = sampled_kd_loss(student, ids, counts, DRAWS)
    (g_kl,) = torch.autograd.grad(kl, student)
    (g_ce,) = torch.autograd.grad(ce, student)
    torch.testing.assert_close(g_kl, g_ce)
    # The difference is the estimated teacher entropy: positive, and close to the exact one.
    p = torch.softmax(teacher_z.double(), -1)
    entropy = -(p * p.log()).sum()
    assert abs((ce - kl).item() - entropy.item()) < 0.05 * entropy.item()


def test_padding_rows_and_argument_errors():
    logits = torch.randn(3, 10, requires_grad=True)
    ids = torch.full((3, 4), -1)
    counts = torch.zeros((3, 4), dtype=torch.uint8)
    loss = sampled_kd_loss(logits, ids, counts, 5)
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)
    with pytest.raises(ValueError, match="needs teacher_logp"):
        sampled_kd_loss(logits, ids, counts, 5, LossConfig(temperature=2.0))
    with pytest.raises(ValueError, match="a head needs teacher_logp"):
        sampled_kd_loss(logits, ids, counts, 5, head=2)
    with pytest.raises(ValueError, match="must agree"):
        sampled_kd_loss(logits, ids[:, :2], counts, 5)
