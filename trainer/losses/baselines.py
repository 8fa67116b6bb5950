"""The distillation losses logitstore's cached top-k + tail is measured against.

- `renormalized_topk_kl`: sparse KD as DistillKit and Axolotl compute it from cached top-k:
  teacher and student are both renormalized over the teacher's stored ids, the rest of the
  vocabulary is dropped. With p̃ = softmax over the top-k of the teacher's log-probs and
  q̃ = softmax over the top-k of z / T:  T² · Σ_{i ∈ top-k} p̃_i (log p̃_i − log q̃_i).
  The student's mass outside the top-k gets no gradient at all, and the teacher's tail mass
  is silently moved onto its top-k (biased for every k < V).
- `full_vocab_kl`: online KD with the teacher in the loop, the exact target:
  T² · Σ_{v ∈ V} p_T(v) (log p_T(v) − log q_T(v)).

Both are plain torch in fp32, forward KL only, mean over the tokens in `mask`.
"""

from __future__ import annotations

import torch

__all__ = ["full_vocab_kl", "renormalized_topk_kl"]

_PAD = -1e30


def renormalized_topk_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · masked mean of KL(p̃ || q̃) over the stored ids (see the module docstring).

    Args:
        logits: [N, V] student logits. topk_ids: [N, K] teacher ids, -1 = padding.
        topk_logp: [N, K] teacher log-probs at `temperature` (any normalization: renormalized here).
        mask: [N] bool, the tokens that count. Rows with no stored id do not count either.
    """
    valid = topk_ids >= 0
    counted = mask & valid.any(-1)
    # A row with no id would make both log-softmaxes all -inf (NaN gradients): give it one
    # dummy slot; it is left out of the mean anyway.
    valid = valid | (~counted)[:, None] & (torch.arange(valid.shape[1], device=valid.device) == 0)
    # Padding gets a huge finite negative, not -inf: -inf - -inf would put NaN into the backward.
    t = topk_logp.float().masked_fill(~valid, _PAD).log_softmax(-1)
    s = (logits.float().gather(1, topk_ids.clamp(min=0).long()) / temperature).masked_fill(~valid, _PAD)
    s = s.log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)  # padding: exp(t) = 0 and t - s finite
    return temperature**2 * _masked_mean(kl, counted)


def full_vocab_kl(
    logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T² · masked mean of KL(softmax(teacher / T) || softmax(logits / T)) over the full vocabulary."""
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    s = (logits.float() / temperature).log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return temperature**2 * _masked_mean(kl, mask)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
