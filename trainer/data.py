"""Streaming a store into training batches: `StoreDataset` and its resumable loader.

Blocks. A block is at most `seq_len` tokens of one sequence: sequence i of length n gives
ceil(n / seq_len) blocks, the last right-padded. A block never crosses a sequence boundary,
because the teacher's soft labels at a position were computed with context from its
sequence's start; for packed stores with `seq_len` dividing `max_len` nothing is padded.

Order. Epoch e is a permutation of all blocks, a pure function of (seed, e); epochs follow
one another into one infinite stream of blocks. The stream is cut into global batches of
`batch_size` blocks, and global batch g goes to rank g % world_size. On each rank, the
DataLoader's worker w builds the rank's local batches w, w + W, ... and the DataLoader
delivers them in order. So every block is seen once per epoch over all ranks and workers,
every rank gets the same number of batches (DDP never waits on a rank that ran dry), and
two ranks with batch B see exactly what one process with batch 2B would see.

Resume. The position is one number, the rank's local batches delivered to the trainer;
`StoreLoader.load_state_dict` makes a fresh loader deliver the next one, whatever the
number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from logitstore.codecs import LogProbCodec
from logitstore.errors import LogitStoreError
from logitstore.reader import Store, open_store
from logitstore.schema import StoreMeta

IGNORE_INDEX = -100


class StoreDataset(IterableDataset):
    """Collated training batches from a store, forever (epoch after epoch).

    A batch is a dict of CPU tensors: `input_ids` int32 [B, L], `labels` int64 [B, L] (the
    next token in the same sequence, -100 where there is none), `topk_ids` int32 [B, L, K]
    (-1: padding), `topk_logp` [B, L, K] log p at T=1 (bfloat16 when the store's codec is
    exactly representable in it, which the default codec is; else float32), `lse` float32
    [B, L, n_T], `mask` bool [B, L] (real tokens), and `counts` uint8 [B, L, K] for
    sampled-mode stores.
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
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise LogitStoreError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        distributed = dist.is_available() and dist.is_initialized()
        self.url, self.seq_len, self.batch_size, self.seed = str(url), seq_len, batch_size, seed
        self.token, self.storage_options = token, storage_options
        self.rank = rank if rank is not None else dist.get_rank() if distributed else 0
        self.world_size = world_size if world_size is not None else dist.get_world_size() if distributed else 1
        self.allow_incomplete = allow_incomplete
        self.start_batch = 0  # the rank's first local batch to deliver (set by StoreLoader on resume)
        self._store: Store | None = None
        self._blocks: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the open store: each opens its own, lazily.
        return {**self.__dict__, "_store": None, "_blocks": None}

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
        """(start, stop, sequence end) of every block, as global token positions."""
        if self._blocks is None:
            lengths = self.store.sequence_lengths()
            seq_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            per_seq = -(-lengths // self.seq_len)
            seq_of_block = np.repeat(np.arange(len(lengths)), per_seq)
            first_block = np.concatenate([[0], np.cumsum(per_seq)[:-1]])
            within = np.arange(len(seq_of_block)) - first_block[seq_of_block]
            start = seq_start[seq_of_block] + within * self.seq_len
            seq_end = seq_start[seq_of_block] + lengths[seq_of_block]
            self._blocks = (start, np.minimum(start + self.seq_len, seq_end), seq_end)
        return self._blocks

    @property
    def blocks_per_epoch(self) -> int:
        return len(self.blocks[0])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of block indices of `epoch`: a function of (seed, epoch) only."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.blocks_per_epoch)

    def global_batch_blocks(self, g: int) -> np.ndarray:
        """Block indices of global batch g: stream items [g B, (g + 1) B)."""
        n = self.blocks_per_epoch
        items = np.arange(g * self.batch_size, (g + 1) * self.batch_size)
        out = np.empty(len(items), dtype=np.int64)
        for epoch in np.unique(items // n):
            sel = items // n == epoch
            out[sel] = self.epoch_order(int(epoch))[items[sel] % n]
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        local = self.start_batch + worker
        while True:
            yield self.batch(self.global_batch_blocks(local * self.world_size + self.rank))
            local += workers

    def batch(self, block_ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Read and collate the given blocks."""
        store, meta = self.store, self.store.meta
        starts, stops, seq_ends = (a[block_ids] for a in self.blocks)
        b, l, k, n_t = len(block_ids), self.seq_len, meta.capture.k, len(meta.capture.temperatures)
        pad = next((i for i in (meta.tokenizer.pad_id, meta.tokenizer.eos_id) if i is not None), 0)
        input_ids = np.full((b, l), pad, dtype=np.int32)
        labels = np.full((b, l), IGNORE_INDEX, dtype=np.int64)
        topk_ids = np.full((b, l, k), -1, dtype=np.int32)
        topk_logp = np.full((b, l, k), -np.inf, dtype=np.float32)
        lse = np.zeros((b, l, n_t), dtype=np.float32)
        mask = np.zeros((b, l), dtype=bool)
        counts = None
        for row, (a, z, end) in enumerate(zip(starts.tolist(), stops.tolist(), seq_ends.tolist(), strict=True)):
            n = z - a
            # One token past the block, when the sequence has it: the last position's label.
            block = store.read(a, min(z + 1, end))
            input_ids[row, :n] = block.input_ids[:n]
            labels[row, : len(block) - 1] = block.input_ids[1:]
            topk_ids[row, :n] = block.topk_ids[:n]
            topk_logp[row, :n] = block.topk_logp[:n]
            lse[row, :n] = block.lse[:n]
            mask[row, :n] = True
            block_counts = getattr(block, "counts", None)
            if block_counts is not None:
                if counts is None:
                    counts = np.zeros((b, l, k), dtype=np.uint8)
                counts[row, :n] = block_counts[:n]
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "topk_ids": torch.from_numpy(topk_ids),
            "topk_logp": torch.from_numpy(topk_logp).to(self.logp_dtype),
            "lse": torch.from_numpy(lse),
            "mask": torch.from_numpy(mask),
        }
        if counts is not None:
            out["counts"] = torch.from_numpy(counts)
        return out

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
                            persistent_workers=False)
        for batch in loader:
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {"batches": self.delivered, "seed": d.seed, "seq_len": d.seq_len, "batch_size": d.batch_size,
                "rank": d.rank, "world_size": d.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        d = self.dataset
        mine = {"seed": d.seed, "seq_len": d.seq_len, "batch_size": d.batch_size, "rank": d.rank,
                "world_size": d.world_size}
        changed = {k: (state[k], v) for k, v in mine.items() if state.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise LogitStoreError(f"cannot resume the data stream exactly: {what}; resume with the same settings")
        self.delivered = int(state["batches"])


def make_loader(dataset: StoreDataset, *, num_workers: int = 0, pin_memory: bool = False) -> StoreLoader:
    """The resumable loader the trainer iterates."""
    return StoreLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)

