"""StoreDataset / StoreLoader against the store read directly (the independent reference)."""

from __future__ import annotations

import dataclasses
import shutil
from itertools import islice, pairwise
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from logitstore import open_store
from logitstore.codecs import LogProbCodec
from logitstore.errors import LogitStoreError
from tests.logitstore.store_helpers import fast_segment, make_meta, write_store
from trainer.data import StoreDataset, make_loader
from trainer.evaluate import eval_store


def check_batch_against_store(batch: dict, store, dataset: StoreDataset, block_ids: np.ndarray) -> int:
    """Every row equals Store.read of its token range; returns the real tokens seen."""
    starts, stops, ends = (a[block_ids] for a in dataset.blocks)
    for row, (a, z, end) in enumerate(zip(starts.tolist(), stops.tolist(), ends.tolist(), strict=True)):
        n = z - a
        ref = store.read(a, z)
        assert batch["mask"][row].sum() == n and batch["mask"][row, :n].all()
        np.testing.assert_array_equal(batch["input_ids"][row, :n].numpy(), ref.input_ids)
        np.testing.assert_array_equal(batch["topk_ids"][row, :n].numpy(), ref.topk_ids)
        np.testing.assert_array_equal(batch["topk_logp"][row, :n].float().numpy(), ref.topk_logp)
        np.testing.assert_array_equal(batch["lse"][row, :n].numpy(), ref.lse)
        nxt = store.read(a + 1, min(z + 1, end)).input_ids
        np.testing.assert_array_equal(batch["labels"][row, : len(nxt)].numpy(), nxt)
        assert (batch["labels"][row, len(nxt) :] == -100).all()
        assert (batch["topk_ids"][row, n:] == -1).all() and (batch["topk_logp"][row, n:] == -torch.inf).all()
        assert (batch["input_ids"][row, n:] == store.meta.tokenizer.pad_id).all()
    return int(batch["mask"].sum())


def seen_tokens(batches, dataset: StoreDataset, workers: int, num_tokens: int, store) -> np.ndarray:
    """How often each token appears in the given local batches (checked against the store on the way)."""
    seen = np.zeros(num_tokens, dtype=np.int64)
    for b, batch in enumerate(batches):
        blocks = dataset.local_batch_blocks(b, workers)
        check_batch_against_store(batch, store, dataset, blocks)  # delivered = dealt
        for blk in blocks:
            seen[dataset.blocks[0][blk] : dataset.blocks[1][blk]] += 1
    return seen


@pytest.mark.parametrize("packing", ["packed", "document"])
def test_batches_equal_the_store_and_blocks_stay_inside_sequences(tiny_store_factory, packing):
    url = tiny_store_factory(packing=packing, max_tokens=1500, chunk_tokens=128)
    store = open_store(url)
    ds = StoreDataset(url, seq_len=24, batch_size=5, seed=3, read_tokens=48)
    starts, stops, ends = ds.blocks
    # Blocks tile every sequence exactly: ceil(n / L) blocks per sequence, none crossing a boundary.
    assert (stops <= ends).all() and (stops - starts <= 24).all() and (starts[1:] == stops[:-1]).all()
    assert np.sum(stops - starts) == store.num_tokens
    assert ds.blocks_per_epoch == int(np.sum(-(-store.sequence_lengths() // 24)))
    # Runs: consecutive blocks inside one chunk-aligned stretch of one segment; an epoch moves them whole.
    off, spans = ds.run_offsets, store.segment_spans()
    assert ds.run_tokens == 128
    for a, z in pairwise(off):
        seg = next(s for s in spans if s[0] <= starts[a] < s[1])
        assert starts[z - 1] < seg[1] and len({(starts[i] - seg[0]) // 128 for i in range(a, z)}) == 1
    order = ds.epoch_order(0)
    assert sorted(order.tolist()) == list(range(ds.blocks_per_epoch))
    position = np.argsort(order)
    for a, z in pairwise(off):  # runs are never split: each run's blocks in order, one after the other
        assert np.array_equal(position[a:z], position[a] + np.arange(z - a))
    for b, batch in enumerate(islice(iter(ds), 12)):
        assert batch["topk_logp"].dtype == torch.bfloat16 and batch["input_ids"].dtype == torch.int32
        assert batch["labels"].dtype == torch.int64 and batch["lse"].shape == (5, 24, 2)
        check_batch_against_store(batch, store, ds, ds.local_batch_blocks(b))


def test_packed_documents_batches_give_the_student_the_teachers_context(tiny_store_factory, peaked_teacher_dir):
    """Position ids restart at every document of the manifest (and over the padding), no label
    crosses a document, and a model run on a batch row sees each document alone: its logits there
    equal those of the document run by itself, as the teacher's were when captured."""
    from transformers import AutoModelForCausalLM

    url = tiny_store_factory(packing="packed-documents", max_tokens=1500, chunk_tokens=128)
    store = open_store(url)
    manifest = store.manifest()
    doc_start = manifest.column("token_start").to_numpy()
    doc_len = manifest.column("num_tokens").to_numpy()
    ref_pos = np.concatenate([np.arange(n) for n in doc_len])  # each token's position in its document
    model = AutoModelForCausalLM.from_pretrained(peaked_teacher_dir).eval()
    ds = StoreDataset(url, seq_len=64, batch_size=3, seed=2, read_tokens=64)  # seq_len = max_len: whole sequences
    checked_rows_with_two_documents = 0
    for b, batch in enumerate(islice(iter(ds), 4)):
        assert batch["position_ids"].dtype == torch.int32
        starts, stops, _ = (x[ds.local_batch_blocks(b)] for x in ds.blocks)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].long(), position_ids=batch["position_ids"].long(),
                           use_cache=False).logits  # fmt: skip
        for row, (a, z) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True)):
            n = z - a
            np.testing.assert_array_equal(batch["position_ids"][row, :n].numpy(), ref_pos[a:z])
            np.testing.assert_array_equal(batch["position_ids"][row, n:].numpy(), np.arange(64 - n))
            ids = store.read(a, z).input_ids
            inside = (ref_pos[a + 1 : z] != 0)  # the next token is in the same document
            np.testing.assert_array_equal(batch["labels"][row, : n - 1].numpy(), np.where(inside, ids[1:], -100))
            docs = [(s, e) for s, e in zip(doc_start, doc_start + doc_len, strict=True) if a <= s < z]
            checked_rows_with_two_documents += len(docs) > 1
            for s, e in docs:
                with torch.no_grad():
                    alone = model(input_ids=torch.from_numpy(ids[s - a : e - a].astype(np.int64))[None]).logits[0]
                torch.testing.assert_close(logits[row, s - a : e - a], alone, atol=1e-4, rtol=1e-4)
    assert checked_rows_with_two_documents >= 3


def test_blocks_longer_than_the_sequences_are_padded_sequences(tiny_store):
    store = open_store(tiny_store)
    ds = StoreDataset(tiny_store, seq_len=100, batch_size=4, read_tokens=200)
    assert ds.blocks_per_epoch == store.num_sequences
    for b, batch in enumerate(islice(iter(ds), 3)):
        assert batch["input_ids"].shape == (4, 100)
        check_batch_against_store(batch, store, ds, ds.local_batch_blocks(b))


def test_one_epoch_over_ranks_and_workers_covers_every_token_once(tiny_store):
    store = open_store(tiny_store)
    world, workers, batch_size = 2, 2, 3
    rank_ds = [StoreDataset(tiny_store, seq_len=32, batch_size=batch_size, seed=1, rank=r, world_size=world,
                            read_tokens=64) for r in range(world)]
    n = rank_ds[0].blocks_per_epoch
    per_window = world * batch_size * workers * rank_ds[0].read_blocks  # blocks dealt per window
    inside = n // per_window  # windows wholly inside epoch 0
    local = workers * rank_ds[0].read_blocks  # local batches per window and rank
    seen_first = np.zeros(store.num_tokens, dtype=np.int64)
    seen_more = np.zeros(store.num_tokens, dtype=np.int64)
    for ds in rank_ds:
        batches = list(islice(make_loader(ds, num_workers=workers), (inside + 1) * local))
        seen_first += seen_tokens(batches[: inside * local], ds, workers, store.num_tokens, store)
        seen_more += seen_tokens(batches, ds, workers, store.num_tokens, store)
    assert seen_first.max() == 1 and seen_first.sum() > 0  # inside the epoch, no token twice
    assert seen_more.min() >= 1  # one more window finishes the epoch: no block skipped
    block_len = rank_ds[0].blocks[1] - rank_ds[0].blocks[0]
    counts = np.add.reduceat(seen_more, rank_ds[0].blocks[0]) // block_len  # per block
    assert counts.max() <= 2 and counts.sum() == (inside + 1) * per_window


def test_two_ranks_see_what_one_process_with_twice_the_batch_sees(tiny_store):
    one = StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=0, read_tokens=96)
    ranks = [StoreDataset(tiny_store, seq_len=32, batch_size=2, seed=0, rank=r, world_size=2, read_tokens=96)
             for r in range(2)]
    for big, *small in islice(zip(iter(one), *map(iter, ranks), strict=False), 7):
        for name in big:
            assert torch.equal(big[name], torch.cat([s[name] for s in small]))


def test_orders_depend_on_seed_and_epoch_only(tiny_store):
    def rows(seed: int, n: int = 6) -> list[torch.Tensor]:
        ds = StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=seed)
        return [b["input_ids"] for b in islice(make_loader(ds, num_workers=0), n)]

    same, again, other = rows(0), rows(0), rows(1)
    assert all(torch.equal(a, b) for a, b in zip(same, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, other, strict=True))
    ds = StoreDataset(tiny_store, seq_len=32, batch_size=4, seed=0)
    assert not np.array_equal(ds.epoch_order(0), ds.epoch_order(1))
    assert sorted(ds.epoch_order(1).tolist()) == list(range(ds.blocks_per_epoch))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_next_batch(tiny_store, num_workers):
    def loader(seq_len: int = 32, workers: int = num_workers):
        return make_loader(StoreDataset(tiny_store, seq_len=seq_len, batch_size=4, seed=0, read_tokens=96),
                           num_workers=workers)

    full = list(islice(iter(loader()), 9))
    first = loader()
    list(islice(iter(first), 5))
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(islice(iter(resumed), 4))
    for a, b in zip(full[5:], rest, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LogitStoreError, match="seq_len 32 -> 16"):
        loader(seq_len=16).load_state_dict(state)
    with pytest.raises(LogitStoreError, match=f"workers {max(num_workers, 1)} -> 3"):
        loader(workers=3).load_state_dict(state)


def test_bad_arguments_and_unfinished_stores_are_refused(tiny_store, tmp_path):
    with pytest.raises(LogitStoreError, match="seq_len, batch_size and read_tokens must be >= 1"):
        StoreDataset(tiny_store, seq_len=0, batch_size=2)
    with pytest.raises(LogitStoreError, match="rank 2 is outside world_size 2"):
        StoreDataset(tiny_store, seq_len=8, batch_size=2, rank=2, world_size=2)
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


def test_every_code_of_the_default_codec_is_exact_in_bfloat16():
    codec = LogProbCodec()
    values = codec.decode(np.arange(codec.inf_code + 1, dtype=np.uint16))
    assert np.isneginf(values[-1]) and np.isfinite(values[:-1]).all()
    through = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(through, values)
    finer = LogProbCodec(mantissa_bits=8)
    values = finer.decode(np.arange(finer.inf_code, dtype=np.uint16))
    assert not np.array_equal(torch.from_numpy(values).to(torch.bfloat16).float().numpy(), values)


def test_a_finer_codec_is_delivered_in_float32(tiny_store_factory):
    url = tiny_store_factory(max_tokens=600, logp_codec=LogProbCodec(mantissa_bits=8))
    store = open_store(url)
    ds = StoreDataset(url, seq_len=64, batch_size=3)
    for b, batch in enumerate(islice(iter(ds), 3)):
        assert batch["topk_logp"].dtype == torch.float32
        check_batch_against_store(batch, store, ds, ds.local_batch_blocks(b))


@pytest.mark.slow  # 10-15 s on 2 shared cores: upload to moto, then reads over HTTP
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


def test_ids_past_the_vocabulary_become_padding_in_batches_and_evaluation(tmp_path):
    # A teacher whose output layer (1001 columns) is wider than its tokenizer (960 tokens).
    width, vocab, k, seq_len = 1001, 960, 16, 50
    segments = [fast_segment(seed, 300, k=k, width=width, seq_len=seq_len) for seed in (1, 2)]
    segments = [dataclasses.replace(s, input_ids=s.input_ids % vocab) for s in segments]  # inputs are tokens
    url = write_store(tmp_path / "s", make_meta(num_segments=2, k=k, logits_width=width, vocab_size=vocab),
                      segments, finalize=True)
    store = open_store(url)
    ds = StoreDataset(url, seq_len=seq_len, batch_size=4)
    dropped = 0
    for b, batch in enumerate(islice(iter(ds), 4)):
        starts, stops, _ = (a[ds.local_batch_blocks(b)] for a in ds.blocks)
        for row, (a, z) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True)):
            ref = store.read(a, z)
            past = ref.topk_ids >= vocab
            dropped += int(past.sum())
            np.testing.assert_array_equal(batch["topk_ids"][row, : z - a].numpy(), np.where(past, -1, ref.topk_ids))
            np.testing.assert_array_equal(batch["topk_logp"][row, : z - a].float().numpy(),
                                          np.where(past, -np.inf, ref.topk_logp))
    assert dropped > 0  # the store does hold such ids

    class Logits(torch.nn.Module):  # a "student" that scores the whole width
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.nn.Embedding(width, width)

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.table(input_ids.long()))

    result = eval_store(Logits(), store, vocab_size=vocab, seq_len=seq_len, batch_size=4)
    assert all(np.isfinite(v) for v in result.values()), result
