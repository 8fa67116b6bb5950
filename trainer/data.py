"""Streaming a store into training batches: `StoreDataset` and its resumable loader.

Blocks. A block is at most `seq_len` tokens of one sequence: sequence i of length n gives
ceil(n / seq_len) blocks, the last right-padded. A block never crosses a sequence boundary,
because the teacher's soft labels at a position were computed with context from its
sequence's start; for packed stores with `seq_len` dividing `max_len` nothing is padded.
Blocks tile the token axis in order.

Reading. A random read of one block costs about as much as a sequential read of 16 (each
read decodes whole inner chunks, and has a fixed cost), so the reader never reads single
blocks: blocks are grouped into *runs*, the blocks starting in one chunk-aligned stretch
of `run_tokens` tokens of a segment, and every read covers consecutive blocks.

Order. Epoch e lists every run once, in an order that is a pure function of (seed, e),
each run's blocks in token order; epochs follow one another into one infinite stream of
blocks. The stream is cut into *windows* of `lanes x per_lane` blocks, one lane per row
of the global batch (world_size x batch_size rows) and `per_lane = workers x read_blocks`.
Each lane is cut into one *part* per DataLoader worker, of `read_blocks` consecutive
blocks (about `read_tokens` tokens, read at once), shuffled by (seed, window, lane, part).
Row i of rank r's local batch b is lane r*B + i's block at that batch's slot: rows come
from distinct, randomly placed stretches of the corpus, and a worker reads only its own
parts, sequentially. So every block is dealt once per epoch over all ranks and workers,
every rank gets the same number of batches (DDP never waits on a rank that ran dry), and
two ranks with batch B see exactly what one process with batch 2B would see (same workers).
The stream depends on the number of workers (which parts each reads), not on timing.

Resume. The position is one number, the rank's local batches delivered to the trainer;
`StoreLoader.load_state_dict` makes a fresh loader with the same settings deliver the next one.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitstore.capture.corpus import document_positions
from logitstore.codecs import LogProbCodec
from logitstore.errors import LogitStoreError
from logitstore.reader import Store, TokenBlock, open_store
from logitstore.schema import StoreMeta

IGNORE_INDEX = -100
# Tokens a worker reads at once per lane: ~0.55M tokens/s at 16k vs ~0.15M at 1024 (k=64, one core).
DEFAULT_READ_TOKENS = 16384


def drop_non_token_ids(topk_ids: np.ndarray, topk_logp: np.ndarray | None, counts: np.ndarray | None,
                       vocab_size: int) -> None:
    """Turn stored ids >= `vocab_size` into padding, in place.

    A teacher's output layer may be wider than its tokenizer (padded to a multiple of 64 or
    128), and the capture ranks and samples every column. The columns past the vocabulary are
    not tokens and the student scores only the vocabulary, so their ids become padding: their
    mass joins the tail bucket, and in a sampled store their draws are dropped (like draws
    past the k cap).
    """
    non_token = topk_ids >= vocab_size
    if non_token.any():
        topk_ids[non_token] = -1
        if topk_logp is not None:
            topk_logp[non_token] = -np.inf
        if counts is not None:
            counts[non_token] = 0


def best_of_n(store: Store) -> np.ndarray:
    """The sequences of a generated store that keep, per prompt, the sample with the highest
    teacher log-likelihood per completion token (the lower sample index on a tie), in sequence
    order. Per token: the summed log-likelihood would favour the shortest samples (an end token
    sampled first would win every prompt)."""
    if store.meta.capture.generate is None:
        raise LogitStoreError(f"--select best-of-n: {store.url} is not a generated store (logitstore generate)")
    samples = store.samples()
    prompt, sample, logprob, tokens, seq = (samples.column(n).to_numpy() for n in (
        "prompt", "sample", "teacher_logprob", "completion_tokens", "sequence"))  # fmt: skip
    order = np.lexsort((sample, -logprob / tokens, prompt))  # by prompt, then likeliest per token first
    first = np.ones(len(order), dtype=bool)
    first[1:] = prompt[order][1:] != prompt[order][:-1]
    return np.sort(seq[order][first])


def store_document_starts(store: Store) -> np.ndarray | None:
    """Global token offsets where a run of one document starts (the manifest's `token_start`) in a
    packed-documents store; None for the other packings, whose blocks need no position ids."""
    if store.meta.capture.packing != "packed-documents":
        return None
    return store.manifest().column("token_start").to_numpy()


class StoreDataset(IterableDataset):
    """Collated training batches from a store, forever (epoch after epoch).

    A batch is a dict of CPU tensors: `input_ids` int32 [B, L], `labels` int64 [B, L] (the
    next token in the same sequence, -100 where there is none), `topk_ids` int32 [B, L, K]
    (-1: padding), `topk_logp` [B, L, K] log p at T=1 (bfloat16 when the store's codec is
    exactly representable in it, which the default codec is; else float32), `lse` float32
    [B, L, n_T], `mask` bool [B, L] (real tokens), and `counts` uint8 [B, L, K] for
    sampled-mode stores. A counts_only store's batches have no `topk_logp` (with a head: NaN
    after the head, see logitstore.reader.TokenBlock). In a store with
    chat rows `mask` holds only the positions with soft labels (its loss mask: those predicting
    an assistant token, by default), and every other position's label is -100 too: neither the
    KD nor the CE part of any loss sees them, while the student still reads them as context.

    A packed-documents store's batches also have `position_ids` int32 [B, L]: each token's
    position inside its document (from the block's start at the latest), restarting where the
    teacher's attention restarted, and from 0 again over the padding. Given to the student
    without an attention mask they make its attention block-diagonal exactly like the
    teacher's; no label crosses a document boundary (-100 at a document's last token).

    `read_tokens` trades memory for speed: each worker holds B parts of about that many
    tokens decoded, ~6K + 13 + 4 n_T bytes a token (B=64, K=64, 16384: ~0.4 GB, plus a
    float32 copy of the log-probs while reading). The stream depends on it, like on
    `seq_len`, `batch_size` and the number of workers.
    """

    def __init__(
        self,
        url: str,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        token: str | None = None,
        storage_options: dict[str, Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        allow_incomplete: bool = False,
        read_tokens: int = DEFAULT_READ_TOKENS,
        sequences: np.ndarray | None = None,
    ) -> None:
        if seq_len < 1 or batch_size < 1 or read_tokens < 1:
            raise LogitStoreError(
                f"seq_len, batch_size and read_tokens must be >= 1, got {seq_len}, {batch_size} and {read_tokens}"
            )
        distributed = dist.is_available() and dist.is_initialized()
        self.url, self.seq_len, self.batch_size, self.seed = str(url), seq_len, batch_size, seed
        self.token, self.storage_options = token, storage_options
        self.rank = rank if rank is not None else dist.get_rank() if distributed else 0
        self.world_size = world_size if world_size is not None else dist.get_world_size() if distributed else 1
        if not 0 <= self.rank < self.world_size:
            raise LogitStoreError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.allow_incomplete = allow_incomplete
        self.sequences = sequences  # the store's sequences to train on (default all), e.g. `best_of_n`
        self.read_blocks = -(-read_tokens // seq_len)  # blocks per part
        self.start_batch = 0  # the rank's first local batch to deliver (set by StoreLoader on resume)
        self._store: Store | None = None
        self._blocks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._run_offsets: np.ndarray | None = None
        self._order: tuple[int, np.ndarray] | None = None  # the last epoch's order, reused across batches
        self._read_buffer: TokenBlock | None = None  # every store read decodes into it (copied out right after)
        self._document_starts: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the open store: each opens its own, lazily.
        return {**self.__dict__, "_store": None, "_blocks": None, "_run_offsets": None, "_order": None,
                "_read_buffer": None, "_document_starts": None}

    def _read(self, start: int, stop: int) -> TokenBlock:
        """`store.read` into one reused block (grown to the largest read so far): fresh multi-MB
        arrays on every read page-fault, which halved one-core decode speed (docs/benchmarks.md)."""
        if self._read_buffer is None or len(self._read_buffer) < stop - start:
            self._read_buffer = self.store.read(start, stop)
            return self._read_buffer
        return self.store.read(start, stop, out=self._read_buffer)

    @property
    def store(self) -> Store:
        if self._store is None:
            store = open_store(self.url, token=self.token, storage_options=self.storage_options)
            if not store.complete and not self.allow_incomplete:
                raise LogitStoreError(
                    f"{self.url} is not a finished store ({len(store.segments)} of {store.meta.num_segments} "
                    "segments committed): the capture is still running or was interrupted; resume it first"
                )
            if store.num_tokens == 0:
                raise LogitStoreError(f"{self.url} holds no tokens")
            self._store = store
        return self._store

    @property
    def meta(self) -> StoreMeta:
        return self.store.meta

    @property
    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start, stop, sequence end) of every block, as global token positions, in token order."""
        if self._blocks is None:
            lengths = self.store.sequence_lengths()
            seq_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            per_seq = -(-lengths // self.seq_len)
            seq_of_block = np.repeat(np.arange(len(lengths)), per_seq)
            first_block = np.concatenate([[0], np.cumsum(per_seq)[:-1]])
            within = np.arange(len(seq_of_block)) - first_block[seq_of_block]
            start = seq_start[seq_of_block] + within * self.seq_len
            seq_end = seq_start[seq_of_block] + lengths[seq_of_block]
            kept = slice(None) if self.sequences is None else np.isin(seq_of_block, self.sequences)
            self._blocks = (start[kept], np.minimum(start + self.seq_len, seq_end)[kept], seq_end[kept])
        return self._blocks

    @property
    def document_starts(self) -> np.ndarray | None:
        """`store_document_starts` of this store, read once."""
        if self._document_starts is None:
            self._document_starts = store_document_starts(self.store)
        return self._document_starts

    @property
    def blocks_per_epoch(self) -> int:
        return len(self.blocks[0])

    @property
    def run_tokens(self) -> int:
        """Tokens per run: whole inner chunks, at least a part's worth (so a part is one or two reads)."""
        chunk = self.meta.capture.chunk_tokens
        return chunk * -(-(self.read_blocks * self.seq_len) // chunk)

    @property
    def run_offsets(self) -> np.ndarray:
        """Block index where each run starts, then the number of blocks: runs are [off[j], off[j + 1])."""
        if self._run_offsets is None:
            starts = self.blocks[0]
            seg_starts = np.array([a for a, _ in self.store.segment_spans()], dtype=np.int64)
            seg = np.searchsorted(seg_starts, starts, side="right") - 1
            # Runs never span segments: each segment's chunks start at its first token.
            key = np.stack([seg, (starts - seg_starts[seg]) // self.run_tokens])
            new = np.any(key[:, 1:] != key[:, :-1], axis=0)
            self._run_offsets = np.concatenate([[0], np.flatnonzero(new) + 1, [len(starts)]])
        return self._run_offsets

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s permutation of block indices: runs shuffled by (seed, epoch), blocks in order."""
        if self._order is None or self._order[0] != epoch:
            off = self.run_offsets
            runs = np.random.default_rng([self.seed, epoch]).permutation(len(off) - 1)
            sizes = np.diff(off)[runs]
            first = np.cumsum(sizes) - sizes  # position of each shuffled run in the order
            order = np.arange(int(sizes.sum())) + np.repeat(off[runs] - first, sizes)
            self._order = (epoch, order)
        return self._order[1]

    def stream(self, start: int, stop: int) -> np.ndarray:
        """Block indices at positions [start, stop) of the infinite stream (epoch after epoch)."""
        n = self.blocks_per_epoch
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, n)
            take = min(stop - pos, n - offset)
            out[pos - start : pos - start + take] = self.epoch_order(epoch)[offset : offset + take]
            pos += take
        return out

    def part_blocks(self, batch: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
        """The parts local batch `batch` draws from, and the slot it takes of each.

        Returns (blocks [B, read_blocks] in stream order, slot [B]): row i of the batch is
        `blocks[i, slot[i]]`. The same parts serve the batches `batch + j * workers` of the window.
        """
        per_lane = workers * self.read_blocks
        window, pos = divmod(batch, per_lane)
        part, step = pos % workers, pos // workers
        lanes = self.rank * self.batch_size + np.arange(self.batch_size)
        first = (window * self.world_size * self.batch_size + lanes) * per_lane + part * self.read_blocks
        blocks = np.stack([self.stream(int(a), int(a) + self.read_blocks) for a in first])
        slot = [np.random.default_rng([self.seed, window, int(lane), part]).permutation(self.read_blocks)[step]
                for lane in lanes]
        return blocks, np.array(slot)

    def local_batch_blocks(self, batch: int, workers: int = 1) -> np.ndarray:
        """Block index of every row of the rank's local batch `batch` (with `workers` DataLoader workers)."""
        blocks, slot = self.part_blocks(batch, workers)
        return blocks[np.arange(len(slot)), slot]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        held: tuple[np.ndarray, dict[str, np.ndarray]] | None = None  # this worker's current parts, decoded
        batch = self.start_batch + worker
        while True:
            blocks, slot = self.part_blocks(batch, workers)
            if held is None or not np.array_equal(held[0], blocks):
                held = (blocks, self.read_parts(blocks))
            # NumPy gathers: torch's index_select is ~100x slower here when its threads contend for cores.
            rows = np.arange(len(slot)) * self.read_blocks + slot
            out = {name: torch.from_numpy(parts[rows]) for name, parts in held[1].items()}
            if "topk_logp" in out and self.logp_dtype == torch.bfloat16:
                out["topk_logp"] = out["topk_logp"].view(torch.bfloat16)
            yield out
            batch += workers

    def read_parts(self, parts: np.ndarray) -> dict[str, np.ndarray]:
        """Read and decode the blocks `parts` [P, R] into batch fields shaped [P * R, L, ...].

        `topk_logp` holds bfloat16 bit patterns (uint16) when `logp_dtype` is bfloat16.
        """
        meta = self.store.meta
        p, r, l, k, n_t = *parts.shape, self.seq_len, meta.capture.k, len(meta.capture.temperatures)
        pad = next((i for i in (meta.tokenizer.pad_id, meta.tokenizer.eos_id) if i is not None), 0)
        input_ids = np.full((p, r, l), pad, dtype=np.int32)
        labels = np.full((p, r, l), IGNORE_INDEX, dtype=np.int64)
        topk_ids = np.full((p, r, l, k), -1, dtype=np.int32)
        has_logp = meta.capture.logp_slots != 0
        topk_logp = np.full((p, r, l, k), -np.inf, dtype=np.float32) if has_logp else None
        lse = np.zeros((p, r, l, n_t), dtype=np.float32)
        mask = np.zeros((p, r, l), dtype=bool)
        counts = None
        document_starts = self.document_starts
        position_ids = np.zeros((p, r, l), dtype=np.int32) if document_starts is not None else None
        starts, stops, seq_ends = self.blocks
        for i in range(p):
            row = parts[i]
            # Consecutive blocks of a part are mostly consecutive in tokens: one read per stretch.
            cuts = np.flatnonzero(starts[row[1:]] != stops[row[:-1]]) + 1
            for group in np.split(np.arange(r), cuts):
                first, last = row[group[0]], row[group[-1]]
                a = int(starts[first])
                # One token past the stretch, when its sequence has it: the last position's label.
                data = self._read(a, min(int(stops[last]) + 1, int(seq_ends[last])))
                data_counts = getattr(data, "counts", None)
                for j in group:
                    s, z, end = (int(x[row[j]]) - a for x in (starts, stops, seq_ends))
                    n, nxt = z - s, min(z + 1, end) - s - 1  # real tokens, tokens with a label
                    input_ids[i, j, :n] = data.input_ids[s:z]
                    labels[i, j, :nxt] = data.input_ids[s + 1 : s + 1 + nxt]
                    topk_ids[i, j, :n] = data.topk_ids[s:z]
                    if has_logp:
                        topk_logp[i, j, :n] = data.topk_logp[s:z]
                    lse[i, j, :n] = data.lse[s:z]
                    mask[i, j, :n] = True
                    if data.loss_mask is not None:  # chat rows: only the positions with soft labels train
                        mask[i, j, :n] = data.loss_mask[s:z]
                        labels[i, j, :nxt][~data.loss_mask[s : s + nxt]] = IGNORE_INDEX
                    if position_ids is not None:
                        # Positions one token past the labels: a next token at position 0 opens a
                        # new document, whose first token the teacher never predicted.
                        g = a + s
                        pos = document_positions(document_starts, g, g + max(n, nxt + 1))
                        position_ids[i, j, :n] = pos[:n]
                        position_ids[i, j, n:] = np.arange(l - n)
                        labels[i, j, :nxt][pos[1 : nxt + 1] == 0] = IGNORE_INDEX
                    if data_counts is not None:
                        if counts is None:
                            counts = np.zeros((p, r, l, k), dtype=np.uint8)
                        counts[i, j, :n] = data_counts[s:z]
        drop_non_token_ids(topk_ids, topk_logp, counts, meta.tokenizer.vocab_size)
        out = {"input_ids": input_ids, "labels": labels, "topk_ids": topk_ids, "lse": lse, "mask": mask}
        if topk_logp is not None:
            if self.logp_dtype == torch.bfloat16:
                # Exact: every value is a float32 whose low 16 bits are zero (see logp_dtype).
                topk_logp = (topk_logp.view(np.uint32) >> 16).astype(np.uint16)
            out["topk_logp"] = topk_logp
        if counts is not None:
            out["counts"] = counts
        if position_ids is not None:
            out["position_ids"] = position_ids
        return {name: a.reshape(p * r, *a.shape[2:]) for name, a in out.items()}

    @property
    def logp_dtype(self) -> torch.dtype:
        """bfloat16 when every decoded log-prob is exactly a bfloat16 (half the bytes to move), else float32.

        The codec's values are float32s rounded to `mantissa_bits` bits of mantissa; bfloat16
        has 7 and float32's exponent range, so up to 7 bits it holds them exactly.
        """
        codec = LogProbCodec.from_dict(self.meta.capture.logp_codec)
        return torch.bfloat16 if codec.mantissa_bits <= 7 else torch.float32


class StoreLoader:
    """A DataLoader over a `StoreDataset` that knows where it is: `state_dict` / `load_state_dict`."""

    def __init__(self, dataset: StoreDataset, *, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.delivered = 0  # local batches handed to the trainer, counted from batch 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.dataset.start_batch = self.delivered
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=False, worker_init_fn=_ignore_sigint)
        for batch in loader:
            self.delivered += 1
            yield batch

    def _settings(self) -> dict[str, Any]:
        d = self.dataset
        return {"seed": d.seed, "seq_len": d.seq_len, "batch_size": d.batch_size, "rank": d.rank,
                "world_size": d.world_size, "read_blocks": d.read_blocks, "workers": max(self.num_workers, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.delivered, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        changed = {k: (state.get(k), v) for k, v in self._settings().items() if state.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise LogitStoreError(f"cannot resume the data stream exactly: {what}; resume with the same settings")
        self.delivered = int(state["batches"])


def _ignore_sigint(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the workers too; the trainer finishes its step and checkpoints,
    so they must keep serving it rather than exit on KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: StoreDataset, *, num_workers: int = 0, pin_memory: bool = False) -> StoreLoader:
    """The resumable loader the trainer iterates."""
    return StoreLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
