"""Generation capture: the teacher writes `n` completions per prompt, and the soft labels along
each completion are stored from the very forward that sampled it (no second pass).

A prompt is a row of the prompts files: a chat row (its messages rendered with the teacher's chat
template and the assistant header that opens a reply), or plain text (tokenized as a capture
tokenizes it, without the EOS). Each (prompt, sample) is one sequence of the store: the prompt's
tokens, then the completion's. Only the positions that predict a completion token have soft
labels (the store's loss mask, `train_on: completion`); at step s the forward over the
sequence so far gives the distribution of completion token s, which is both reduced to what the
capture mode keeps (reduce.py) and sampled from (temperature, top-p). Sampling stops at an end
token (the tokenizer's EOS and the model's generation config's) or at `max_new_tokens`.

Deterministic: the uniform that picks a token hashes (seed, prompt, sample, step), not a
stateful generator, so a sample's randomness does not depend on its batch, its work unit or a
resume (a sampled-mode store's draws are keyed the same way), and a resumed unit, run in the
same batches, is the same bit for bit. The logits themselves carry the float rounding of their
batch (its padding, its kernels): batched another way, a sample can take another token where
the teacher's distribution is nearly flat. Work units are runs of whole
prompts (all their samples), planned before the teacher runs, so a killed generation resumes
unit by unit (`resume=True`) to the same store. Each sample's prompt, index, finish reason and
the teacher's log-likelihood of its completion are the segment's `samples.parquet`.

Batches hold samples of prompts of similar length, left-padded, with a KV cache. Finished rows
keep running until their batch ends (their tokens are dropped); shrinking the batch as rows
finish is left for when it is measured to matter.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from logitstore import __version__
from logitstore.capture import distributed
from logitstore.capture.chat import render_prompt
from logitstore.capture.corpus import Document, read_documents
from logitstore.capture.engine import (
    CaptureProgress,
    ProgressCallback,
    _input_device,
    _open_writer,
    _reduction,
    _split_model,
    commit_units,
    plan_units,
)
from logitstore.capture.reduce import Reduction, hashed_uniforms
from logitstore.capture.teacher import Teacher
from logitstore.errors import CorpusError
from logitstore.hf import chat_template_sha256, context_length
from logitstore.layout import PIECES_SCHEMA, SAMPLES_SCHEMA
from logitstore.reader import Store
from logitstore.schema import CorpusInfo, GenerationSettings, StoreMeta
from logitstore.spec import CaptureSpec, CaptureTuning, SpecError
from logitstore.writer import SegmentData, now_iso

__all__ = ["Prompt", "generate", "read_prompts", "sample_token"]

# Sampling's uniforms and a sampled-mode store's draws hash the same keys: a different seed
# stream keeps them independent when both seeds are equal.
_SAMPLING_SALT = 0x6A09E667F3BCC908


@dataclass(frozen=True)
class Prompt:
    """One prompt: its row of the prompts files and its tokens (int32)."""

    doc: Document
    ids: np.ndarray


def read_prompts(
    paths: Sequence[str | Path], tokenizer: Any, *, max_prompt_tokens: int, text_field: str = "text",
    messages_field: str = "messages",
) -> list[Prompt]:  # fmt: skip
    """Every prompt of `paths`, tokenized: a chat row through the chat template with the header of an
    assistant reply, a text row as the capture tokenizes it minus the EOS. CorpusError, naming the
    row, for a prompt longer than `max_prompt_tokens` or a conversation that already ends in a reply."""
    prompts = []
    for doc in read_documents(paths, text_field=text_field, messages_field=messages_field):
        if doc.messages is not None:
            ids = render_prompt(tokenizer, doc.messages, doc.source)
        else:
            ids = np.asarray(tokenizer(doc.text, add_special_tokens=True)["input_ids"], dtype=np.int32)
        if not 0 < len(ids) <= max_prompt_tokens:
            raise CorpusError(f"{doc.source}: the prompt has {len(ids)} tokens; with max_new_tokens the sequence "
                              f"must fit max_len, which leaves 1 to {max_prompt_tokens} for a prompt")
        prompts.append(Prompt(doc, ids))
    return prompts


def generate(
    teacher: Teacher,
    prompts_files: Sequence[str | Path],
    out: str,
    spec: CaptureSpec,
    *,
    tuning: CaptureTuning = CaptureTuning(),
    text_field: str = "text",
    messages_field: str = "messages",
    resume: bool = False,
    progress: ProgressCallback | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Store:
    """Sample `spec.generate.n` completions per prompt from `teacher` and write a finished store of
    them with the teacher's soft labels along each completion. As `capture` otherwise: the same
    crash-safe units, `resume`, torchrun ranks (rank r generates units r, r+W, ...), storage."""
    gen = spec.generate
    if gen is None:
        raise SpecError([("generate", "a generation capture needs its settings (n, max_new_tokens, ...)")])
    spec.check_teacher(logits_width=teacher.tokenizer_info.logits_width,
                       context_length=context_length(teacher.model.config.to_dict()), dtype=teacher.info.dtype)
    prompts = read_prompts(prompts_files, teacher.tokenizer, max_prompt_tokens=spec.max_len - gen.max_new_tokens,
                           text_field=text_field, messages_field=messages_field)  # fmt: skip
    # A unit's size is planned from its budget (prompt + max_new_tokens per sample): the completions'
    # lengths are known only once generated, and the plan must not depend on them.
    budget = [(len(p.ids) + gen.max_new_tokens) * gen.n for p in prompts]
    units = plan_units(budget, tuning.unit_tokens)
    meta = _generation_meta(teacher, prompts, spec, tuning, len(units))
    rank, world = distributed.rank_and_world()
    writer = _open_writer(out, meta, resume, rank, storage_options)
    done = writer.committed()
    distributed.barrier()

    mine = [i for i in range(rank, len(units), world)]
    total = sum(gen.n * gen.max_new_tokens * len(units[i]) for i in mine)
    before = sum(gen.n * gen.max_new_tokens * len(units[i]) for i in mine if i in done)
    counted, generated, started = before, 0, time.perf_counter()

    def report(budget_used: int = 0, tokens: int = 0) -> None:
        # Progress in generation budget (a finished sample's unused steps count as done), the rate
        # in tokens actually generated by this run.
        nonlocal counted, generated
        counted, generated = counted + budget_used, generated + tokens
        if progress:
            progress(CaptureProgress(counted, total, generated, time.perf_counter() - started))

    report()
    reduction = _reduction(spec)
    return commit_units(writer, [i for i in mine if i not in done],
                        lambda i: generate_unit(teacher, prompts, units[i], gen, reduction, tuning, on_step=report),
                        writes=True, rank=rank, storage_options=storage_options)  # fmt: skip


@dataclass
class _Sampled:
    """One sample's completion and the soft labels of the positions that predicted it."""

    tokens: np.ndarray  # int32 [c]
    ids: np.ndarray  # [c, K]
    logp: np.ndarray  # [c, K]
    lse: np.ndarray  # [c, n_T]
    counts: np.ndarray | None  # [c, K]
    finished: bool  # an end token was sampled (the last token)
    logprob: float  # sum of the teacher's log p (T = 1) of the completion's tokens


def generate_unit(
    teacher: Teacher, prompts: list[Prompt], unit: range, gen: GenerationSettings, reduction: Reduction,
    tuning: CaptureTuning, *, on_step: Callable[[int, int], None] | None = None,
) -> SegmentData:  # fmt: skip
    """The segment of one unit of prompts: every sample as a sequence (prompt, then completion),
    prompt-major in prompt order. `on_step(budget, tokens)` after every decoding step."""
    rows = [(p, s) for p in unit for s in range(gen.n)]
    lengths = np.array([len(prompts[p].ids) for p, _ in rows])
    results: dict[int, _Sampled] = {}
    for batch in _prompt_batches(lengths, gen.max_new_tokens, tuning.batch_tokens):
        uids = np.array([rows[r][0] * gen.n + rows[r][1] for r in batch], dtype=np.int64)
        sampled = _sample_batch(teacher, [prompts[rows[r][0]].ids for r in batch], uids, gen, reduction,
                                on_step=on_step)  # fmt: skip
        results.update(zip(batch, sampled, strict=True))

    k, n_t = reduction.k, len(reduction.temperatures)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("input_ids", "ids", "logp", "lse", "counts")}
    pieces, samples = [], []
    for r, (p, s) in enumerate(rows):
        prompt, done = prompts[p], results[r]
        n_p, n_c = len(prompt.ids), len(done.tokens)
        n = n_p + n_c
        # Position t predicts token t + 1: the c completion tokens were predicted at n_p - 1 .. n - 2.
        ids = np.full((n, k), -1, np.int32)
        logp = np.full((n, k), -np.inf, np.float32)
        lse = np.zeros((n, n_t), np.float32)
        labelled = slice(n_p - 1, n - 1)
        ids[labelled], logp[labelled], lse[labelled] = done.ids, done.logp, done.lse
        parts["input_ids"].append(np.concatenate([prompt.ids, done.tokens]).astype(np.int32))
        parts["ids"].append(ids)
        parts["logp"].append(logp)
        parts["lse"].append(lse)
        if done.counts is not None:
            counts = np.zeros((n, k), np.uint8)
            counts[labelled] = done.counts
            parts["counts"].append(counts)
        text = prompt.doc.text.encode("utf-8")
        pieces.append((r, 0, n, prompt.doc.doc_id, prompt.doc.source, 0, hashlib.sha256(text).hexdigest()))
        samples.append((r, prompt.doc.doc_id, s, n_p, n_c, "eos" if done.finished else "length", done.logprob))
    return SegmentData(
        input_ids=np.concatenate(parts["input_ids"]),
        topk_ids=np.concatenate(parts["ids"]),
        topk_logp=np.concatenate(parts["logp"]),
        lse=np.concatenate(parts["lse"]),
        seq_lengths=np.array([len(x) for x in parts["input_ids"]], dtype=np.int64),
        pieces=pa.table(list(zip(*pieces, strict=True)), schema=PIECES_SCHEMA),
        counts=np.concatenate(parts["counts"]) if parts["counts"] else None,
        samples=pa.table(list(zip(*samples, strict=True)), schema=SAMPLES_SCHEMA),
    )


def _prompt_batches(prompt_lengths: np.ndarray, max_new_tokens: int, batch_tokens: int) -> list[list[int]]:
    """Rows grouped by similar prompt length (longest first, stable), at most `batch_tokens` of
    prompt + completion budget per batch (one row at least). Deterministic, like the capture's."""
    order = np.argsort(-prompt_lengths, kind="stable")
    batches: list[list[int]] = []
    for r in order.tolist():
        if batches and (len(batches[-1]) + 1) * (prompt_lengths[batches[-1][0]] + max_new_tokens) <= batch_tokens:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


@torch.inference_mode()
def _sample_batch(
    teacher: Teacher, prompts: list[np.ndarray], uids: np.ndarray, gen: GenerationSettings, reduction: Reduction,
    *, on_step: Callable[[int, int], None] | None = None,
) -> list[_Sampled]:  # fmt: skip
    """Sample one completion per row (prompt, unique sample id) with a KV cache; each step's
    logits are reduced to the stored soft labels and sampled from, once."""
    model = teacher.model
    device = _input_device(model)
    body, head, softcap = _split_model(model)
    b, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros((b, longest), dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's next token goes in the same column
        ids[r, longest - len(p) :] = torch.from_numpy(p.astype(np.int64))
        mask[r, longest - len(p) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    end = torch.tensor(sorted(_end_ids(teacher)), dtype=torch.long, device=device)
    vocab = teacher.tokenizer_info.vocab_size  # logits past it (a padded head) are no tokens: never sampled
    keys_base = torch.from_numpy(uids * gen.max_new_tokens).to(device)

    # The KV cache's argument and output: `cache` in transformers >= 5.2x, `past_key_values` before.
    cache_name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
    out = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, hidden = getattr(out, cache_name), out.last_hidden_state[:, -1]
    next_position = positions[:, -1] + 1
    alive = torch.ones(b, dtype=torch.bool, device=device)
    length = torch.zeros(b, dtype=torch.long, device=device)
    steps: list[tuple[torch.Tensor, ...]] = []
    for step in range(gen.max_new_tokens):
        z = head(hidden).float()
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        keys = keys_base + step
        kept_ids, kept_logp, lse, counts = reduction(z, keys.to(z.device))
        u = hashed_uniforms(keys, 1, gen.seed ^ _SAMPLING_SALT)[:, 0].to(z.device)
        token = sample_token(z[:, :vocab], gen.temperature, gen.top_p, u)
        token_logp = z.gather(1, token[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
        steps.append((token, token_logp, kept_ids, kept_logp, lse, counts))
        sampled = int(alive.sum())  # rows still generating took this token
        length += alive
        alive &= ~torch.isin(token.to(device), end)
        if on_step is not None:  # every row spends one step of its budget; an ended batch, all it had left
            on_step(b * (1 if alive.any() else gen.max_new_tokens - step), sampled)
        if not alive.any():
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        out = body(input_ids=token[:, None].to(device), attention_mask=mask, position_ids=next_position[:, None],
                   use_cache=True, **{cache_name: cache})  # fmt: skip
        cache, hidden = getattr(out, cache_name), out.last_hidden_state[:, -1]
        next_position = next_position + 1

    cols = [torch.stack(col, dim=1).cpu() if col[0] is not None else None for col in zip(*steps, strict=True)]
    tokens, token_logp, kept_ids, kept_logp, lse, counts = cols
    lengths = length.cpu().tolist()
    return [
        _Sampled(
            tokens=tokens[r, :c].numpy().astype(np.int32),
            ids=kept_ids[r, :c].numpy(),
            logp=kept_logp[r, :c].numpy(),
            lse=lse[r, :c].numpy(),
            counts=None if counts is None else counts[r, :c].numpy(),
            finished=bool(torch.isin(tokens[r, c - 1], end.cpu())),
            logprob=float(token_logp[r, :c].double().sum()),
        )
        for r, c in enumerate(lengths)
    ]


def sample_token(z: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """One id per row of logits [b, V] from softmax(z / temperature) restricted to its nucleus (the
    fewest likeliest ids whose mass reaches `top_p`), by inverse CDF at the uniforms `u` [b]."""
    probs = torch.softmax(z / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    if top_p < 1:  # at 1 every id stays (a float32 running sum may reach 1 before the tail ends)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the likelier ids
        sorted_p = torch.where(before < top_p, sorted_p, 0.0)  # the first id is always kept
    cdf = torch.cumsum(sorted_p, dim=-1)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: such a draw goes to the last id with mass.
    pick = torch.minimum(torch.searchsorted(cdf, (u[:, None] * total).contiguous(), right=True),
                         torch.searchsorted(cdf, total.contiguous()))  # fmt: skip
    return order.gather(1, pick)[:, 0]


def _end_ids(teacher: Teacher) -> set[int]:
    """Tokens that end a completion: the tokenizer's EOS and the model's generation config's."""
    ends = {teacher.tokenizer.eos_token_id}
    config = getattr(teacher.model, "generation_config", None)
    found = getattr(config, "eos_token_id", None) if config is not None else None
    ends.update(found if isinstance(found, list) else [found])
    ends.discard(None)
    if not ends:
        raise CorpusError("the teacher's tokenizer has no EOS token: a completion would never end before "
                          "max_new_tokens; give the tokenizer an eos_token")
    return ends


def _generation_meta(
    teacher: Teacher, prompts: list[Prompt], spec: CaptureSpec, tuning: CaptureTuning, num_units: int
) -> StoreMeta:
    fingerprint = hashlib.sha256()
    sources: dict[str, None] = {}
    for p in prompts:
        data = p.doc.text.encode("utf-8")
        fingerprint.update(len(data).to_bytes(8, "little"))
        fingerprint.update(data)
        sources[p.doc.source.rsplit(":", 1)[0]] = None
    chat = any(p.doc.messages is not None for p in prompts)
    template = chat_template_sha256(teacher.tokenizer) if chat else None
    n = spec.generate.n
    return StoreMeta(
        producer=f"logitstore {__version__}",
        created_at=now_iso(),
        teacher=teacher.info,
        tokenizer=teacher.tokenizer_info.model_copy(update={"chat_template_sha256": template}),
        capture=spec.stored(logp_codec=tuning.logp_codec.to_dict(), chunk_tokens=tuning.chunk_tokens),
        # A generated store's corpus is its prompts: `tokens` counts their tokens once per sample (the
        # completions' are known only once generated), `sequences` one per sample.
        corpus=CorpusInfo(fingerprint=fingerprint.hexdigest(), sources=tuple(sources), documents=len(prompts),
                          tokens=n * sum(len(p.ids) for p in prompts), sequences=n * len(prompts)),
        num_segments=num_units,
    )
