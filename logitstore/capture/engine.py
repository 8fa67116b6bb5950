"""The capture loop: packed sequences → teacher forward → top-k and log-normalizers → segments.

Per batch, the teacher's final hidden states are projected to logits a few rows at a
time, so a full fp32 `[B, L, V]` tensor never exists (at V = 262144 one 8192-token batch
of fp32 logits would be 8.6 GB). Per row chunk: `topk` of the logits, and
`logsumexp(z / T)` for every captured T; only `[rows, K]` and `[rows, n_T]` leave the
device. Padding positions are dropped before the projection, so they are never stored.

Work units are consecutive sequences planned before the teacher runs; each becomes one
segment, written by a background thread while the teacher computes the next unit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from logitstore import __version__
from logitstore.capture.corpus import PackedCorpus, PackedSequence, read_documents, tokenize_and_pack
from logitstore.capture.teacher import Teacher
from logitstore.codecs import LogProbCodec
from logitstore.errors import LogitStoreError
from logitstore.layout import PIECES_SCHEMA
from logitstore.reader import Store, open_store
from logitstore.schema import CaptureSettings, CorpusInfo, StoreMeta
from logitstore.writer import SegmentData, StoreWriter, now_iso

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class CaptureProgress:
    """A capture's progress, reported at the start and after the teacher finishes each work unit.

    `tokens_done` counts tokens already committed by an earlier run too (a resumed capture
    starts where it stopped); `tokens_per_s` counts only this run's work, so the ETA of a
    resumed capture is not inflated by tokens it did not compute.
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


# Called from the capture's thread. An exception raised by the callback stops the capture
# (committed units stay committed, so `resume=True` continues): this is how a job is cancelled.
ProgressCallback = Callable[[CaptureProgress], None]


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture and how to cut the work."""

    k: int = 64
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    max_len: int = 1024
    packing: Literal["packed", "document"] = "packed"
    max_tokens: int | None = None
    text_field: str = "text"
    unit_tokens: int = 262_144  # tokens per work unit = per segment (one shard per array)
    chunk_tokens: int = 4096  # rows per Zarr chunk inside a shard
    batch_tokens: int = 8192  # tokens (padded) per teacher forward
    row_chunk: int = 2048  # logits rows materialized at once
    logp_codec: LogProbCodec = field(default_factory=LogProbCodec)

    def settings(self) -> CaptureSettings:
        return CaptureSettings(
            k=self.k,
            temperatures=tuple(self.temperatures),
            max_len=self.max_len,
            packing=self.packing,
            logp_codec=self.logp_codec.to_dict(),
            chunk_tokens=self.chunk_tokens,
        )


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
    config: CaptureConfig = CaptureConfig(),
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
) -> Store:
    """Run `teacher` over the corpus files and write a finished store at `out`."""
    _check_config(config, teacher)
    packed = tokenize_and_pack(
        read_documents(corpus, text_field=config.text_field),
        teacher.tokenizer,
        max_len=config.max_len,
        packing=config.packing,
        max_tokens=config.max_tokens,
    )
    units = plan_units([len(s.input_ids) for s in packed.sequences], config.unit_tokens)
    meta = _store_meta(teacher, packed, config, len(units))
    if resume:
        writer = StoreWriter.resume(out, meta)
        writer.collect_garbage()
        done = writer.committed()
    else:
        writer = StoreWriter.create(out, meta)
        done = set()

    tokens_before = sum(len(packed.sequences[j].input_ids) for i in done for j in units[i])
    tokens_done, started = tokens_before, time.perf_counter()

    def report() -> None:
        if progress:
            progress(CaptureProgress(tokens_done, packed.tokens, tokens_done - tokens_before,
                                     time.perf_counter() - started))

    report()
    # One background writer: it encodes and writes unit i while the teacher runs unit i+1;
    # waiting for it before submitting the next bounds host memory to two units.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-writer") as pool:
        pending: Future | None = None
        for i, unit in enumerate(units):
            if i in done:
                continue
            seqs = [packed.sequences[j] for j in unit]
            data = capture_unit(teacher, seqs, config)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write_segment, i, data)
            tokens_done += len(data.input_ids)
            report()
        if pending is not None:
            pending.result()
    writer.finalize()
    return open_store(out)


def capture_unit(teacher: Teacher, seqs: list[PackedSequence], config: CaptureConfig) -> SegmentData:
    """The teacher's soft labels for one work unit, in sequence order."""
    lengths = np.array([len(s.input_ids) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = int(offsets[-1])
    topk_ids = np.empty((n, config.k), dtype=np.int32)
    topk_logp = np.empty((n, config.k), dtype=np.float32)
    lse = np.empty((n, len(config.temperatures)), dtype=np.float32)
    for batch in _batches(lengths, config.batch_tokens):
        ids, logp, norm = _forward_batch(teacher, [seqs[j].input_ids for j in batch], config)
        pos = 0
        for j in batch:  # scatter back: rows come out in the batch's order
            a, b = offsets[j], offsets[j + 1]
            rows = slice(pos, pos + b - a)
            topk_ids[a:b], topk_logp[a:b], lse[a:b] = ids[rows], logp[rows], norm[rows]
            pos += b - a
    return SegmentData(
        input_ids=np.concatenate([s.input_ids for s in seqs]).astype(np.int32),
        topk_ids=topk_ids,
        topk_logp=topk_logp,
        lse=lse,
        seq_lengths=lengths,
        pieces=_pieces_table(seqs),
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


@torch.inference_mode()
def _forward_batch(
    teacher: Teacher, sequences: list[np.ndarray], config: CaptureConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids [n, K], their log-probs at T=1 [n, K], and lse [n, n_T] for the n real tokens."""
    model = teacher.model
    device = next(model.parameters()).device
    longest = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), longest), dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for b, s in enumerate(sequences):  # right padding: positions of real tokens are unchanged
        ids[b, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[b, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)

    body, head, softcap = _split_model(model)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden = hidden[mask.bool()]  # [n, H]: drop padding before paying for the projection

    temps = torch.tensor(config.temperatures, dtype=torch.float32, device=device)
    out_ids, out_logp, out_lse = [], [], []
    for rows in hidden.split(config.row_chunk):
        z = head(rows).float()  # [r, V] fp32, the only vocabulary-wide tensor
        if softcap is not None:
            z = torch.tanh(z / softcap) * softcap
        values, top = torch.topk(z, config.k, dim=-1)
        lse_t = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temps.tolist()], dim=-1)
        logp = values - lse_t[:, config.temperatures.index(1.0), None]
        top = torch.where(torch.isneginf(logp), -1, top)  # masked logits carry no mass: padding
        out_ids.append(top.to(torch.int32).cpu())
        out_logp.append(logp.cpu())
        out_lse.append(lse_t.cpu())
    return torch.cat(out_ids).numpy(), torch.cat(out_logp).numpy(), torch.cat(out_lse).numpy()


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


def _store_meta(teacher: Teacher, packed: PackedCorpus, config: CaptureConfig, num_units: int) -> StoreMeta:
    return StoreMeta(
        producer=f"logitstore {__version__}",
        created_at=now_iso(),
        teacher=teacher.info,
        tokenizer=teacher.tokenizer_info,
        capture=config.settings(),
        corpus=CorpusInfo(
            fingerprint=packed.fingerprint,
            sources=packed.sources,
            documents=packed.documents,
            tokens=packed.tokens,
            sequences=len(packed.sequences),
        ),
        num_segments=num_units,
    )


def _check_config(config: CaptureConfig, teacher: Teacher) -> None:
    width = teacher.tokenizer_info.logits_width
    if not 0 < config.k <= width:
        raise LogitStoreError(f"--k {config.k} must be between 1 and the teacher's logits width {width}")
    if 1.0 not in config.temperatures:
        raise LogitStoreError("--temperatures must include 1 (stored log-probs are decoded at T=1)")
    if any(t <= 0 or not math.isfinite(t) for t in config.temperatures):
        raise LogitStoreError(f"--temperatures must be positive, got {list(config.temperatures)}")
    if config.max_len < 1 or config.batch_tokens < config.max_len:
        raise LogitStoreError(f"--max-len {config.max_len} must be in [1, batch_tokens={config.batch_tokens}]")
