"""Synthetic stores for the format tests: StoreMeta by hand, segments from float64 references.

A plain module (not a conftest): the crash test's child process imports it too, so both
sides generate the same data from the same seed.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from logitstore.codecs import LogProbCodec
from logitstore.layout import PIECES_SCHEMA
from logitstore.reader import Store
from logitstore.schema import CaptureSettings, CorpusInfo, StoreMeta, TeacherInfo, TokenizerInfo
from logitstore.writer import SegmentData, StoreWriter

TEMPERATURES = (1.0, 2.0, 0.5, 4.0)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """float64 logsumexp, the reference every stored lse is compared to."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis=axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def make_meta(
    *,
    num_segments: int,
    k: int = 16,
    temperatures: Sequence[float] = TEMPERATURES,
    logits_width: int = 1001,
    vocab_size: int | None = None,
    chunk_tokens: int = 64,
    codec: LogProbCodec | None = None,
    max_len: int = 256,
) -> StoreMeta:
    """A StoreMeta built by hand: no teacher, no tokenizer, only what the format needs."""
    codec = codec or LogProbCodec()
    return StoreMeta(
        producer="logitstore-tests",
        created_at="2024-01-01T00:00:00+00:00",
        teacher=TeacherInfo(name="synthetic", source="tests", weights_sha256="0" * 64, dtype="float64"),
        tokenizer=TokenizerInfo(
            name="synthetic",
            fingerprint="1" * 64,
            vocab_size=vocab_size or logits_width,
            logits_width=logits_width,
            bos_id=0,
            eos_id=1,
            pad_id=None,
        ),
        capture=CaptureSettings(
            k=k,
            temperatures=tuple(temperatures),
            max_len=max_len,
            packing="packed",
            logp_codec=codec.to_dict(),
            chunk_tokens=chunk_tokens,
        ),
        corpus=CorpusInfo(fingerprint="2" * 64, sources=("synthetic.txt",), documents=0, tokens=0, sequences=0),
        num_segments=num_segments,
    )


def make_pieces(seq_lengths: Sequence[int], doc_start: int) -> pa.Table:
    """Pieces of a segment: odd sequences hold the end of one document and the start of the next."""
    rows: dict[str, list] = {name: [] for name in PIECES_SCHEMA.names}
    doc = doc_start
    for s, length in enumerate(int(x) for x in seq_lengths):
        cuts = [0, length // 3, length] if s % 2 == 1 and length >= 3 else [0, length]
        for a, b in itertools.pairwise(cuts):
            rows["sequence"].append(s)
            rows["seq_token_offset"].append(a)
            rows["num_tokens"].append(b - a)
            rows["doc_id"].append(doc)
            rows["source"].append(f"synthetic.txt:{doc + 1}")
            rows["doc_token_offset"].append(7 * doc)
            rows["content_sha256"].append(hashlib.sha256(str(doc).encode()).hexdigest())
            doc += 1
    return pa.Table.from_pydict(rows, schema=PIECES_SCHEMA)


@dataclass(frozen=True)
class LogitSegment:
    """A segment and the float64 logits it was computed from."""

    data: SegmentData
    logits: np.ndarray  # float64 [n, V]


def logit_segment(
    rng: np.random.Generator,
    seq_lengths: Sequence[int],
    *,
    k: int = 16,
    width: int = 1001,
    temperatures: Sequence[float] = TEMPERATURES,
    doc_start: int = 0,
) -> LogitSegment:
    """Random logits → float64 log_softmax → top-k by descending log-prob; lse per T in float64."""
    seq_lengths = np.asarray(seq_lengths, dtype=np.int64)
    n = int(seq_lengths.sum())
    # Row scales from flat (tail mass near 1) to very peaked (top-1 near 1, tail mass tiny).
    scale = rng.uniform(0.5, 12.0, size=(n, 1))
    logits = rng.standard_normal((n, width)) * scale
    logp = logits - logsumexp(logits)[:, None]
    ids = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    topk_logp = np.take_along_axis(logp, ids, axis=1)
    lse = np.stack([logsumexp(logits / t) for t in temperatures], axis=1)
    data = SegmentData(
        input_ids=rng.integers(0, width, size=n).astype(np.int32),
        topk_ids=ids.astype(np.int32),
        topk_logp=topk_logp.astype(np.float32),
        lse=lse.astype(np.float32),
        seq_lengths=seq_lengths,
        pieces=make_pieces(seq_lengths, doc_start),
    )
    return LogitSegment(data, logits)


def fast_segment(
    seed: int,
    n: int,
    *,
    k: int = 32,
    width: int = 1001,
    temperatures: Sequence[float] = TEMPERATURES,
    seq_len: int = 512,
    padding: bool = False,
) -> SegmentData:
    """Deterministic valid soft labels without a [n, V] logits matrix (big segments, cheaply).

    Ids are distinct within a row; log-probs are sorted descending with a top-k mass below 1.
    With `padding`, some rows end in -1 ids with -inf log-probs.
    """
    rng = np.random.default_rng(seed)
    assert width > k
    # Distinct ids per row: a random start plus positive steps that sum to less than width.
    steps = rng.integers(1, max(2, width // k), size=(n, k))
    steps[:, 0] = rng.integers(0, width, size=n)
    ids = np.cumsum(steps, axis=1) % width
    # Log-probs: a sorted descending share of a random top-k mass.
    weights = np.sort(rng.exponential(size=(n, k)) ** 3, axis=1)[:, ::-1]
    mass = rng.uniform(0.3, 0.999, size=(n, 1))
    topk_logp = np.log(weights / weights.sum(axis=1, keepdims=True) * mass)
    lse = rng.normal(8.0, 2.0, size=(n, len(temperatures)))
    if padding:
        kept = rng.integers(1, k + 1, size=n)
        pad = np.arange(k)[None, :] >= kept[:, None]
        ids[pad] = -1
        topk_logp[pad] = -np.inf
    lengths = [seq_len] * (n // seq_len) + ([n % seq_len] if n % seq_len else [])
    return SegmentData(
        input_ids=rng.integers(0, width, size=n).astype(np.int32),
        topk_ids=ids.astype(np.int32),
        topk_logp=topk_logp.astype(np.float32),
        lse=lse.astype(np.float32),
        seq_lengths=np.asarray(lengths, dtype=np.int64),
        pieces=make_pieces(lengths, seed * 1000),
    )


def split_lengths(rng: np.random.Generator, n: int, lo: int, hi: int) -> list[int]:
    """Random sequence lengths in [lo, hi] that sum to exactly n."""
    out = []
    left = n
    while left > 0:
        length = min(left, int(rng.integers(lo, hi + 1)))
        out.append(length)
        left -= length
    return out


def write_store(path: Path | str, meta: StoreMeta, segments: Sequence[SegmentData], *, finalize: bool = False) -> str:
    """Create a store at `path` and commit `segments` as segments 0, 1, ... in order."""
    url = str(path)
    writer = StoreWriter.create(url, meta)
    for i, seg in enumerate(segments):
        writer.write_segment(i, seg)
    if finalize:
        writer.finalize()
    return url


def concat(segments: Sequence[SegmentData]) -> dict[str, np.ndarray]:
    """The segments' arrays joined along the token axis: what a reader must return."""
    return {
        name: np.concatenate([np.asarray(getattr(s, name)) for s in segments])
        for name in ("input_ids", "topk_ids", "topk_logp", "lse", "seq_lengths")
    }


def quantized(codec: LogProbCodec, logp: np.ndarray) -> np.ndarray:
    """What the store must give back for `logp`: the codec's exact decode of its top-k encode."""
    return codec.decode(codec.encode_topk(logp))


def assert_same_soft_labels(a: Store, b: Store, codec: LogProbCodec) -> None:
    """Two stores of the same tokens whose teachers computed them in a different order (packing,
    a split teacher): same tokens and ids; log-probs within one quantization step of each other
    (the fp32 values differ by rounding, so they may round to neighbouring codes); lse to 1e-5."""
    assert a.num_tokens == b.num_tokens
    x, y = a.read(0, a.num_tokens), b.read(0, b.num_tokens)
    np.testing.assert_array_equal(x.input_ids, y.input_ids)
    np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
    bound = codec.topk_error_bound(y.topk_logp) + 1e-5
    assert np.all(np.abs(x.topk_logp - y.topk_logp) <= 2 * bound)
    np.testing.assert_allclose(x.lse, y.lse, atol=1e-5, rtol=0)
