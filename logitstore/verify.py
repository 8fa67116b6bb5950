"""`verify`: read every chunk of every committed segment, check checksums and invariants,
and compute a content digest.

The digest is a sha256 over the decoded arrays in global token order (one stream per
array, then combined), so two stores with the same content have the same digest however
their tokens are split into segments. The files around the arrays are checked too: the
commit records against index.json, every segment's manifest against its sequences, and the
consolidated manifest.parquet against the sha256 in index.json and the segments' manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from logitstore import layout, storage
from logitstore.errors import LogitStoreError
from logitstore.reader import REBUILD_INDEX, Store, TokenBlock, open_store
from logitstore.schema import StoreMeta


@dataclass
class VerifyReport:
    url: str
    ok: bool = True
    tokens: int = 0
    sequences: int = 0
    segments_committed: int = 0
    segments_planned: int = 0
    complete: bool = False
    digest: str | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why; not errors

    @property
    def status(self) -> str:
        """`FAILED` (damage found), `INCOMPLETE` (intact, but not every planned segment is committed) or `ok`."""
        if not self.ok:
            return "FAILED"
        return "ok" if self.complete else "INCOMPLETE"

    def to_dict(self) -> dict:
        return {**self.__dict__, "status": self.status}


def verify(url: str, *, token: str | None = None, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Check a store end to end; never raises for a damaged store, reports instead.

    `token` is an API key for a store served by logitstore-server, as in `open_store`; a token
    for a store that is not served over http(s) raises LogitStoreError (a usage error, not damage).
    """
    report = VerifyReport(url=str(url))
    storage_options = storage.with_token(url, token, storage_options)
    try:
        store = open_store(url, storage_options=storage_options)
    except LogitStoreError as e:
        report.ok = False
        report.errors.append(str(e))
        return report
    report.tokens, report.sequences = store.num_tokens, store.num_sequences
    report.segments_committed, report.segments_planned = len(store.segments), store.meta.num_segments
    report.complete = store.complete

    names = ["input_ids", "topk_ids", "lse", "seq_lengths"]
    if store.meta.capture.logp_slots != 0:
        names.append("topk_logp")
    if store.meta.capture.mode == "sampled":
        names.append("counts")  # only then, so that other stores' digests do not change
    if store.meta.capture.generate is not None:
        names.append("samples")
    hashes = {name: hashlib.sha256() for name in names}
    try:
        lengths = store.sequence_lengths()
        hashes["seq_lengths"].update(lengths.astype(np.int64).tobytes())
        if np.any(lengths <= 0) or int(lengths.sum()) != store.num_tokens:
            report.errors.append(f"sequence lengths are not positive or do not sum to the {store.num_tokens} tokens")
    except LogitStoreError as e:
        report.errors.append(str(e))

    step = store.meta.capture.chunk_tokens
    for seg_start, seg_stop in store.segment_spans():
        # Read chunk by chunk so that a damaged chunk is located to its token range.
        for a in range(seg_start, seg_stop, step):
            b = min(a + step, seg_stop)
            try:
                block = store.read(a, b)
            except LogitStoreError as e:
                report.errors.append(str(e))
                continue
            report.errors.extend(_check_block(block, a, store.meta))
            if store.meta.capture.counts_only:
                block = _by_id(block, store.meta.capture.head)
            hashes["input_ids"].update(block.input_ids.astype(np.int32).tobytes())
            hashes["topk_ids"].update(block.topk_ids.astype(np.int32).tobytes())
            if block.topk_logp is not None:
                hashes["topk_logp"].update(block.topk_logp.astype(np.float32).tobytes())
            hashes["lse"].update(block.lse.astype(np.float32).tobytes())
            if block.counts is not None:
                hashes["counts"].update(block.counts.astype(np.uint8).tobytes())

    manifest_sha256 = _check_index(store, report)
    _check_manifests(store, manifest_sha256, report)
    if store.meta.capture.generate is not None:
        try:  # which prompt and sample each sequence is, how it ended and how likely: part of the content
            hashes["samples"].update(json.dumps(store.samples().to_pydict(), sort_keys=True).encode())
        except LogitStoreError as e:
            report.errors.append(str(e))

    report.ok = not report.errors
    if report.ok:
        combined = hashlib.sha256()
        for name in sorted(hashes):
            combined.update(f"{name}:{hashes[name].hexdigest()}\n".encode())
        report.digest = combined.hexdigest()
    return report


def _check_index(store: Store, report: VerifyReport) -> str | None:
    """index.json (finalized stores) against the commit records it copies; returns the sha256 of
    manifest.parquet it records. open_store already refused an index.json that does not parse."""
    raw = store.read_file(layout.INDEX_KEY)
    if raw is None:
        return None
    records, manifest_sha256 = layout.parse_index(raw)
    for record in records:
        key = layout.commit_key(record.segment)
        commit = store.read_file(key)
        try:
            found = "no commit record" if commit is None else layout.SegmentRecord.from_json(commit)
        except ValueError as e:
            found = f"a damaged commit record ({e})"
        if found != record:
            report.errors.append(f"{layout.INDEX_KEY} lists {record}, but {key} holds {found}: one of them is damaged")
    return manifest_sha256


def _check_manifests(store: Store, manifest_sha256: str | None, report: VerifyReport) -> None:
    """Every segment's manifest parses and tiles its sequences; once finalized, manifest.parquet
    has the sha256 index.json records and holds exactly the segments' pieces."""
    pieces: list[pa.Table] = []
    for i in range(len(store.segments)):
        try:
            pieces.append(store.segment_manifest(i))
        except LogitStoreError as e:
            report.errors.append(str(e))
    raw = store.read_file(layout.MANIFEST_KEY) if store.complete else None
    if raw is None:
        if store.complete:
            report.notes.append("not finalized (no manifest.parquet): readers use the segments' manifests; "
                                "`logitstore capture --resume` writes it")
        return
    damaged = f"{layout.MANIFEST_KEY} is damaged"
    if manifest_sha256 is None:
        report.notes.append(f"{layout.MANIFEST_KEY} has no sha256 in {layout.INDEX_KEY} (finalized before "
                            "logitstore recorded one, or by a finalize that did not finish): checked its contents only")
    elif layout.sha256_hex(raw) != manifest_sha256:
        report.errors.append(f"{damaged}: its sha256 is not the one {layout.INDEX_KEY} records. {REBUILD_INDEX}")
        return
    try:
        manifest = layout.read_parquet(raw, layout.MANIFEST_SCHEMA)
    except ValueError as e:
        report.errors.append(f"{damaged}: {e}. {REBUILD_INDEX}")
        return
    if len(pieces) < len(store.segments):
        return  # a segment's pieces are unreadable (reported above): nothing to compare with
    expected = pa.concat_tables(pieces) if pieces else layout.MANIFEST_SCHEMA.empty_table()
    if not manifest.equals(expected):
        differ = [n for n in expected.column_names if not manifest.column(n).equals(expected.column(n))]
        report.errors.append(f"{damaged}: it disagrees with the segments' manifests ({len(manifest)} vs "
                             f"{len(expected)} rows; columns {', '.join(differ)}). {REBUILD_INDEX}")


def _by_id(block: TokenBlock, head: int) -> TokenBlock:
    """A counts_only block with each token's drawn slots (those after its `head`) in ascending id
    order. Their stored order follows the segment's id table, so it depends on how the tokens
    were cut into work units; the (id, count) pairs do not, and the digest is over those."""
    ids = block.topk_ids
    order = layout.head_first_order(np.where(ids >= 0, ids, np.iinfo(np.int32).max), head)
    fields = {"topk_ids": block.topk_ids, "counts": block.counts, "topk_logp": block.topk_logp}
    return dataclasses.replace(block, **{name: np.take_along_axis(a, order, axis=1) for name, a in fields.items()
                                         if a is not None})


# Decoded log-probs may overshoot a total mass of 1 by the quantization error, no more.
MASS_TOLERANCE = 1e-2


def _check_block(block: TokenBlock, start: int, meta: StoreMeta) -> list[str]:
    """Invariants every decoded block satisfies; each failure names the array and token range."""
    where = f"tokens [{start}, {start + len(block)})"
    logits_width, draws, head = meta.tokenizer.logits_width, meta.capture.draws, meta.capture.head
    errors = []
    if block.input_ids.min(initial=0) < 0 or block.input_ids.max(initial=0) >= logits_width:
        errors.append(f"array 'input_ids', {where}: ids outside [0, {logits_width})")
    if block.topk_ids.min(initial=0) < -1 or block.topk_ids.max(initial=0) >= logits_width:
        errors.append(f"array 'topk_ids', {where}: ids outside [-1, {logits_width})")
    if block.topk_logp is not None:  # the head's alone in a counts_only store with a head (NaN after it)
        slots = meta.capture.logp_slots
        errors.extend(_check_logp(block.topk_ids[:, :slots], block.topk_logp[:, :slots], where))
    if not np.isfinite(block.lse).all():
        errors.append(f"array 'lse', {where}: non-finite log-normalizers")
    empty = block.topk_ids[:, 0] < 0  # tokens without soft labels: only outside a loss mask, and with lse 0
    if block.loss_mask is None and empty.any():
        errors.append(f"array 'row_len', {where}: tokens without a stored id in a store without a loss mask")
    if block.loss_mask is not None and np.any(block.lse[empty] != 0):
        errors.append(f"array 'lse', {where}: log-normalizers at positions without soft labels (they store 0)")
    if block.counts is not None:
        if np.any(block.counts[:, :head]) or np.any((block.counts[:, head:] == 0) != (block.topk_ids[:, head:] < 0)):
            errors.append(f"array 'counts', {where}: zero counts and padding or head ids do not coincide")
        if draws is not None and np.any(block.counts.sum(axis=1, dtype=np.int64) > draws):
            errors.append(f"array 'counts', {where}: more than draws={draws} draws for one token")
    return errors


def _check_logp(ids: np.ndarray, logp: np.ndarray, where: str) -> list[str]:
    errors = []
    if np.isnan(logp).any() or (logp > 0).any():
        errors.append(f"array 'topk_logp', {where}: log-probs that are NaN or positive")
    if np.any((ids < 0) != np.isneginf(logp)):
        errors.append(f"array 'topk_logp', {where}: padding ids and -inf log-probs do not coincide")
    mass = np.exp(logp, dtype=np.float64).sum(axis=1)
    if np.any(mass > 1 + MASS_TOLERANCE):
        errors.append(f"array 'topk_logp', {where}: top-k mass above 1 (max {mass.max():.4f})")
    return errors
