"""The KD losses against a sparse teacher target (docs/kd_loss.md).

| module | role |
| --- | --- |
| `config` | `LossConfig`: the loss settings, checked once (torch-free) |
| `sparse_target` | `SparseTarget`: the teacher at N rows as K ids with log-probs and/or weights |
| `kd_loss` | `kd_loss(...)`, dispatch by backend, and `teacher_logprobs_at_temperature(...)` |
| `triton_kernel` | the fused kernel, its launcher and `autograd.Function` (imported lazily) |
| `reference` | the tensor checks and the pure-torch reference (the CPU path and the semantics) |
| `from_hidden` | `kd_loss_from_hidden(...)`: the loss from hidden states, logits chunked over rows |
| `targets` | a store batch -> the sparse target (`topk_target`, `sampled_target`) |
| `baselines` | the losses the store is measured against (renormalized top-k, full-vocabulary KL) |

Nothing is imported here: `trainer.config` imports `trainer.losses.config` without torch.
"""
