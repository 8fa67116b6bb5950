"""Documents packed into one row that do not see each other (`--packing packed-documents`).

transformers reads position ids that restart inside a row as packed sequences, when they come
without an attention mask and without a KV cache: sdpa, eager and flex attention then get a
block-diagonal causal mask, and flash-attention the boundaries as cu_seqlens. The capture
(teacher), the trainer (student, online teacher) and the eval all run such rows as
`model(input_ids=ids, position_ids=positions, use_cache=False)`; a row's right padding restarts
at 0 too, so it is one more block that no real token attends to.

A model whose attention ignores this would silently mix documents, so each is checked first.
"""

from __future__ import annotations

import torch

from logitstore.errors import LogitStoreError

__all__ = ["check_document_attention"]

# A leak changes the second document's hidden states at the scale of the states themselves;
# isolation leaves rounding (~1e-7 relative in fp32, ~1e-2 at worst in bfloat16).
_TOLERANCE = 2e-2


@torch.inference_mode()
def check_document_attention(model: torch.nn.Module, role: str) -> None:
    """Raise LogitStoreError unless `model` (a causal LM) keeps packed documents apart: the hidden
    states of a document after another one, its position ids restarted, equal those of the
    document alone. `role` names the model in the message ("teacher", "student")."""
    body = model.get_decoder()
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 2, 3, 1]], device=device)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    training = model.training
    model.eval()  # no dropout in the comparison
    try:
        packed = body(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0, 3:].float()
        alone = body(input_ids=ids[:, 3:], use_cache=False).last_hidden_state[0].float()
    finally:
        model.train(training)
    error = float((packed - alone).abs().max() / alone.abs().max().clamp(min=1e-6))
    if not error <= _TOLERANCE:
        impl = getattr(model.config, "_attn_implementation", None)
        raise LogitStoreError(
            f"the {role} ({type(model).__name__}, attention {impl!r}) lets packed documents attend to each "
            f"other (relative difference {error:.2g} from a document alone): packed-documents needs an attention "
            "that honors restarting position ids (sdpa, eager, flex_attention or flash_attention_2 in a "
            "recent transformers). Use --packing document instead"
        )
