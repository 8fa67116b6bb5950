"""Beyond fixed top-k: coverage-adaptive k, sampled ids with counts, and a 2^18-wide vocabulary,
each checked against a float64 full-softmax reference of the same teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_capture import assert_matches_reference, reference

from logitstore import layout, storage
from logitstore.capture.engine import capture
from logitstore.capture.reduce import Reduction, hashed_uniforms
from logitstore.capture.teacher import load_teacher
from logitstore.errors import LogitStoreError
from logitstore.spec import CaptureSpec, CaptureTuning
from logitstore.verify import verify

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare.txt"
# Several units, batches and row chunks at odd sizes over 300 tokens.
TUNING = CaptureTuning(unit_tokens=150, chunk_tokens=64, batch_tokens=128, row_chunk=29)


@pytest.fixture(scope="module")
def peaked_teacher(tiny_teacher_dir):
    """The tiny random teacher with its final norm scaled up: confident, varied distributions
    (mean top-1 ~0.76, top-64 mass ~0.9), like a trained model's, instead of near-uniform ones."""
    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    with torch.no_grad():
        teacher.model.model.norm.weight.fill_(30.0)
    return teacher


def test_adaptive_keeps_the_fewest_ids_reaching_the_coverage(peaked_teacher, tmp_path):
    spec = CaptureSpec(mode="adaptive", coverage=0.8, k=32, temperatures=(1.0, 2.0), max_len=64, max_tokens=300)
    store = capture(peaked_teacher, [CORPUS], str(tmp_path / "a"), spec, tuning=TUNING)
    assert store.meta.capture.mode == "adaptive" and store.meta.capture.coverage == 0.8
    bound = TUNING.logp_codec.topk_error_bound
    kept_counts = []
    for i in range(store.num_sequences):
        block = store.sequence(i)
        logp_ref, lse_ref = reference(peaked_teacher.model, block.input_ids, store.temperatures)
        ranked = -np.sort(-logp_ref, axis=1)[:, :32]
        mass = np.cumsum(np.exp(ranked), axis=1)
        # The smallest prefix whose mass reaches 0.8, capped at 32 (float32 vs float64 may
        # disagree by one slot only where the mass sits within rounding of the coverage).
        want = np.minimum((mass < 0.8).sum(axis=1) + 1, 32)
        kept = (block.topk_ids >= 0).sum(axis=1)
        near = np.abs(mass[np.arange(len(want)), np.minimum(want, 31) - 1] - 0.8) < 1e-5
        assert np.all((kept == want) | near)
        kept_counts.append(kept)
        # Kept slots come first, are the teacher's top ids, and carry their exact log-probs.
        assert np.all(np.isneginf(block.topk_logp) == (block.topk_ids < 0))
        assert np.all(np.diff((block.topk_ids >= 0).astype(int), axis=1) <= 0)
        got = np.take_along_axis(logp_ref, np.maximum(block.topk_ids, 0).astype(np.int64), axis=1)
        real = block.topk_ids >= 0
        assert np.all(np.abs(got - ranked)[real] <= 1e-4)
        assert np.all(np.abs(block.topk_logp - got)[real] <= (bound(np.where(real, got, -np.inf)) + 1e-4)[real])
        np.testing.assert_allclose(block.lse, lse_ref, atol=2e-4)
        # The tail bucket holds exactly the rest of the mass, since lse is full-vocabulary.
        _, tail = store.teacher_logprobs(block, 1.0)
        exact_tail = 1 - np.where(real, np.exp(got), 0).sum(axis=1)
        np.testing.assert_allclose(np.exp(tail), exact_tail, atol=2e-2 * 0.2 + 1e-4)
    kept = np.concatenate(kept_counts)
    assert kept.min() == 1 and kept.max() == 32 and 1 < kept.mean() < 16  # k really adapts
    assert verify(store.url).ok


def test_sampled_stores_distinct_draws_with_counts_and_exact_logprobs(peaked_teacher, tmp_path):
    spec = CaptureSpec(mode="sampled", draws=20, seed=7, k=16, temperatures=(1.0, 2.0), max_len=64, max_tokens=300)
    store = capture(peaked_teacher, [CORPUS], str(tmp_path / "s"), spec, tuning=TUNING)
    meta = store.meta.capture
    assert (meta.mode, meta.draws, meta.seed, meta.k) == ("sampled", 20, 7, 16)
    block = store.read(0, store.num_tokens)
    real = block.topk_ids >= 0
    assert block.counts.dtype == np.uint8 and np.all((block.counts > 0) == real)
    totals = block.counts.sum(axis=1, dtype=np.int64)
    # 20 draws, at most 16 distinct kept: all draws are accounted for unless a row had more distinct ids.
    assert np.all(totals <= 20) and np.all((totals == 20) | (real.sum(axis=1) == 16))
    assert (totals == 20).mean() > 0.9
    for i in range(store.num_sequences):
        seq = store.sequence(i)
        logp_ref, lse_ref = reference(peaked_teacher.model, seq.input_ids, store.temperatures)
        ok = seq.topk_ids >= 0
        got = np.take_along_axis(logp_ref, np.maximum(seq.topk_ids, 0).astype(np.int64), axis=1)
        bound = TUNING.logp_codec.topk_error_bound(np.where(ok, got, -np.inf)) + 2e-4
        assert np.all(np.abs(seq.topk_logp - got)[ok] <= bound[ok])
        np.testing.assert_allclose(seq.lse, lse_ref, atol=2e-4)
        # Most likely first, ids distinct within a row.
        assert np.all(np.diff(np.where(ok, got, -1e30), axis=1)[ok[:, 1:]] <= 1e-6)
        assert all(len(set(r[r >= 0])) == (r >= 0).sum() for r in seq.topk_ids)
    assert verify(store.url).ok

    # Draws are keyed by the token's global position, not by a generator's state: a resumed
    # capture draws the same ids for the units it redoes...
    digest = verify(store.url).digest
    for i in range(store.meta.num_segments - 1):
        (tmp_path / "s" / "commits" / f"{i:06d}.json").unlink()
    (tmp_path / "s" / "index.json").unlink()
    resumed = capture(peaked_teacher, [CORPUS], str(tmp_path / "s"), spec, tuning=TUNING, resume=True)
    assert verify(resumed.url).digest == digest
    # ... and other unit and batch cuts draw the same ids, except where float rounding of a
    # differently batched forward moves a CDF boundary across a draw.
    other = capture(peaked_teacher, [CORPUS], str(tmp_path / "t"), spec,
                    tuning=CaptureTuning(unit_tokens=10_000, batch_tokens=64, row_chunk=7))
    again = other.read(0, other.num_tokens)
    assert np.mean(again.topk_ids == block.topk_ids) > 0.99 and np.mean(again.counts == block.counts) > 0.99
    reseeded = capture(peaked_teacher, [CORPUS], str(tmp_path / "u"), spec.model_copy(update={"seed": 8}),
                       tuning=TUNING)
    assert np.mean(reseeded.read(0, store.num_tokens).counts == block.counts) < 0.9


@pytest.mark.parametrize("head", [0, 4])
def test_counts_only_keeps_the_same_draws_without_logprobs(head, peaked_teacher, tmp_path):
    """counts_only keeps the same (id, count) pairs as the store with log-probs; with a head, the
    head's ids and log-probs too, bit for bit, and the drawn slots' log-probs are NaN (not stored)."""
    base = dict(mode="sampled", draws=20, seed=7, k=16 + head, head=head, temperatures=(1.0,), max_len=64,
                max_tokens=300)
    full = capture(peaked_teacher, [CORPUS], str(tmp_path / "full"), CaptureSpec(**base, counts_only=False),
                   tuning=TUNING)
    store = capture(peaked_teacher, [CORPUS], str(tmp_path / "counts"), CaptureSpec(**base, counts_only=True),
                    tuning=TUNING)
    logp_array = tmp_path / "counts" / "segments" / "000000" / "topk_logp"
    assert store.meta.capture.counts_only and not full.meta.capture.counts_only
    assert logp_array.exists() == bool(head)
    want, got = full.read(0, full.num_tokens), store.read(0, store.num_tokens)
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    np.testing.assert_array_equal(got.lse, want.lse)
    if head:
        np.testing.assert_array_equal(got.topk_ids[:, :head], want.topk_ids[:, :head])
        np.testing.assert_array_equal(got.topk_logp[:, :head], want.topk_logp[:, :head])
        drawn = got.topk_ids[:, head:] >= 0
        assert np.isnan(got.topk_logp[:, head:][drawn]).all() and np.isneginf(got.topk_logp[:, head:][~drawn]).all()
    else:
        assert got.topk_logp is None
    # The same (id, count) pairs per token; only their order within the token differs.
    for a, b, ca, cb in zip(want.topk_ids, got.topk_ids, want.counts, got.counts, strict=True):
        assert dict(zip(a[a >= 0], ca[a >= 0], strict=True)) == dict(zip(b[b >= 0], cb[b >= 0], strict=True))
        assert np.all((b[head:] >= 0) == (cb[head:] > 0)) and np.all(np.diff((b >= 0).astype(int)) <= 0)
    report = verify(store.url)
    assert report.ok and report.digest != verify(full.url).digest
    # In the stored order each token's drawn id-table indices ascend, which makes the bytes smaller.
    segment = storage.open_kv(str(tmp_path / "counts"), read_only=True)
    table = np.asarray(layout.open_array(segment, "segments/000000/id_table")[...])
    rank = {int(i): r for r, i in enumerate(table)}
    seg0 = store.read(*store.segment_spans()[0]).topk_ids[:, head:]
    assert all(np.all(np.diff([rank[int(i)] for i in row[row >= 0]]) > 0) for row in seg0)
    assert store.describe()["disk_bytes"] < full.describe()["disk_bytes"]
    with pytest.raises(LogitStoreError, match="counts_only sampled store"):
        store.teacher_logprobs(got, 1.0)


def test_sampled_draw_frequencies_follow_the_distribution():
    """counts / M is an unbiased estimate of p: over many tokens with the same logits, the mean
    of counts / M per id matches softmax(z) within Monte Carlo error."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 300, generator=gen) * 2.5
    z[0, 17] = -torch.inf  # a masked logit is never drawn
    rows, draws = 4000, 30
    ids, logp, _, counts = Reduction("sampled", draws, (1.0,), draws=draws, seed=3)(z.repeat(rows, 1),
                                                                                     torch.arange(rows) * 11)
    est = torch.zeros(300, dtype=torch.float64)
    est.scatter_add_(0, ids.clamp(min=0).long().flatten(), (counts.double() * (ids >= 0)).flatten())
    est /= rows * draws
    p = torch.softmax(z[0].double(), dim=0)
    sigma = torch.sqrt(p * (1 - p) / (rows * draws))
    assert torch.all((est - p).abs() <= 5 * sigma + 1e-12)
    assert est[17] == 0
    np.testing.assert_allclose(logp[ids >= 0], torch.log_softmax(z, -1)[0][ids[ids >= 0].long()], atol=1e-5)


def test_a_head_keeps_the_top_ids_and_draws_from_the_tail():
    """With a head of H: the first H slots are the top-H ids (count 0, exact log-probs), and the
    draws' frequencies follow the tail distribution p_j / p_tail."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 300, generator=gen) * 2.5
    rows, draws, head = 4000, 30, 10
    ids, logp, _, counts = Reduction("sampled", head + draws, (1.0,), draws=draws, seed=3, head=head)(
        z.repeat(rows, 1), torch.arange(rows) * 11)
    top = torch.topk(z[0], head).indices
    assert torch.equal(ids[:, :head].long(), top.expand(rows, head)) and torch.all(counts[:, :head] == 0)
    tail_ids, tail_counts = ids[:, head:].long(), counts[:, head:].long()
    assert torch.all(torch.isin(tail_ids[tail_ids >= 0], top, invert=True))
    assert torch.all(tail_counts.sum(dim=1) == draws) and torch.all((tail_counts > 0) == (tail_ids >= 0))
    # Every slot in rank order: the head's ids outrank every drawn one.
    scores = torch.where(ids >= 0, z[0][ids.clamp(min=0).long()], -torch.inf)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])
    np.testing.assert_allclose(logp[ids >= 0], torch.log_softmax(z, -1)[0][ids[ids >= 0].long()], atol=1e-5)
    est = torch.zeros(300, dtype=torch.float64)
    est.scatter_add_(0, tail_ids.clamp(min=0).flatten(), (tail_counts * (tail_ids >= 0)).double().flatten())
    est /= rows * draws
    p = torch.softmax(z[0].double(), dim=0)
    p[top] = 0
    p /= p.sum()
    sigma = torch.sqrt(p * (1 - p) / (rows * draws))
    assert torch.all((est - p).abs() <= 5 * sigma + 1e-12)
    # A row whose head holds all the mass (the rest masked) draws nothing: padding only.
    masked = torch.full((1, 300), -torch.inf)
    masked[0, :head] = 0.0
    ids, logp, _, counts = Reduction("sampled", head + draws, (1.0,), draws=draws, seed=3, head=head)(
        masked, torch.arange(1))
    assert torch.all(ids[0, :head] >= 0) and torch.all(ids[0, head:] == -1) and torch.all(counts == 0)


@pytest.mark.parametrize("last", ["head", "masked"])
def test_draws_never_land_on_ids_without_mass(last):
    """A tail mass in float32's subnormal range (every tail logit ~100 nats down) makes u * total
    round up to total; such a draw must go to the last id with mass, never to the last column,
    here a head id or a masked logit."""
    rows, v, head, draws = 64, 16, 2, 20
    z = torch.full((rows, v), -101.5)
    z[:, 3] = 0.5
    if last == "head":
        z[:, v - 1] = 0.0  # the head is {3, 15}
    else:
        z[:, v - 2] = 0.0  # the head is {3, 14}
        z[:, v - 1] = -torch.inf
    ids, logp, _, counts = Reduction("sampled", head + draws, (1.0,), draws=draws, seed=3, head=head)(
        z, torch.arange(rows))
    tail = ids[:, head:].long()
    assert not torch.isin(tail, ids[:, :head].long()).any() and torch.all(tail != v - 1)
    assert torch.all((counts[:, head:] > 0) == (tail >= 0)) and torch.all(counts[:, head:].sum(1) <= draws)
    assert torch.all(torch.isfinite(logp[ids >= 0]))


def test_capture_with_a_head_matches_topk_then_draws(peaked_teacher, tmp_path):
    common = dict(temperatures=(1.0, 2.0), max_len=64, max_tokens=300)
    top = capture(peaked_teacher, [CORPUS], str(tmp_path / "top"), CaptureSpec(mode="topk", k=6, **common),
                  tuning=TUNING)
    store = capture(peaked_teacher, [CORPUS], str(tmp_path / "h"),
                    CaptureSpec(mode="sampled", head=6, draws=12, seed=2, **common), tuning=TUNING)
    assert (store.meta.capture.head, store.meta.capture.k) == (6, 18)
    want, got = top.read(0, top.num_tokens), store.read(0, store.num_tokens)
    np.testing.assert_array_equal(got.topk_ids[:, :6], want.topk_ids)
    # The same codes but for each row's largest entry, which absorbs the rounding of the whole
    # row's mass (LogProbCodec.encode_topk), and this row has more entries.
    np.testing.assert_array_equal(got.topk_logp[:, 1:6], want.topk_logp[:, 1:])
    np.testing.assert_allclose(got.topk_logp[:, 0], want.topk_logp[:, 0], rtol=2e-2, atol=1e-3)
    assert np.all(got.counts[:, :6] == 0) and np.all(got.counts.sum(axis=1) == 12)
    assert verify(store.url).ok
    _, tail = store.teacher_logprobs(got, 2.0)  # the stored ids are exact: a K+1-bucket view still works
    assert np.all(np.isfinite(tail))


def test_hashed_uniforms_are_uniform_and_position_keyed():
    u = hashed_uniforms(torch.arange(50_000), 8, seed=1)
    assert u.min() >= 0 and u.max() < 1
    hist = torch.histc(u, bins=16, min=0, max=1) / u.numel()
    assert torch.all((hist - 1 / 16).abs() < 3e-3)
    np.testing.assert_array_equal(hashed_uniforms(torch.tensor([123, 7]), 8, 1)[0], u[123])
    assert not torch.equal(hashed_uniforms(torch.arange(10), 8, seed=2), u[:10])


@pytest.fixture(scope="module")
def wide_teacher_dir(smollm2_tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama whose logits are 262144 wide (Gemma-3 size), with the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=262_144, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=smollm2_tokenizer.bos_token_id,
                         eos_token_id=smollm2_tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(20.0)  # confident enough that the top-k mass is not negligible
    out = tmp_path_factory.mktemp("wide_teacher")
    model.save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def test_vocab_262144_ids_round_trip_exactly(wide_teacher_dir, tmp_path):
    teacher = load_teacher(str(wide_teacher_dir), device="cpu")
    assert teacher.tokenizer_info.logits_width == 262_144
    tuning = CaptureTuning(unit_tokens=100, chunk_tokens=32, batch_tokens=96, row_chunk=40)
    store = capture(teacher, [CORPUS], str(tmp_path / "w"), CaptureSpec(mode="topk", k=16, temperatures=(1.0, 2.0),
                                                                         max_len=48, max_tokens=150), tuning=tuning)
    assert store.meta.tokenizer.logits_width == 262_144
    assert_matches_reference(store, teacher.model, tuning.logp_codec)
    ids = store.read(0, store.num_tokens).topk_ids
    assert ids.max() > 200_000 and (ids > 65_535).mean() > 0.5  # far beyond uint16, stored exactly
    assert verify(store.url).ok
