"""Held-out evaluation: perplexity on text, and agreement with the teacher on a held-out store.

- `eval_text`: the student's perplexity on a text file, tokenized and packed exactly as a
  capture would (same EOS handling), in windows of `seq_len` tokens.
- `eval_store`: on a store the student never trained on, KL(teacher || student) at T = 1
  over the K+1 buckets (exact: the tail is the teacher's full-vocabulary remainder), the
  top-1 agreement (student argmax == teacher argmax), and the perplexity of the store's tokens.
  A counts_only sampled store has no log-probs: it gives the draws' unbiased estimate of the
  cross-entropy to the teacher instead (`eval_teacher_xent`, KL plus the teacher's entropy,
  which is the same for every student; with a head, plus the entropy of its tail only), and
  top-1 is against the most drawn id (with a head: the teacher's top id).

Windows never cross a sequence boundary, as in training; metrics are means over tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from logitstore.capture.corpus import document_positions, read_documents, tokenize_and_pack
from logitstore.reader import Store
from trainer.data import drop_non_token_ids, store_document_starts
from trainer.losses.config import LossConfig
from trainer.losses.kd_loss import kd_loss
from trainer.losses.sparse_target import SparseTarget
from trainer.losses.targets import sampled_kd_loss


@torch.no_grad()
def eval_text(
    model: torch.nn.Module,
    tokenizer,
    path: str | Path,
    *,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """{"eval_ppl": perplexity of the student on the text's next tokens}."""
    packed = tokenize_and_pack(read_documents([path]), tokenizer, max_len=seq_len, max_tokens=max_tokens)
    windows = [s.input_ids for s in packed.sequences]
    nll = n = 0.0
    for ids, mask in _batches(windows, batch_size):
        logits = _logits(model, ids, vocab_size)
        s, c = _next_token_nll(logits, ids, mask)
        nll, n = nll + s, n + c
    return {"eval_ppl": float(np.exp(nll / max(n, 1)))}


@torch.no_grad()
def eval_store(
    model: torch.nn.Module,
    store: Store,
    *,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """{"eval_kl" (counts_only: "eval_teacher_xent"), "eval_top1", "eval_store_ppl",
    "eval_accept_min", "eval_accept_max"} of the student against the store's teacher.

    eval_accept_*: bounds on the expected speculative-decoding acceptance rate of the student as
    a draft for the teacher at T = 1 (`acceptance_bounds`); not for a counts-only store, which
    keeps no probabilities. A packed-documents store is evaluated with its documents apart,
    as the teacher and the trainer see them (`_document_positions`); a store with chat rows on
    the positions of its loss mask only."""
    counts_only, head = store.meta.capture.counts_only, store.meta.capture.head
    document_starts = store_document_starts(store)
    kl = top1 = nll = n_kd = n_ce = accept_min = accept_max = 0.0
    for spans in _chunks(list(_windows(store, seq_len, max_tokens)), batch_size):
        blocks = [store.read(a, b) for a, b in spans]
        ids, mask = _pad([b.input_ids for b in blocks], len(blocks))
        positions = None if document_starts is None else _document_positions(document_starts, spans, ids.shape[1])
        logits = _logits(model, ids, vocab_size, positions)
        k = blocks[0].topk_ids.shape[1]
        topk_ids = torch.full((*ids.shape, k), -1, dtype=torch.int64)
        # counts_only: the draw counts take the log-probs' place (sampled_kd_loss needs no more at T=1),
        # beside the head's log-probs when it has a head.
        weights = torch.full((*ids.shape, k), 0 if counts_only else float("-inf"))
        head_logp = torch.full((*ids.shape, k), float("nan")) if counts_only and head else None
        for row, b in enumerate(blocks):
            drop_non_token_ids(b.topk_ids, b.topk_logp, b.counts, vocab_size)
            topk_ids[row, : len(b)] = torch.from_numpy(b.topk_ids.astype(np.int64))
            weights[row, : len(b)] = torch.from_numpy(b.counts if counts_only else b.topk_logp)
            if head_logp is not None:
                head_logp[row, : len(b)] = torch.from_numpy(b.topk_logp)
        trained = mask.clone()  # the positions the student learns, all of a window's but in a chat store
        for row, b in enumerate(blocks):
            if b.loss_mask is not None:
                trained[row, : len(b)] = torch.from_numpy(b.loss_mask)
        flat_mask = trained.reshape(-1).to(logits.device)
        z = logits.reshape(-1, vocab_size)[flat_mask]
        t_ids = topk_ids.reshape(-1, k).to(z.device)[flat_mask]
        t_weights = weights.reshape(-1, k).to(z.device)[flat_mask]
        tokens = int(flat_mask.sum())
        if counts_only:
            t_logp = None if head_logp is None else head_logp.reshape(-1, k).to(z.device)[flat_mask]
            kl += float(sampled_kd_loss(z, t_ids, t_weights, store.meta.capture.draws, teacher_logp=t_logp,
                                        head=head)) * tokens  # fmt: skip
            # The head's first slot is the teacher's top id; without a head, the most drawn one.
            teacher_top = t_ids[:, 0] if head else t_ids.gather(1, t_weights.argmax(-1, keepdim=True))[:, 0]
        else:
            kl += float(kd_loss(z, SparseTarget(t_ids, t_weights), LossConfig(backend="torch"))) * tokens  # T = 1, fkl
            teacher_top = t_ids[:, 0]
            low, high = acceptance_bounds(z, t_ids, t_weights)
            accept_min, accept_max = accept_min + float(low.sum()), accept_max + float(high.sum())
        top1 += float((z.argmax(-1) == teacher_top).sum())
        n_kd += tokens
        s, c = _next_token_nll(logits, ids, mask, positions, trained)
        nll, n_ce = nll + s, n_ce + c
    result = {
        "eval_teacher_xent" if counts_only else "eval_kl": kl / max(n_kd, 1),
        "eval_top1": top1 / max(n_kd, 1),
        "eval_store_ppl": float(np.exp(nll / max(n_ce, 1))),
    }
    if not counts_only:
        result |= {"eval_accept_min": accept_min / max(n_kd, 1), "eval_accept_max": accept_max / max(n_kd, 1)}
    return result


def acceptance_bounds(
    logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, bounds on the speculative-decoding acceptance rate a = sum_v min(p_v, q_v) of the
    student q = softmax(logits) as a draft for the teacher p (T = 1), from the K stored ids S.

    The stored ids are exact: sum_S min(p, q) is a lower bound (the tail adds >= 0). Over the
    tail, sum_tail min(p_v, q_v) <= min(p_tail, q_tail) (a sum of minima is at most the minimum
    of the sums), so adding that gives an upper bound: the K+1-bucket acceptance. Both are equal
    to `a` when S holds the whole vocabulary. Ids < 0 are padding (repeats are not expected).
    """
    log_q = logits.float().log_softmax(-1)
    valid = teacher_ids >= 0
    ids = torch.where(valid, teacher_ids, 0).long()
    q_s = torch.where(valid, log_q.gather(1, ids).exp(), 0.0)
    p_s = torch.where(valid, teacher_logp.float().exp(), 0.0)
    low = torch.minimum(p_s, q_s).sum(-1)
    p_tail = (1 - p_s.double().sum(-1)).clamp(min=0).float()
    q_tail = (1 - q_s.double().sum(-1)).clamp(min=0).float()
    return low, low + torch.minimum(p_tail, q_tail)


def _windows(store: Store, seq_len: int, max_tokens: int | None) -> Iterator[tuple[int, int]]:
    """Token ranges of at most `seq_len` inside each sequence, in order, up to `max_tokens`."""
    starts = np.concatenate([[0], np.cumsum(store.sequence_lengths())])
    budget = store.num_tokens if max_tokens is None else min(max_tokens, store.num_tokens)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        for w in range(a, b, seq_len):
            stop = min(w + seq_len, b, w + budget)
            if stop <= w:
                return
            yield w, stop
            budget -= stop - w


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _batches(windows: list[np.ndarray], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for chunk in _chunks(windows, batch_size):
        yield _pad(chunk, len(chunk))


def _pad(windows: list[np.ndarray], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest window: [rows, L] int64 ids (0 at padding) and a bool mask.
    Causal attention never lets a real position see the padding after it."""
    longest = max(len(w) for w in windows)
    ids = torch.zeros((rows, longest), dtype=torch.int64)
    mask = torch.zeros((rows, longest), dtype=torch.bool)
    for r, w in enumerate(windows):
        ids[r, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.int64))
        mask[r, : len(w)] = True
    return ids, mask


def _document_positions(document_starts: np.ndarray, spans: list[tuple[int, int]], width: int) -> torch.Tensor:
    """[rows, width] position ids of windows of a packed-documents store: each token's position in
    its document (see trainer/data.py), restarting at 0 over the right padding."""
    positions = torch.zeros((len(spans), width), dtype=torch.int64)
    for r, (a, b) in enumerate(spans):
        positions[r, : b - a] = torch.from_numpy(document_positions(document_starts, a, b))
        positions[r, b - a :] = torch.arange(width - (b - a))
    return positions


def _logits(
    model: torch.nn.Module, ids: torch.Tensor, vocab_size: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Float32 logits over the vocabulary; with `positions` and no attention mask, attention
    restarts wherever they do (transformers' packed sequences)."""
    device = next(model.parameters()).device
    inputs = {"input_ids": ids.to(device)}
    if positions is not None:
        inputs.update(position_ids=positions.to(device), use_cache=False)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(**inputs).logits
    return logits[..., :vocab_size].float()


def _next_token_nll(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None,
    trained: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Summed next-token negative log-likelihood inside each window (and inside each document, with
    `positions`: a next token at position 0 starts another one; only from the positions `trained`
    when given), and the number of tokens."""
    valid = mask[:, 1:] & mask[:, :-1] & (True if trained is None else trained[:, :-1])
    if positions is not None:
        valid &= positions[:, 1:] != 0
    valid = valid.to(logits.device)
    targets = ids[:, 1:].to(logits.device)[valid]
    nll = F.cross_entropy(logits[:, :-1][valid], targets, reduction="sum")
    return float(nll), float(valid.sum())
