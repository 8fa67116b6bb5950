"""StoreDataset / StoreLoader against the store read directly (the independent reference)."""

from __future__ import annotations

import shutil
from itertools import islice

import numpy as np
import pytest
import torch

from logitstore import open_store
from logitstore.errors import LogitStoreError
from trainer.data import StoreDataset, make_loader


def check_batch_against_store(batch: dict, store, dataset: StoreDataset, block_ids: np.ndarray) -> int:
    """Every row equals Store.read of its token range; returns the real tokens seen."""
    starts, stops, ends = (a[block_ids] for a in dataset.blocks)
    for row, (a, z, end) in enumerate(zip(starts.tolist(), stops.tolist(), ends.tolist(), strict=True)):
        n = z - a
        ref = store.read(a, z)
        assert batch["mask"][row].sum() == n and batch["mask"][row, :n].all()
        np.testing.assert_array_equal(batch["input_ids"][row, :n].numpy(), ref.input_ids)
        np.testing.assert_array_equal(batch["topk_ids"][row, :n].numpy(), ref.topk_ids)
        np.testing.assert_array_equal(batch["topk_logp"][row, :n].float().numpy(), ref.topk_logp)  # bf16 exact
        np.testing.assert_array_equal(batch["lse"][row, :n].numpy(), ref.lse)
        nxt = store.read(a + 1, min(z + 1, end)).input_ids
        np.testing.assert_array_equal(batch["labels"][row, : len(nxt)].numpy(), nxt)
        assert (batch["labels"][row, len(nxt) :] == -100).all()
        assert (batch["topk_ids"][row, n:] == -1).all()
    return int(batch["mask"].sum())


@pytest.mark.parametrize("packing", ["packed", "document"])
def test_batches_equal_the_store_and_blocks_stay_inside_sequences(tiny_store_factory, packing):
    url = tiny_store_factory(packing=packing, max_tokens=1500)
    store = open_store(url)
    ds = StoreDataset(url, seq_len=24, batch_size=5, seed=3)
    starts, stops, ends = ds.blocks
    # Blocks tile every sequence exactly: ceil(n / L) blocks per sequence, none crossing a boundary.
    assert (stops <= ends).all() and (stops - starts <= 24).all()
    assert np.sum(stops - starts) == store.num_tokens
    assert ds.blocks_per_epoch == int(np.sum(-(-store.sequence_lengths() // 24)))
    for g, batch in enumerate(islice(iter(ds), 6)):
        assert batch["topk_logp"].dtype == torch.bfloat16 and batch["input_ids"].dtype == torch.int32
        check_batch_against_store(batch, store, ds, ds.global_batch_blocks(g))


def test_one_epoch_over_ranks_and_workers_covers_every_token_once(tiny_store):
    store = open_store(tiny_store)
    world, batch_size = 2, 3
    seen = np.zeros(store.num_tokens, dtype=np.int64)
    for rank in range(world):
        ds = StoreDataset(tiny_store, seq_len=32, batch_size=batch_size, seed=1, rank=rank, world_size=world)
        per_rank = ds.blocks_per_epoch // (world * batch_size)  # whole global batches inside epoch 0
        for local, batch in enumerate(islice(make_loader(ds, num_workers=2), per_rank)):
            blocks = ds.global_batch_blocks(local * world + rank)
            check_batch_against_store(batch, store, ds, blocks)  # delivered = dealt
            for blk in blocks:
                seen[ds.blocks[0][blk] : ds.blocks[1][blk]] += 1
    assert seen.max() == 1  # no token twice within the epoch
    covered = per_rank * world * batch_size
    assert seen.sum() == np.sum((ds.blocks[1] - ds.blocks[0])[ds.epoch_order(0)[:covered]])
    # Epoch 0's leftover blocks open the next global batches: none is skipped.
    leftover = ds.epoch_order(0)[covered:]
    following = np.concatenate([ds.global_batch_blocks(per_rank * world + i) for i in range(world)])
    assert np.array_equal(following[: len(leftover)], leftover)


def test_workers_deliver_the_same_stream_and_orders_depend_on_seed_and_epoch(tiny_store):
    def rows(num_workers: int, seed: int = 0, n: int = 6) -> list[torch.Tensor]:
        ds = StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=seed)
        return [b["input_ids"] for b in islice(make_loader(ds, num_workers=num_workers), n)]

    zero, two = rows(0), rows(2)
    assert all(torch.equal(a, b) for a, b in zip(zero, two, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(zero, rows(0, seed=1), strict=True))
    ds = StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=0)
    assert not np.array_equal(ds.epoch_order(0), ds.epoch_order(1))
    assert sorted(ds.epoch_order(1).tolist()) == list(range(ds.blocks_per_epoch))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_next_batch(tiny_store, num_workers):
    ds = StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=0)
    full = [b["input_ids"] for b in islice(make_loader(ds, num_workers=num_workers), 9)]
    first = make_loader(StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=0), num_workers=num_workers)
    list(islice(iter(first), 5))
    state = first.state_dict()
    resumed = make_loader(StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=0), num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in islice(iter(resumed), 4)]
    assert all(torch.equal(a, b) for a, b in zip(full[5:], rest, strict=True))
    other = make_loader(StoreDataset(tiny_store, seq_len=16, batch_size=4, seed=0))
    with pytest.raises(LogitStoreError, match="seq_len 32 -> 16"):
        other.load_state_dict(state)


def test_bad_arguments_and_unfinished_stores_are_refused(tiny_store, tmp_path):
    with pytest.raises(LogitStoreError, match="seq_len and batch_size"):
        StoreDataset(tiny_store, seq_len=0, batch_size=2)
    with pytest.raises(LogitStoreError, match="no such directory"):
        _ = StoreDataset(str(tmp_path / "nope"), seq_len=8, batch_size=2).meta
    partial = tmp_path / "partial"
    shutil.copytree(tiny_store, partial)
    (partial / "index.json").unlink()
    (partial / "commits" / "000002.json").unlink()
    with pytest.raises(LogitStoreError, match="not a finished store"):
        _ = StoreDataset(str(partial), seq_len=8, batch_size=2).meta
    ds = StoreDataset(str(partial), seq_len=8, batch_size=2, allow_incomplete=True)
    assert ds.blocks_per_epoch > 0


def test_s3_store_streams_like_the_local_one(tiny_store, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("stores")
    fs.put(tiny_store, "stores/tiny", recursive=True)
    remote = StoreDataset("s3://stores/tiny", seq_len=32, batch_size=4, seed=0, storage_options=s3_server)
    local = StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=0)
    assert remote.meta == local.meta
    for a, b in zip(islice(iter(remote), 3), islice(iter(local), 3), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
