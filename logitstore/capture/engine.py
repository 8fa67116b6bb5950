"""The capture loop: packed sequences → teacher forward → top-k and log-normalizers → segments.

Per batch, the teacher's final hidden states are projected to logits a few rows at a
time, so a full fp32 `[B, L, V]` tensor never exists (at V = 262144 one 8192-token batch
of fp32 logits would be 8.6 GB). Each row chunk is reduced on the device by the capture
mode (reduce.py: top-k, coverage-adaptive or sampled ids, and the log-normalizer
`logsumexp(log_softmax(z) / T)` for every captured T); only `[rows, K]` and `[rows, n_T]`
leave the device, through pinned buffers copied without blocking while the next batch is
queued. Padding positions are dropped before the projection, so they are never stored.

Work units are consecutive sequences planned before the teacher runs; each becomes one
segment, written by a background thread while the teacher computes the next unit. Under
torchrun, rank r of W computes units r, r+W, ... (see `capture`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from logitstore import __version__, storage
from logitstore.capture import distributed
from logitstore.capture.corpus import PackedCorpus, PackedSequence, read_documents, tokenize_and_pack
from logitstore.capture.document_attention import check_document_attention
from logitstore.capture.reduce import Reduction
from logitstore.capture.teacher import Teacher
from logitstore.errors import LogitStoreError
from logitstore.hf import chat_template_sha256, context_length
from logitstore.layout import PIECES_SCHEMA
from logitstore.reader import Store, open_store
from logitstore.schema import CorpusInfo, StoreMeta
from logitstore.spec import CaptureSpec, CaptureTuning, SpecError
from logitstore.writer import SegmentData, StoreWriter, check_target, now_iso

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class CaptureProgress:
    """A capture's progress, reported at the start and after each teacher forward (batch).

    `tokens_done` counts the tokens the teacher has processed, including those committed by an
    earlier run (a resumed capture starts where it stopped); the ones of a work unit not yet
    committed are recomputed if the capture dies. `tokens_per_s` counts only this run's work,
    so the ETA of a resumed capture is not inflated by tokens it did not compute.
    """

    tokens_done: int
    tokens_total: int
    tokens_this_run: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds to go at this run's rate; None before the first unit of this run."""
        if self.tokens_done >= self.tokens_total:
            return 0.0
        rate = self.tokens_per_s
        return (self.tokens_total - self.tokens_done) / rate if rate > 0 else None


# Called from the capture's thread, once per batch. An exception raised by the callback stops the
# capture (committed units stay committed, so `resume=True` continues): this is how a job is cancelled.
ProgressCallback = Callable[[CaptureProgress], None]


def _reduction(spec: CaptureSpec) -> Reduction:
    return Reduction(spec.mode, spec.slots, spec.temperatures, spec.coverage, spec.draws, spec.seed, spec.head)


def plan_units(seq_lengths: Sequence[int], unit_tokens: int) -> list[range]:
    """Split sequences, in order, into units of consecutive sequences of about `unit_tokens`
    tokens (a unit always holds at least one sequence). A pure function of its inputs, so a
    resumed or multi-process capture cuts the work identically."""
    units, start, fill = [], 0, 0
    for i, n in enumerate(seq_lengths):
        if fill and fill + n > unit_tokens:
            units.append(range(start, i))
            start, fill = i, 0
        fill += n
    if fill:
        units.append(range(start, len(seq_lengths)))
    return units


def capture(
    teacher: Teacher,
    corpus: Sequence[str | Path],
    out: str,
    spec: CaptureSpec = CaptureSpec(),
    *,
    tuning: CaptureTuning = CaptureTuning(),
    text_field: str = "text",
    messages_field: str = "messages",
    resume: bool = False,
    progress: ProgressCallback | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Store:
    """Run `teacher` over the corpus files and write a finished store at `out`.

    Under torchrun (a process group is initialized, see distributed.py) every rank calls
    this with the same arguments: rank r computes work units r, r+W, ...; rank 0 creates
    (or resumes and garbage-collects) the store before the others write, and finalizes it
    once all have committed. Progress then counts the calling rank's units only. A
    tensor-parallel teacher (`teacher.tp` > 1) is one teacher over all the ranks: they compute
    every unit together, and rank 0 alone writes.

    `out` is a local directory or an fsspec URL (`s3://bucket/prefix/store`); `storage_options`
    go to fsspec as they are (e.g. `{"endpoint_url": ...}` for an S3-compatible server).
    `text_field` and `messages_field` name the rows' fields (corpus.read_documents).
    """
    if spec.generate is not None:
        raise SpecError([("generate", "a generation capture runs with logitstore.capture.generate.generate "
                          "(`logitstore generate`), not capture")])  # fmt: skip
    spec.check_teacher(logits_width=teacher.tokenizer_info.logits_width,
                       context_length=context_length(teacher.model.config.to_dict()), dtype=teacher.info.dtype)
    if spec.packing == "packed-documents":
        check_document_attention(teacher.model, "teacher")
    packed = tokenize_and_pack(
        read_documents(corpus, text_field=text_field, messages_field=messages_field),
        teacher.tokenizer,
        max_len=spec.max_len,
        packing=spec.packing,
        max_tokens=spec.max_tokens,
        train_on=spec.train_on,
    )
    lengths = [len(s.input_ids) for s in packed.sequences]
    units = plan_units(lengths, tuning.unit_tokens)
    unit_tokens = [sum(lengths[j] for j in unit) for unit in units]
    unit_starts = np.concatenate([[0], np.cumsum(unit_tokens)]).astype(np.int64)
    meta = _store_meta(teacher, packed, spec, tuning, len(units))
    rank, world = distributed.rank_and_world()
    writer = _open_writer(out, meta, resume, rank, storage_options)
    done = writer.committed()
    # No rank commits a unit before every rank knows what was done: tensor-parallel ranks must
    # skip the same units, or one would wait forever in a forward the others never run.
    distributed.barrier()

    writes = rank == 0 or teacher.tp == 1
    mine = range(len(units)) if teacher.tp > 1 else range(rank, len(units), world)
    tokens_total = sum(unit_tokens[i] for i in mine)
    tokens_before = sum(unit_tokens[i] for i in mine if i in done)
    tokens_done, started = tokens_before, time.perf_counter()

    def report(batch_tokens: int = 0) -> None:
        nonlocal tokens_done
        tokens_done += batch_tokens
        if progress:
            progress(CaptureProgress(tokens_done, tokens_total, tokens_done - tokens_before,
                                     time.perf_counter() - started))

    report()

    def compute(i: int) -> SegmentData:
        seqs = [packed.sequences[j] for j in units[i]]
        return capture_unit(teacher, seqs, spec, tuning, token_start=int(unit_starts[i]), on_batch=report)

    return commit_units(writer, [i for i in mine if i not in done], compute, writes=writes, rank=rank,
                        storage_options=storage_options)  # fmt: skip


def commit_units(
    writer: StoreWriter, todo: Sequence[int], compute: Callable[[int], SegmentData], *, writes: bool, rank: int,
    storage_options: dict[str, Any] | None,
) -> Store:  # fmt: skip
    """Compute and commit the work units `todo` (`compute(i)` is unit i's segment), then, once every
    rank has committed its own, finalize the store (rank 0) and open it. One background writer
    encodes and writes unit i while the teacher computes unit i+1; waiting for it before
    submitting the next bounds host memory to two units. `writes`: False on the tensor-parallel
    ranks that compute without writing."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-writer") as pool:
        pending: Future | None = None
        for i in todo:
            data = compute(i)
            if pending is not None:
                pending.result()
            if writes:
                pending = pool.submit(writer.write_segment, i, data)
        if pending is not None:
            pending.result()
    distributed.barrier()  # every rank's units are committed
    if rank == 0:
        writer.finalize()
    distributed.barrier()  # nobody opens the store before index.json exists
    return open_store(writer.url, storage_options=storage_options)


def check_inputs(
    corpus: Sequence[str | Path],
    out: str,
    *,
    text_field: str = "text",
    messages_field: str = "messages",
    resume: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """What can be wrong with a capture's inputs, checked in seconds, before a teacher loads:
    the corpus files exist, have a known suffix and hold a document (up to the first one), and
    `out` holds a store exactly when resuming. The CLI calls it before loading the teacher (and
    before launching torchrun); `capture` finds the same problems later, rank-safely."""
    next(iter(read_documents(corpus, text_field=text_field, messages_field=messages_field)))
    check_target(storage.open_kv(out, read_only=True, storage_options=storage_options), out, resume=resume)


def _open_writer(
    out: str, meta: StoreMeta, resume: bool, rank: int, storage_options: dict[str, Any] | None
) -> StoreWriter:
    """Rank 0 creates the store (or reopens it and removes uncommitted segments); the other
    ranks open it only once that is done, and fail with rank 0's error if it failed."""
    writer, error = None, None
    if rank == 0:
        try:
            if resume:
                writer = StoreWriter.resume(out, meta, storage_options=storage_options)
                writer.collect_garbage()
            else:
                writer = StoreWriter.create(out, meta, storage_options=storage_options)
        except LogitStoreError as e:
            error = e
    distributed.share_outcome(str(error) if error else None)
    if error is not None:
        raise error
    # Same settings, so the check passes; created_at may differ and is ignored.
    return writer if writer is not None else StoreWriter.resume(out, meta, storage_options=storage_options)


def capture_unit(
    teacher: Teacher,
    seqs: list[PackedSequence],
    spec: CaptureSpec,
    tuning: CaptureTuning = CaptureTuning(),
    *,
    token_start: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> SegmentData:
    """The teacher's soft labels for one work unit, in sequence order. `token_start` is the
    unit's first global token position (it keys the sampled mode's draws); `on_batch(tokens)`
    is called after each teacher forward (progress between commits)."""
    lengths = np.array([len(s.input_ids) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n, k = int(offsets[-1]), spec.slots
    topk_ids = np.empty((n, k), dtype=np.int32)
    topk_logp = np.empty((n, k), dtype=np.float32)
    lse = np.empty((n, len(spec.temperatures)), dtype=np.float32)
    counts = np.empty((n, k), dtype=np.uint8) if spec.mode == "sampled" else None
    reduction = _reduction(spec)

    def scatter(batch: list[int], result: _BatchResult) -> None:
        ids, logp, norm, cnt = result.numpy()
        pos = 0
        for j in batch:  # rows come out in the batch's order
            a, b = offsets[j], offsets[j + 1]
            rows = slice(pos, pos + b - a)
            topk_ids[a:b], topk_logp[a:b], lse[a:b] = ids[rows], logp[rows], norm[rows]
            if counts is not None:
                counts[a:b] = cnt[rows]
            pos += b - a

    # Software pipeline: batch i's results are copied to the host without blocking, and read
    # only after batch i+1 is queued, so an accelerator never idles waiting for the host.
    pending: tuple[list[int], _BatchResult] | None = None
    by_document = spec.packing == "packed-documents"
    for batch in _batches(lengths, max(tuning.batch_tokens, spec.max_len)):
        keys = np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in batch]) + token_start
        positions = [seqs[j].document_positions() for j in batch] if by_document else None
        result = _forward_batch(teacher, [seqs[j].input_ids for j in batch], keys, reduction, tuning.row_chunk,
                                positions=positions)  # fmt: skip
        if pending is not None:
            scatter(*pending)
        pending = (batch, result)
        if on_batch is not None:
            on_batch(len(keys))
    if pending is not None:
        scatter(*pending)
    if any(s.loss_mask is not None for s in seqs):
        # Positions outside the loss mask (chat prompts) keep no soft labels: no slots, lse 0.
        # The teacher still ran over them: they are the context of the positions that do.
        out = ~np.concatenate([np.ones(len(s.input_ids), bool) if s.loss_mask is None else s.loss_mask for s in seqs])
        topk_ids[out], topk_logp[out], lse[out] = -1, -np.inf, 0
        if counts is not None:
            counts[out] = 0
    return SegmentData(
        input_ids=np.concatenate([s.input_ids for s in seqs]).astype(np.int32),
        topk_ids=topk_ids,
        topk_logp=topk_logp,
        lse=lse,
        seq_lengths=lengths,
        pieces=_pieces_table(seqs),
        counts=counts,
    )


def _batches(lengths: np.ndarray, batch_tokens: int) -> list[list[int]]:
    """Group sequences of similar length (sorted, stable) so little compute goes to padding.
    Deterministic, so a resumed capture computes each unit with the same batches."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    for j in order.tolist():
        longest = int(lengths[current[0]]) if current else int(lengths[j])
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(j)
    if current:
        batches.append(current)
    return batches


@dataclass
class _BatchResult:
    """A batch's reduced rows on their way to the host: on CUDA, pinned buffers filled by
    non-blocking copies, readable once `ready` has fired; on CPU, the tensors themselves."""

    tensors: list[torch.Tensor | None]
    ready: torch.cuda.Event | None

    def numpy(self) -> list[np.ndarray | None]:
        if self.ready is not None:
            self.ready.synchronize()
        return [t.numpy() if t is not None else None for t in self.tensors]


# On CPU the reduction's passes over [rows, V] (lse per temperature, top-k, the sampler's CDF)
# are bound by memory bandwidth: over 16 rows at a time each pass stays in cache. Measured on
# the 2-core box, 512 rows of V = 49152: 0.25 -> 0.07 s for top-64 at 3 temperatures, 0.24 ->
# 0.08 s sampled, identical results. The projection keeps `row_chunk` rows: a few rows per
# matmul would stream the [V, H] head weight from memory once per few rows.
CPU_REDUCE_ROWS = 16


@torch.inference_mode()
def _forward_batch(
    teacher: Teacher, sequences: list[np.ndarray], keys: np.ndarray, reduction: Reduction, row_chunk: int,
    *, positions: list[np.ndarray] | None = None,
) -> _BatchResult:  # fmt: skip
    """ids [n, K], log-probs at T=1 [n, K], lse [n, n_T] and counts [n, K] (sampled) for the
    n real tokens of a batch, in the batch's order; `keys` are their global positions.

    `positions` (packed-documents): each sequence's position ids, restarting at every document.
    They go to the model without an attention mask or a cache, which transformers reads as
    packed sequences: each document attends only to itself (document_attention.py).

    A teacher spread over devices (`device_map`) takes its inputs on its embedding's device
    and gives its hidden states on its last layer's; each step below runs where its tensor
    is, so the reduction runs on the output projection's device, and only the reduced rows
    leave it.
    """
    model = teacher.model
    device = _input_device(model)
    longest = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), longest), dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    pos = torch.zeros((len(sequences), longest), dtype=torch.long) if positions is not None else None
    for b, s in enumerate(sequences):  # right padding: positions of real tokens are unchanged
        ids[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[b, : len(s)] = 1
        if pos is not None:
            pos[b, : len(s)] = torch.from_numpy(positions[b])
            pos[b, len(s) :] = torch.arange(longest - len(s))
    # Real-token positions from the host mask: a boolean index on the device would sync.
    real = mask.flatten().nonzero().squeeze(1)
    ids, mask = ids.to(device), mask.to(device)
    keys_t = torch.from_numpy(keys.astype(np.int64))

    body, head, softcap = _split_model(model)
    if pos is None:
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        hidden = body(input_ids=ids, position_ids=pos.to(device), use_cache=False).last_hidden_state
    # [n, H]: drop padding before the projection
    hidden = hidden.flatten(0, 1).index_select(0, real.to(hidden.device, non_blocking=True))

    parts = []
    for rows, row_keys in zip(hidden.split(row_chunk), keys_t.split(row_chunk), strict=True):
        z = head(rows).float()  # [r, V] fp32, the only vocabulary-wide tensor (plus the reduction's)
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        reduce_rows = row_chunk if z.is_cuda else CPU_REDUCE_ROWS
        row_keys = row_keys.to(z.device, non_blocking=True)
        for block, block_keys in zip(z.split(reduce_rows), row_keys.split(reduce_rows), strict=True):
            parts.append(reduction(block, block_keys))
        del z
    out = [torch.cat(col) if col[0] is not None else None for col in zip(*parts, strict=True)]
    if not out[0].is_cuda:
        return _BatchResult(out, None)
    host = []
    for t in out:
        if t is None:
            host.append(None)
            continue
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t, non_blocking=True)
        host.append(buf)
    ready = torch.cuda.Event()
    ready.record()
    return _BatchResult(host, ready)


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where the teacher takes its input ids: its embedding's execution device (accelerate's hook
    when the model is dispatched over devices or offloaded), else the embedding weight's."""
    embedding = model.get_input_embeddings()
    hook_device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    return torch.device(hook_device) if hook_device is not None else embedding.weight.device


def _split_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """(decoder body returning last_hidden_state, output projection, final logit soft-cap)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise LogitStoreError(
            f"{type(model).__name__} does not expose its decoder and output projection "
            "(get_decoder / get_output_embeddings); logitstore needs them to compute logits in row chunks"
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return body, head, softcap


def _pieces_table(seqs: list[PackedSequence]) -> pa.Table:
    rows = [(j, p) for j, s in enumerate(seqs) for p in s.pieces]
    return pa.table(
        {
            "sequence": [j for j, _ in rows],
            "seq_token_offset": [p.seq_token_offset for _, p in rows],
            "num_tokens": [p.num_tokens for _, p in rows],
            "doc_id": [p.doc_id for _, p in rows],
            "source": [p.source for _, p in rows],
            "doc_token_offset": [p.doc_token_offset for _, p in rows],
            "content_sha256": [p.content_sha256 for _, p in rows],
        },
        schema=PIECES_SCHEMA,
    )


def _store_meta(
    teacher: Teacher, packed: PackedCorpus, spec: CaptureSpec, tuning: CaptureTuning, num_units: int
) -> StoreMeta:
    # Chat rows were rendered with the tokenizer's template: a student must render chats the same way.
    template = chat_template_sha256(teacher.tokenizer) if packed.chat_documents else None
    return StoreMeta(
        producer=f"logitstore {__version__}",
        created_at=now_iso(),
        teacher=teacher.info,
        tokenizer=teacher.tokenizer_info.model_copy(update={"chat_template_sha256": template}),
        capture=spec.stored(logp_codec=tuning.logp_codec.to_dict(), chunk_tokens=tuning.chunk_tokens,
                            chat=packed.chat_documents > 0),
        corpus=CorpusInfo(
            fingerprint=packed.fingerprint,
            sources=packed.sources,
            documents=packed.documents,
            tokens=packed.tokens,
            sequences=len(packed.sequences),
        ),
        num_segments=num_units,
    )
