"""Writing a store: create it, commit segments crash-safely, collect garbage, finalize.

The one rule that makes a store survive a writer killed at any instant: a segment's
arrays and manifest are written and fsync'd first, and only then is its commit record
created, atomically and create-only. Readers look at commit records only, so a
half-written segment is invisible; `collect_garbage` deletes it and its work unit is
simply done again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from logitstore import layout, storage
from logitstore.codecs import LogProbCodec, build_id_table
from logitstore.errors import LogitStoreError, MetadataError, StoreExistsError
from logitstore.reader import Store, commit_records
from logitstore.schema import FORMAT_VERSION, StoreMeta, meta_differences

log = logging.getLogger(__name__)

def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SegmentData:
    """One work unit's soft labels, as the capture produced them (before encoding)."""

    input_ids: np.ndarray  # int32 [n]
    topk_ids: np.ndarray  # int [n, K], -1 = padding
    topk_logp: np.ndarray  # float32 [n, K], log p at T=1 over the full vocabulary
    lse: np.ndarray  # float32 [n, n_T]
    seq_lengths: np.ndarray  # int [m], sums to n
    pieces: pa.Table  # layout.PIECES_SCHEMA, `sequence` local to the segment
    counts: np.ndarray | None = None  # uint8 [n, K], sampled mode only: draws per id, 0 at padding
    samples: pa.Table | None = None  # layout.SAMPLES_SCHEMA, generated stores only

    def validate(self, meta: StoreMeta) -> None:
        n, k = self.topk_ids.shape
        n_t = len(meta.capture.temperatures)
        if self.input_ids.shape != (n,) or self.topk_logp.shape != (n, k) or self.lse.shape != (n, n_t):
            raise ValueError(
                f"segment arrays disagree: input_ids {self.input_ids.shape}, topk_ids {self.topk_ids.shape}, "
                f"topk_logp {self.topk_logp.shape}, lse {self.lse.shape} (expected n_T={n_t})"
            )
        if k != meta.capture.k:
            raise ValueError(f"segment has K={k}, the store was created with k={meta.capture.k}")
        if n == 0 or int(np.sum(self.seq_lengths)) != n or np.any(self.seq_lengths <= 0):
            raise ValueError(f"sequence lengths must be positive and sum to the {n} tokens of the segment")
        if np.any(self.topk_ids >= meta.tokenizer.logits_width) or np.any(self.topk_ids < -1):
            raise ValueError(f"topk_ids outside [-1, logits_width={meta.tokenizer.logits_width})")
        padding = self.topk_ids < 0
        # Only stored slots are written (docs/format.md): padding must end each row, come with
        # -inf, and leave every token at least its top id, or reading would not give it back.
        if np.any(padding[:, :-1] & ~padding[:, 1:]):
            raise ValueError("padding ids (-1) must come after every stored id of their row")
        if np.any(padding != np.isneginf(self.topk_logp)):
            raise ValueError("topk_logp must be -inf exactly at padding ids (-1)")
        if meta.capture.train_on is None and np.any(padding[:, 0]):
            # Only a store with a loss mask (chat rows, generations) has positions without soft labels.
            raise ValueError("every token needs at least one stored id (its row starts with padding)")
        if (self.samples is not None) != (meta.capture.generate is not None):
            raise ValueError("samples are stored in generated stores only, and every one of them has its own")
        if self.samples is not None:
            layout.check_samples(self.samples, np.concatenate([[0], np.cumsum(self.seq_lengths)]))
        if (self.counts is not None) != (meta.capture.mode == "sampled"):
            raise ValueError(f"counts are stored in sampled mode only (this store's mode is {meta.capture.mode!r})")
        if self.counts is not None:
            head = meta.capture.head
            drawn = self.topk_ids[:, head:] >= 0
            if (self.counts.shape != (n, k) or np.any(self.counts[:, :head])
                    or np.any((self.counts[:, head:] > 0) != drawn)):
                raise ValueError("counts must be [n, K], zero in the head and at padding ids, positive at drawn ids")
            if np.any(self.counts.sum(axis=1, dtype=np.int64) > meta.capture.draws):
                raise ValueError(f"counts of a token sum to more than draws={meta.capture.draws}")


def check_target(store: Any, url: str, *, resume: bool) -> None:
    """`url` must hold a store exactly when resuming one."""
    exists = storage.key_exists(store, "zarr.json")
    if exists and not resume:
        raise StoreExistsError(f"{url} already holds a store; pick a new --out, or pass --resume to continue it")
    if resume and not exists:
        raise MetadataError(f"{url} holds no store to resume; run the capture without --resume")


class StoreWriter:
    """Creates a store and commits its segments. One process may own several segments;
    a segment is owned by exactly one writer."""

    def __init__(self, store: zarr.abc.store.Store, meta: StoreMeta, url: str) -> None:
        if meta.format_version != FORMAT_VERSION:
            raise ValueError(f"this logitstore writes store format {FORMAT_VERSION}, not {meta.format_version}")
        self._store = store
        self.meta = meta
        self.url = url
        self._codec = LogProbCodec.from_dict(meta.capture.logp_codec)

    @classmethod
    def create(cls, url: str, meta: StoreMeta, *, storage_options: dict[str, Any] | None = None) -> StoreWriter:
        """Create a new, empty store at `url`; refuses to touch an existing one."""
        store = storage.open_kv(url, read_only=False, storage_options=storage_options)
        check_target(store, url, resume=False)
        zarr.create_group(store, attributes=meta.to_attrs(), zarr_format=3)
        return cls(store, meta, url)

    @classmethod
    def resume(cls, url: str, meta: StoreMeta, *, storage_options: dict[str, Any] | None = None) -> StoreWriter:
        """Reopen the store at `url` to continue the same capture; refuses a different one."""
        store = storage.open_kv(url, read_only=False, storage_options=storage_options)
        check_target(store, url, resume=True)
        group = zarr.open_group(store, mode="r")
        existing = StoreMeta.from_attrs(dict(group.attrs), url)
        if existing.format_version != FORMAT_VERSION:
            raise LogitStoreError(
                f"{url} is in store format {existing.format_version}, and this logitstore writes format "
                f"{FORMAT_VERSION}: finish it with the logitstore version that started it, or re-capture"
            )
        diffs = meta_differences(existing, meta)
        if diffs:
            raise LogitStoreError(
                f"{url} was captured with different settings, refusing to mix them: " + "; ".join(diffs)
            )
        return cls(store, existing, url)

    def committed(self) -> set[int]:
        """Segments whose commit record exists."""
        return {i for i in range(self.meta.num_segments) if storage.key_exists(self._store, layout.commit_key(i))}

    def collect_garbage(self) -> list[int]:
        """Delete every segment directory that has no commit record; returns their ids.

        When a planned segment is uncommitted, the finalized index and manifest (if any) are
        stale too: they are removed so that readers fall back to the commit records."""
        committed = self.committed()
        if len(committed) < self.meta.num_segments:
            storage.delete_key(self._store, layout.INDEX_KEY)
            storage.delete_key(self._store, layout.MANIFEST_KEY)
        removed = []
        for name in storage.list_dir(self._store, "segments"):
            if name.isdigit() and int(name) not in committed:
                storage.delete_prefix(self._store, f"segments/{name}")
                removed.append(int(name))
        if removed:
            log.info("removed %d uncommitted segment(s): %s", len(removed), removed)
        return sorted(removed)

    def write_segment(self, segment: int, data: SegmentData) -> layout.SegmentRecord:
        """Encode, write, fsync and commit one segment."""
        if not 0 <= segment < self.meta.num_segments:
            raise ValueError(f"segment {segment} outside the planned 0..{self.meta.num_segments - 1}")
        data.validate(self.meta)
        if storage.key_exists(self._store, layout.commit_key(segment)):
            raise StoreExistsError(f"segment {segment} of {self.url} is already committed")
        prefix = layout.segment_prefix(segment)
        storage.delete_prefix(self._store, prefix)  # leftovers of a killed attempt

        ids = np.asarray(data.topk_ids)
        stored = ids >= 0  # each row's stored slots come first, then padding (validated)
        k = ids.shape[1]
        table, indices = build_id_table(ids[stored])
        counts = None if data.counts is None else np.asarray(data.counts, dtype=np.uint8)
        capture = self.meta.capture
        if capture.counts_only:
            indices, counts = _ascending_slots(indices, counts, stored, capture.head)
        offsets = np.zeros(len(data.seq_lengths) + 1, dtype=np.int64)
        np.cumsum(data.seq_lengths, out=offsets[1:])
        arrays = {
            "input_ids": np.asarray(data.input_ids, dtype=np.int32),
            "row_len": stored.sum(axis=1).astype(np.uint8 if k <= np.iinfo(np.uint8).max else np.uint16),
            "topk_ids": indices,
            "id_table": table,
            "lse": np.asarray(data.lse, dtype=np.float32),
            "seq_offsets": offsets,
        }
        if capture.logp_slots != 0:  # every stored slot's log-prob, or the head's alone
            with_logp = stored if capture.logp_slots is None else stored & (np.arange(k) < capture.logp_slots)
            arrays["topk_logp"] = self._codec.encode_topk(data.topk_logp)[with_logp]
        if counts is not None:
            arrays[layout.COUNTS_ARRAY] = counts[stored]
        chunk = capture.chunk_tokens
        for name in layout.segment_arrays(capture, self.meta.format_version):
            rows_per_chunk = chunk * k if name in layout.SLOT_ARRAYS else chunk
            layout.write_array(self._store, f"{prefix}/{name}", arrays[name], rows_per_chunk)
        storage.write_key(self._store, layout.segment_manifest_key(segment), layout.parquet_bytes(data.pieces))
        if data.samples is not None:
            storage.write_key(self._store, layout.segment_samples_key(segment), layout.parquet_bytes(data.samples))
        storage.fsync_tree(self._store, prefix)

        record = layout.SegmentRecord(segment=segment, tokens=int(offsets[-1]), sequences=len(data.seq_lengths))
        if not storage.create_key(self._store, layout.commit_key(segment), record.to_json()):
            raise StoreExistsError(f"segment {segment} of {self.url} was committed by another writer")
        return record

    def finalize(self) -> None:
        """Once every segment is committed: write the consolidated manifest.parquet, then index.json
        with the manifest's sha256, so a reader opens the store in two reads instead of one per segment.

        Both are built from the commit records and the segments' manifests, never from an earlier
        index.json or manifest.parquet, so that finalizing again (`capture --resume`) repairs them."""
        store = Store(self._store, self.meta, commit_records(self._store, self.meta, self.url), self.url)
        if not store.complete:
            missing = min(set(range(self.meta.num_segments)) - {r.segment for r in store.segments})
            raise LogitStoreError(f"cannot finalize {self.url}: segment {missing} is not committed yet")
        manifest = layout.parquet_bytes(store.manifest_from_segments())
        # A finalize killed between the two writes must not leave an index.json holding the
        # sha256 of an earlier manifest.parquet; without index.json readers use the commit records.
        storage.delete_key(self._store, layout.INDEX_KEY)
        storage.write_key(self._store, layout.MANIFEST_KEY, manifest)
        index = {"segments": [asdict(r) for r in store.segments], "finalized_at": now_iso(),
                 layout.MANIFEST_SHA256_KEY: layout.sha256_hex(manifest)}
        storage.write_key(self._store, layout.INDEX_KEY, layout.dumps_json(index))


def _ascending_slots(indices: np.ndarray, counts: np.ndarray, stored: np.ndarray,
                     head: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A counts_only segment's drawn slots in ascending id-table index per token, after its `head`
    slots (kept in rank order): (the stored slots' indices, counts [n, K] in the same order).
    Without log-probs the draws' rank order carries nothing the trainer uses, and ascending
    indices are 24.2 instead of 30.3 B/token of pcodec output for `topk_ids` (SmolLM2, M=50;
    docs/capture.md)."""
    grid = np.full(stored.shape, np.iinfo(np.int64).max)  # padding sorts last, so `stored` still selects the slots
    grid[stored] = indices
    order = layout.head_first_order(grid, head)
    return np.take_along_axis(grid, order, axis=1)[stored].astype(indices.dtype), np.take_along_axis(counts, order, 1)
