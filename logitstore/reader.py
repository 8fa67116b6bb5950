"""Reading a store: `open_store(url)` → `Store`, token ranges → `TokenBlock`.

Only committed segments are visible. Token and sequence positions are global over the
committed segments in segment order; for a finished capture that is the whole corpus.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from logitstore import layout, shards, storage
from logitstore.codecs import LogProbCodec
from logitstore.errors import CorruptDataError, LogitStoreError, NotAStoreError, TemperatureNotCapturedError
from logitstore.schema import StoreMeta
from logitstore.shards import Scratch, ShardArray, ShardFormatError


@dataclass(frozen=True)
class TokenBlock:
    """The soft labels of a run of tokens, decoded.

    `topk_ids` and `topk_logp` are in the teacher's rank order (descending log-prob);
    padding slots (adaptive/sampled captures) have id -1 and log-prob -inf. A counts_only
    store (sampled, T=1) has no log-probs (`topk_logp` None), and a token's slots are in the
    order of its segment's id table, not in rank order; with a head, its first `head` slots
    are the head in rank order with their log-probs, and the drawn slots after them have
    log-prob NaN (not stored). A store with chat rows or generations keeps
    soft labels only at the positions of its loss mask (`loss_mask`); elsewhere a token has padding
    only.
    """

    input_ids: np.ndarray  # int32 [n]
    topk_ids: np.ndarray  # int32 [n, K]
    topk_logp: np.ndarray | None  # float32 [n, K], log p at T=1 over the full vocabulary; counts_only: above
    lse: np.ndarray  # float32 [n, n_T], log-normalizer at each captured T (docs/format.md)
    counts: np.ndarray | None = None  # uint8 [n, K], sampled captures only: draws per id (0 at padding)
    loss_mask: np.ndarray | None = None  # bool [n], stores with chat rows only: the positions with soft labels

    def __len__(self) -> int:
        return len(self.input_ids)


class _Segment:
    """A committed segment's arrays; their metadata and shard indexes are read on first use."""

    def __init__(self, store: zarr.abc.store.Store, record: layout.SegmentRecord, token_start: int, seq_start: int,
                 names: tuple[str, ...], logp_slots: int | None):  # fmt: skip
        self.record = record
        self.names = names
        self.logp_slots = logp_slots  # CaptureSettings.logp_slots
        self.token_start = token_start
        self.seq_start = seq_start
        self._store = store
        self._shards: dict[str, tuple[ShardArray, np.ndarray] | CorruptDataError] | None = None
        self._id_table: np.ndarray | None = None
        self._seq_offsets: np.ndarray | None = None
        self._slot_offsets: np.ndarray | None = None
        self._logp_offsets: np.ndarray | None = None

    @property
    def prefix(self) -> str:
        return layout.segment_prefix(self.record.segment)

    def shard(self, name: str) -> tuple[ShardArray, np.ndarray]:
        """An array's layout and shard index. On first use every array's metadata is read and
        all shard indexes are fetched in one round trip; a committed segment's shards never
        change (commits are create-only), so they are not read again. A damaged array is
        reported when it is used, so the others stay readable."""
        if self._shards is None:
            arrays: dict[str, ShardArray | CorruptDataError] = {}
            for name_ in self.names:
                path = f"{self.prefix}/{name_}"
                try:
                    arrays[name_] = ShardArray.from_array(layout.open_array(self._store, path), path)
                except Exception as e:  # missing zarr.json, unreadable or foreign metadata
                    arrays[name_] = self.corrupt(name_, 0, self.record.tokens, f"cannot open the array: {e}")
            readable = {n: a for n, a in arrays.items() if isinstance(a, ShardArray)}
            raws = shards.fetch(self._store, [(a.key, a.index_request()) for a in readable.values()])
            for (name_, array), raw in zip(readable.items(), raws, strict=True):
                try:
                    arrays[name_] = (array, array.parse_index(raw))
                except ShardFormatError as e:  # a missing shard must be an error, never zeros
                    arrays[name_] = self.corrupt(name_, 0, self.record.tokens, str(e))
            self._shards = arrays
        found = self._shards[name]
        if isinstance(found, CorruptDataError):
            raise CorruptDataError(str(found))
        return found

    def rows(self, name: str) -> int:
        return self.shard(name)[0].shape[0]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one array (segment-local positions)."""
        return self.read_many([(name, start, stop)])[0]

    def read_many(self, requests: list[tuple[str, int, int]], scratch: Scratch | None = None) -> list[np.ndarray]:
        """Rows [start, stop) of each (array, start, stop): one byte-range request per array,
        all in one round trip.

        With `scratch`, they are decoded into this thread's reused buffers: valid only until
        the thread's next read.
        """
        arrays = [self.shard(name) for name, _, _ in requests]
        out: list[np.ndarray | None] = [None] * len(requests)
        todo = []
        for i, ((array, index), (_, start, stop)) in enumerate(zip(arrays, requests, strict=True)):
            if start >= stop:
                out[i] = np.empty((0, *array.shape[1:]), array.dtype)
            else:
                todo.append((i, array, index, array.span(index, start, stop)))
        raws = shards.fetch(self._store, [(array.key, request) for _, array, _, (_, _, request) in todo])
        for (i, array, index, (c0, c1, request)), raw in zip(todo, raws, strict=True):
            name, start, stop = requests[i]
            try:
                out[i] = array.decode(index, c0, c1, raw, request.start, start, stop, scratch)
            except ShardFormatError as e:  # missing or truncated shard, checksum mismatch, decode failure
                raise self.corrupt(name, start, stop, str(e)) from None
        return out

    def slot_offsets(self) -> np.ndarray | None:
        """int64 [n + 1]: where each token's stored slots start in the slot arrays (None in
        format 1, whose slot arrays are [n, K])."""
        if self._slot_offsets is None and "row_len" in self.names:
            row_len = self.read("row_len", 0, self.record.tokens)
            offsets = np.zeros(len(row_len) + 1, dtype=np.int64)
            np.cumsum(row_len, out=offsets[1:])
            if offsets[-1] != self.rows("topk_ids"):
                raise self.corrupt("row_len", 0, self.record.tokens,
                                   f"{offsets[-1]} stored slots, but 'topk_ids' has {self.rows('topk_ids')}")
            self._slot_offsets = offsets
        return self._slot_offsets

    def logp_offsets(self) -> np.ndarray:
        """int64 [n + 1]: in a counts_only store with a head, where each token's log-probs (those of
        its first min(head, row_len) slots) start in `topk_logp`."""
        if self._logp_offsets is None:
            row_len = np.diff(self.slot_offsets())
            offsets = np.zeros(len(row_len) + 1, dtype=np.int64)
            np.cumsum(np.minimum(row_len, self.logp_slots), out=offsets[1:])
            if offsets[-1] != self.rows("topk_logp"):
                raise self.corrupt("row_len", 0, self.record.tokens,
                                   f"{offsets[-1]} head slots, but 'topk_logp' has {self.rows('topk_logp')}")
            self._logp_offsets = offsets
        return self._logp_offsets

    def id_table(self) -> np.ndarray:
        if self._id_table is None:
            self._id_table = self.read("id_table", 0, self.rows("id_table"))
        return self._id_table

    def seq_offsets(self) -> np.ndarray:
        if self._seq_offsets is None:
            self._seq_offsets = self.read("seq_offsets", 0, self.record.sequences + 1)
        return self._seq_offsets

    def corrupt(self, name: str, start: int, stop: int, why: str) -> CorruptDataError:
        offsets = self._logp_offsets if name == "topk_logp" and self.logp_slots is not None else self._slot_offsets
        if name in layout.SLOT_ARRAYS and offsets is not None:  # slots back to their tokens
            start = int(np.searchsorted(offsets, start, side="right")) - 1
            stop = int(np.searchsorted(offsets, stop, side="left"))
        a, b = self.token_start + start, self.token_start + stop
        kind = "file" if name in (layout.MANIFEST_KEY, layout.SAMPLES_KEY) else "array"
        where = f"{kind} '{name}' of segment {self.record.segment}"
        if name not in ("id_table", "seq_offsets"):
            where += f", tokens [{a}, {b})"
        return CorruptDataError(
            f"{where}: {why}. The store is damaged: run `logitstore verify` to list every damaged range, "
            f"and re-capture the work unit (capture --resume after deleting commits/{self.record.segment:06d}.json)"
        )


class Store:
    """A read-only view of a store. Use `open_store(url)`."""

    def __init__(self, store: zarr.abc.store.Store, meta: StoreMeta, records: list[layout.SegmentRecord], url: str,
                 storage_options: dict[str, Any] | None = None):
        self.url = url
        self.meta = meta
        self._store = store
        self._storage_options = storage_options
        self._codec = LogProbCodec.from_dict(meta.capture.logp_codec)
        self._scratch = Scratch()
        self._segments: list[_Segment] = []
        token_start = seq_start = 0
        names = layout.segment_arrays(meta.capture, meta.format_version)
        for record in records:
            self._segments.append(_Segment(store, record, token_start, seq_start, names, meta.capture.logp_slots))
            token_start += record.tokens
            seq_start += record.sequences
        self._token_starts = np.array([s.token_start for s in self._segments] + [token_start], dtype=np.int64)
        self._seq_starts = np.array([s.seq_start for s in self._segments] + [seq_start], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self._token_starts[-1])

    @property
    def num_sequences(self) -> int:
        return int(self._seq_starts[-1])

    @property
    def temperatures(self) -> tuple[float, ...]:
        return self.meta.capture.temperatures

    @property
    def complete(self) -> bool:
        """True when every planned work unit is committed."""
        return len(self._segments) == self.meta.num_segments

    @property
    def segments(self) -> list[layout.SegmentRecord]:
        return [s.record for s in self._segments]

    def segment_spans(self) -> list[tuple[int, int]]:
        """Global token range [start, stop) of every committed segment, in order."""
        return [(s.token_start, s.token_start + s.record.tokens) for s in self._segments]

    def read(self, start: int, stop: int, out: TokenBlock | None = None) -> TokenBlock:
        """Tokens [start, stop) in global order, decoded.

        `out`, a block of at least `stop - start` tokens from an earlier read of this store,
        is overwritten instead of allocating new arrays (the result is views of its arrays):
        a loop that reuses its block reads ~1.5x faster on one core, because fresh multi-MB
        arrays are page-faulted in on every read.
        """
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside the store's [0, {self.num_tokens})")
        block = self._allocate(stop - start) if out is None else self._views(out, stop - start)
        pos = 0
        first = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        for seg in self._segments[max(first, 0):]:
            if seg.token_start >= stop:
                break
            a = max(start, seg.token_start) - seg.token_start
            b = min(stop, seg.token_start + seg.record.tokens) - seg.token_start
            self._read_segment(seg, a, b, block, pos)
            pos += b - a
        return block

    def sequence(self, i: int) -> TokenBlock:
        """The i-th sequence (a packed context the teacher saw as one forward pass)."""
        start, stop = self.sequence_span(i)
        return self.read(start, stop)

    def sequence_span(self, i: int) -> tuple[int, int]:
        """Global token range [start, stop) of the i-th sequence."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} outside the store's [0, {self.num_sequences})")
        seg = self._segments[int(np.searchsorted(self._seq_starts, i, side="right")) - 1]
        offsets = seg.seq_offsets()
        j = i - seg.seq_start
        return seg.token_start + int(offsets[j]), seg.token_start + int(offsets[j + 1])

    def sequence_lengths(self) -> np.ndarray:
        """int64 [num_sequences]: the length of every sequence, in order."""
        parts = [np.diff(seg.seq_offsets()) for seg in self._segments]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def teacher_logprobs(self, block: TokenBlock, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """The teacher at `temperature` on the K+1 buckets: (topk_logp_T [n, K], tail_logp_T [n]).

        With z_i = log p_i + lse(1), log p_T(i) = z_i / T − lse(T) exactly, and the tail
        p_T(tail) = 1 − Σ_S p_T(i). The tail is -inf where the top-k holds all the mass.
        """
        if self.meta.capture.counts_only:
            raise LogitStoreError(f"{self.url} is a counts_only sampled store: it keeps draw counts, not the teacher's "
                                  "log-probs; train on it with the sampled estimator (trainer.losses.targets)")
        col = self.temperature_index(temperature)
        one = self.temperature_index(1.0)
        logp_t = (block.topk_logp + block.lse[:, one, None]) / np.float32(temperature) - block.lse[:, col, None]
        with np.errstate(divide="ignore"):
            covered = np.exp(logp_t, dtype=np.float64).sum(axis=1)
            tail = np.log1p(-np.minimum(covered, 1.0)).astype(np.float32)
        return logp_t.astype(np.float32, copy=False), tail

    def temperature_index(self, temperature: float) -> int:
        for i, t in enumerate(self.temperatures):
            if abs(t - temperature) <= 1e-6 * max(1.0, t):
                return i
        raise TemperatureNotCapturedError(
            f"temperature {temperature:g} was not captured in {self.url}; captured temperatures: "
            f"{', '.join(f'{t:g}' for t in self.temperatures)}. Train at one of those, or re-capture with "
            f"--temperatures including {temperature:g}"
        )

    def manifest(self) -> pa.Table:
        """One row per run of one document inside one sequence, with global sequence and token_start:
        the consolidated manifest.parquet once finalized, else built from the segments' manifests."""
        raw = self.read_file(layout.MANIFEST_KEY) if self.complete else None
        if raw is None:
            return self.manifest_from_segments()
        try:
            return layout.read_parquet(raw, layout.MANIFEST_SCHEMA)
        except ValueError as e:
            raise CorruptDataError(f"{self.url}: {layout.MANIFEST_KEY} is damaged: {e}. {REBUILD_INDEX}") from None

    def manifest_from_segments(self) -> pa.Table:
        """What the consolidated manifest holds, built from every committed segment's manifest."""
        tables = [self.segment_manifest(i) for i in range(len(self._segments))]
        return pa.concat_tables(tables) if tables else layout.MANIFEST_SCHEMA.empty_table()

    def segment_manifest(self, i: int) -> pa.Table:
        """The document pieces of the i-th committed segment (in `segments` order), with global
        sequence and token_start. CorruptDataError when its manifest is missing, damaged, or does
        not tile the segment's sequences."""
        seg = self._segments[i]
        pieces = self._segment_table(seg, layout.MANIFEST_KEY, layout.PIECES_SCHEMA, layout.check_pieces)
        return layout.globalize_pieces(pieces, seg.seq_start, seg.token_start, seg.seq_offsets())

    def samples(self) -> pa.Table:
        """A generated store's samples (layout.SAMPLES_SCHEMA), one row per sequence with its global
        number: prompt, sample index, prompt and completion tokens, finish reason, the teacher's
        log-likelihood of the completion. CorruptDataError when a segment's are missing or damaged."""
        if self.meta.capture.generate is None:
            raise LogitStoreError(f"{self.url} is not a generated store: it has no samples")
        tables = []
        for seg in self._segments:
            table = self._segment_table(seg, layout.SAMPLES_KEY, layout.SAMPLES_SCHEMA, layout.check_samples)
            global_seq = pa.array(table.column("sequence").to_numpy() + seg.seq_start, pa.int64())
            tables.append(table.set_column(0, "sequence", global_seq))
        return pa.concat_tables(tables) if tables else layout.SAMPLES_SCHEMA.empty_table()

    def _segment_table(self, seg: _Segment, name: str, schema: pa.Schema,
                       check: Callable[[pa.Table, np.ndarray], None]) -> pa.Table:  # fmt: skip
        """A segment's Parquet file `name` (segment-local sequences), checked against its sequences
        by `check`; CorruptDataError when it is missing, damaged or does not fit them."""
        raw = self.read_file(f"{seg.prefix}/{name}")
        try:
            if raw is None:
                raise ValueError("it is missing")
            table = layout.read_parquet(raw, schema)
            check(table, seg.seq_offsets())
        except ValueError as e:
            raise seg.corrupt(name, 0, seg.record.tokens, str(e)) from None
        return table

    def read_file(self, key: str) -> bytes | None:
        """The bytes of one file of the store (e.g. `index.json`), None when it does not exist."""
        return storage.read_key(self._store, key)

    def describe(self) -> dict:
        """What `logitstore info --json` prints: the metadata plus sizes (`disk_bytes` where the
        store can be listed)."""
        out = {
            "url": self.url,
            "tokens": self.num_tokens,
            "sequences": self.num_sequences,
            "segments_committed": len(self.segments),
            "segments_planned": self.meta.num_segments,
            "complete": self.complete,
            "meta": self.meta.model_dump(mode="json"),
        }
        disk = storage.tree_bytes(self.url, self._storage_options)
        if disk is not None:
            out["disk_bytes"] = disk
            out["bytes_per_token"] = disk / self.num_tokens if self.num_tokens else None
        return out

    def _read_segment(self, seg: _Segment, a: int, b: int, block: TokenBlock, pos: int) -> None:
        """Decode the segment's tokens [a, b) into `block` from row `pos` on."""
        k = self.meta.capture.k
        offsets = seg.slot_offsets()
        s0, s1 = (a, b) if offsets is None else (int(offsets[a]), int(offsets[b]))
        has_logp, has_counts = block.topk_logp is not None, block.counts is not None
        slot_names = ["topk_ids"] + [layout.COUNTS_ARRAY] * has_counts
        requests = [("input_ids", a, b), ("lse", a, b), *((name, s0, s1) for name in slot_names)]
        if has_logp:  # a counts_only store with a head stores the head's log-probs alone
            l0, l1 = (s0, s1) if seg.logp_slots is None else (int(x) for x in seg.logp_offsets()[[a, b]])
            requests.append(("topk_logp", l0, l1))
        input_ids, lse, indices, *slots = seg.read_many(requests, self._scratch)
        counts = slots.pop(0) if has_counts else None
        codes = slots.pop(0) if has_logp else None
        rows = slice(pos, pos + b - a)
        block.input_ids[rows] = input_ids
        block.lse[rows] = lse
        table = seg.id_table()
        if indices.max(initial=0) >= len(table):  # so that the cheaper mode="clip" below never clips
            raise seg.corrupt("topk_ids", s0, s1, f"an index beyond the segment's {len(table)}-entry id table")
        row_len = None if offsets is None else np.diff(offsets[a : b + 1])  # format 1: every row full
        if row_len is not None and row_len.max(initial=0) > k:
            raise seg.corrupt("row_len", a, b, f"a token with more than K={k} stored slots")
        if block.loss_mask is not None:  # positions without soft labels store no slots
            block.loss_mask[rows] = row_len > 0
        if has_logp:
            self._place_logp(codes, row_len, seg.logp_slots, block.topk_logp[rows])
        if row_len is None or s1 - s0 == (b - a) * k:  # every row full: slots are [n, K] rows
            np.take(table, indices.reshape(b - a, k), out=block.topk_ids[rows], mode="clip")
            if has_counts:
                block.counts[rows] = counts.reshape(b - a, k)
            return
        # Rows with padding: stored slots go to the first row_len places of each row, in order.
        stored = np.arange(k) < row_len[:, None]
        ids = block.topk_ids[rows]
        ids.fill(-1)
        ids[stored] = table[indices]
        if has_counts:
            block.counts[rows] = 0
            block.counts[rows][stored] = counts

    def _place_logp(self, codes: np.ndarray, row_len: np.ndarray | None, head: int | None, out: np.ndarray) -> None:
        """Decoded log-probs into `out` [n, K], each row's stored slots first and -inf at its
        padding. A counts_only store with a head (`head` set) holds the first min(head, row_len)
        log-probs of each row alone: its drawn slots get NaN (not stored)."""
        n, k = out.shape
        if head is None and codes.size == n * k:  # every row full
            self._codec.decode(codes.reshape(n, k), out=out)
            return
        slot = np.arange(k)
        out.fill(-np.inf)
        if head is not None:
            out[slot < row_len[:, None]] = np.nan
            row_len = np.minimum(row_len, head)
        out[slot < row_len[:, None]] = self._codec.decode(codes)

    def _allocate(self, n: int) -> TokenBlock:
        k, n_t = self.meta.capture.k, len(self.temperatures)
        logp = None if self.meta.capture.logp_slots == 0 else np.empty((n, k), np.float32)
        counts = np.empty((n, k), np.uint8) if self.meta.capture.mode == "sampled" else None
        loss_mask = np.empty(n, bool) if self.meta.capture.train_on is not None else None
        return TokenBlock(np.empty(n, np.int32), np.empty((n, k), np.int32), logp, np.empty((n, n_t), np.float32),
                          counts=counts, loss_mask=loss_mask)

    def _views(self, out: TokenBlock, n: int) -> TokenBlock:
        """The first `n` rows of a caller's block, after checking that it fits this store's reads."""
        like = self._allocate(0)
        for name in ("input_ids", "topk_ids", "topk_logp", "lse", "counts", "loss_mask"):
            want, have = getattr(like, name), getattr(out, name)
            if want is None and have is None:
                continue
            if (want is None or have is None or have.dtype != want.dtype or have.shape[1:] != want.shape[1:]
                    or len(have) < n or not have.flags.c_contiguous):
                raise ValueError(f"out= must be a block of at least {n} tokens from a read of this store; its "
                                 f"'{name}' is {None if have is None else f'{have.dtype} {have.shape}'}")
        arrays = (out.input_ids, out.topk_ids, out.topk_logp, out.lse, out.counts, out.loss_mask)
        return TokenBlock(*(None if a is None else a[:n] for a in arrays))


def open_store(
    url: str, *, token: str | None = None, storage_options: dict[str, Any] | None = None
) -> Store:
    """Open a store for reading: a local path, or an fsspec URL (http(s)://, s3://, ...).

    `token` is an API key for the logitstore server (`http(s)://HOST/v1/stores/ID/zarr`),
    sent as `Authorization: Bearer TOKEN`. `storage_options` go to fsspec as they are
    (e.g. `{"endpoint_url": ...}` for an S3-compatible server).
    """
    url = str(url)
    served = url.startswith(("http://", "https://"))  # by logitstore-server (or any HTTP host)
    storage_options = storage.with_token(url, token, storage_options)
    if storage.is_local(url) and not storage.local_path(url).is_dir():
        raise NotAStoreError(f"{url}: no such directory; pass the directory that `logitstore capture --out` created")
    store = storage.open_kv(url, read_only=True, storage_options=storage_options)
    try:
        raw = storage.read_key(store, "zarr.json")
    except Exception as e:  # remote (aiohttp, s3fs) errors: the user needs the reason, not a traceback
        if storage.is_local(url):
            raise
        status = getattr(e, "status", None)
        if status in (401, 403) or isinstance(e, PermissionError):
            raise NotAStoreError(f"{url}: access refused ({status or e}); pass valid credentials "
                                 "(for a logitstore server: your team's API key, token= / --token)") from None
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        raise NotAStoreError(f"{url}: cannot read zarr.json: {reason}") from None
    if raw is None:
        hint = ("on a logitstore server: no such store, or not shared with your team" if served
                else "pass the directory that `logitstore capture --out` created")
        raise NotAStoreError(f"{url} is not a logitstore store: it has no zarr.json at its root ({hint})")
    try:
        attrs = json.loads(raw).get("attributes", {})
    except ValueError:
        raise NotAStoreError(f"{url} is not a logitstore store: its zarr.json is not valid JSON") from None
    meta = StoreMeta.from_attrs(attrs, url)
    return Store(store, meta, committed_records(store, meta, url), url, storage_options)


def describe(url: str, storage_options: dict[str, Any] | None = None, *, token: str | None = None) -> dict:
    """`Store.describe()` of the store at `url` (what `logitstore info --json` prints)."""
    return open_store(url, token=token, storage_options=storage_options).describe()


# index.json and manifest.parquet are derived from the commit records and segment manifests.
REBUILD_INDEX = ("Delete index.json and manifest.parquet (readers then use the commit records), or rewrite them "
                 "with `logitstore capture --resume` and the capture's arguments")


def committed_records(store: zarr.abc.store.Store, meta: StoreMeta, url: str) -> list[layout.SegmentRecord]:
    """The commit records of a store, in segment order (index.json once finalized)."""
    raw = storage.read_key(store, layout.INDEX_KEY)
    if raw is None:
        return commit_records(store, meta, url)
    try:
        records, _ = layout.parse_index(raw)
        if [r.segment for r in records] != list(range(meta.num_segments)):  # finalize() needs every segment
            raise ValueError(f"its segments are not the planned 0..{meta.num_segments - 1}")
    except ValueError as e:  # not JSON, not UTF-8, wrong keys or types
        raise CorruptDataError(f"{url}: {layout.INDEX_KEY} is damaged: {e}. {REBUILD_INDEX}") from None
    return records


def commit_records(store: zarr.abc.store.Store, meta: StoreMeta, url: str) -> list[layout.SegmentRecord]:
    """The records under commits/, probed one by one (never listed), in segment order."""
    records = []
    for i in range(meta.num_segments):
        raw = storage.read_key(store, layout.commit_key(i))
        if raw is None:
            continue
        try:
            record = layout.SegmentRecord.from_json(raw)
            if record.segment != i:
                raise ValueError(f"it names segment {record.segment}")
        except ValueError as e:
            raise CorruptDataError(
                f"{url}: commit record {layout.commit_key(i)} is damaged: {e}. Delete it and re-capture the work unit "
                "with `logitstore capture --resume`") from None
        records.append(record)
    return records
