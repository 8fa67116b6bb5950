"""Write synthetic segments with StoreWriter, read them back with open_store."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from store_helpers import (
    TEMPERATURES,
    concat,
    fast_segment,
    logit_segment,
    make_meta,
    make_pieces,
    quantized,
    split_lengths,
    write_store,
)

from logitstore import layout, storage
from logitstore.codecs import LogProbCodec
from logitstore.errors import (
    CorruptDataError,
    FormatVersionError,
    LogitStoreError,
    MetadataError,
    NotAStoreError,
    StoreExistsError,
    TemperatureNotCapturedError,
)
from logitstore.reader import open_store
from logitstore.schema import FORMAT_VERSION
from logitstore.writer import SegmentData, StoreWriter

K = 16
WIDTH = 1001
CHUNK = 64
SEGMENT_TOKENS = (70, 333, 200, 517)
EPS32 = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Built:
    url: str
    segments: list[SegmentData]
    logits: np.ndarray  # float64 [N, V]
    codec: LogProbCodec

    @property
    def expected(self) -> dict[str, np.ndarray]:
        return concat(self.segments)


def build_logit_segments(seed: int, sizes=SEGMENT_TOKENS) -> tuple[list[SegmentData], np.ndarray]:
    rng = np.random.default_rng(seed)
    segments, logits, doc = [], [], 0
    for n in sizes:
        lengths = split_lengths(rng, n, 1, 150)
        seg = logit_segment(rng, lengths, k=K, width=WIDTH, doc_start=doc)
        doc += seg.data.pieces.num_rows
        segments.append(seg.data)
        logits.append(seg.logits)
    return segments, np.concatenate(logits)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    segments, logits = build_logit_segments(0)
    meta = make_meta(num_segments=len(segments), k=K, logits_width=WIDTH, chunk_tokens=CHUNK)
    url = write_store(tmp_path_factory.mktemp("store") / "s", meta, segments)
    return Built(url, segments, logits, LogProbCodec.from_dict(meta.capture.logp_codec))


def assert_block(block, expected: dict[str, np.ndarray], a: int, b: int, codec: LogProbCodec) -> None:
    assert len(block) == b - a
    np.testing.assert_array_equal(block.input_ids, expected["input_ids"][a:b])
    assert block.input_ids.dtype == np.int32
    np.testing.assert_array_equal(block.topk_ids, expected["topk_ids"][a:b])
    assert block.topk_ids.dtype == np.int32
    np.testing.assert_array_equal(block.lse, expected["lse"][a:b])
    ref = expected["topk_logp"][a:b]
    assert block.topk_logp.dtype == np.float32
    np.testing.assert_array_equal(block.topk_logp, quantized(codec, ref))
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isneginf(block.topk_logp), ~finite)
    err = np.abs(block.topk_logp[finite].astype(np.float64) - ref[finite].astype(np.float64))
    assert np.all(err <= codec.topk_error_bound(ref)[finite])


# ------------------------------------------------------------------------------------ reading


def test_sizes_and_segments(built: Built) -> None:
    store = open_store(built.url)
    n = sum(SEGMENT_TOKENS)
    assert store.num_tokens == n
    assert store.num_sequences == sum(len(s.seq_lengths) for s in built.segments)
    assert store.complete
    assert store.temperatures == TEMPERATURES
    assert [r.segment for r in store.segments] == [0, 1, 2, 3]
    assert [r.tokens for r in store.segments] == list(SEGMENT_TOKENS)
    bounds = np.concatenate([[0], np.cumsum(SEGMENT_TOKENS)])
    assert store.segment_spans() == [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def test_read_everything(built: Built) -> None:
    store = open_store(built.url)
    n = store.num_tokens
    assert_block(store.read(0, n), built.expected, 0, n, built.codec)
    # The stored lse is the float64 logsumexp of the logits, rounded once to float32.
    ref_lse = np.stack([np.log(np.exp(built.logits / t).sum(axis=1)) for t in TEMPERATURES], axis=1)
    np.testing.assert_allclose(store.read(0, n).lse, ref_lse, rtol=EPS32, atol=0)


def test_read_ranges_across_boundaries(built: Built) -> None:
    store = open_store(built.url)
    n = store.num_tokens
    bounds = np.cumsum(SEGMENT_TOKENS)[:-1]
    ranges = [(0, 0), (n, n), (0, 1), (n - 1, n), (CHUNK - 1, CHUNK + 1)]
    for b in bounds:  # exactly at, just across, and spanning several segment boundaries
        ranges += [(b - 1, b + 1), (b, b + 1), (b - 1, b), (b, b), (b - 5, b + 300)]
    ranges.append((int(bounds[0]) - 3, int(bounds[-1]) + 3))
    rng = np.random.default_rng(1)
    for _ in range(25):
        a, b = sorted(int(x) for x in rng.integers(0, n + 1, size=2))
        ranges.append((a, b))
    for a, b in ranges:
        assert_block(store.read(a, b), built.expected, a, b, built.codec)


def test_read_into_a_reused_block(built: Built) -> None:
    store = open_store(built.url)
    n = store.num_tokens
    buf = store.read(0, n)
    bounds = np.cumsum(SEGMENT_TOKENS)[:-1]
    for a, b in [(0, n), (5, 6), (3, 3), (int(bounds[0]) - 2, int(bounds[1]) + 2), (CHUNK - 1, CHUNK + 1), (n - 1, n)]:
        block = store.read(a, b, out=buf)
        assert_block(block, built.expected, a, b, built.codec)
        assert all(np.shares_memory(x, y) for x, y in zip(
            (block.input_ids, block.topk_ids, block.topk_logp, block.lse),
            (buf.input_ids, buf.topk_ids, buf.topk_logp, buf.lse), strict=True)) or a == b


def test_read_into_a_block_that_does_not_fit(built: Built) -> None:
    store = open_store(built.url)
    small = store.read(0, 10)
    with pytest.raises(ValueError, match="at least 11 tokens"):
        store.read(0, 11, out=small)
    other_k = small.__class__(small.input_ids, small.topk_ids[:, :3].copy(), small.topk_logp, small.lse)
    with pytest.raises(ValueError, match="'topk_ids' is int32 \\(10, 3\\)"):
        store.read(0, 5, out=other_k)


@pytest.mark.parametrize(("a", "b"), [(-1, 3), (5, 4), (0, sum(SEGMENT_TOKENS) + 1)])
def test_read_out_of_range(built: Built, a: int, b: int) -> None:
    with pytest.raises(IndexError, match="outside"):
        open_store(built.url).read(a, b)


def test_sequences(built: Built) -> None:
    store = open_store(built.url)
    lengths = built.expected["seq_lengths"]
    np.testing.assert_array_equal(store.sequence_lengths(), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(store.num_sequences):
        assert store.sequence_span(i) == (starts[i], starts[i + 1])
    for i in [0, 1, len(lengths) // 2, len(lengths) - 1]:
        assert_block(store.sequence(i), built.expected, int(starts[i]), int(starts[i + 1]), built.codec)
    for bad in (-1, store.num_sequences):
        with pytest.raises(IndexError):
            store.sequence_span(bad)


def expected_manifest(segments: list[SegmentData]) -> pa.Table:
    """Global sequence numbers and token positions, computed independently of the writer."""
    rows = []
    seq0 = tok0 = 0
    for seg in segments:
        offsets = np.concatenate([[0], np.cumsum(seg.seq_lengths)])
        for r in seg.pieces.to_pylist():
            r = dict(r)
            r["token_start"] = tok0 + int(offsets[r["sequence"]]) + r["seq_token_offset"]
            r["sequence"] += seq0
            rows.append(r)
        seq0 += len(seg.seq_lengths)
        tok0 += int(offsets[-1])
    return rows


def test_manifest_before_and_after_finalize(tmp_path: Path) -> None:
    segments, _ = build_logit_segments(5, sizes=(90, 140, 31))
    meta = make_meta(num_segments=3, k=K, logits_width=WIDTH, chunk_tokens=CHUNK)
    writer = StoreWriter.create(str(tmp_path / "s"), meta)
    for i, seg in enumerate(segments):
        writer.write_segment(i, seg)
    want = expected_manifest(segments)
    before = open_store(str(tmp_path / "s")).manifest()
    assert before.to_pylist() == want
    # token_start of every piece points at where its run starts in the flat token axis.
    pieces = before.to_pylist()
    assert pieces[0]["token_start"] == 0
    assert sum(p["num_tokens"] for p in pieces) == sum(len(s.input_ids) for s in segments)

    assert not (tmp_path / "s" / layout.INDEX_KEY).exists()
    writer.finalize()
    assert (tmp_path / "s" / layout.INDEX_KEY).exists()
    store = open_store(str(tmp_path / "s"))
    assert store.manifest().to_pylist() == want
    assert store.num_tokens == 261 and store.complete
    assert_block(store.read(0, 261), concat(segments), 0, 261, LogProbCodec())


def test_finalize_refuses_incomplete_store(tmp_path: Path) -> None:
    segments, _ = build_logit_segments(6, sizes=(40, 40))
    writer = StoreWriter.create(str(tmp_path / "s"), make_meta(num_segments=3, k=K, chunk_tokens=CHUNK))
    writer.write_segment(0, segments[0])
    with pytest.raises(LogitStoreError, match="segment 1 is not committed"):
        writer.finalize()


# ---------------------------------------------------------------------------------- teacher


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_teacher_logprobs_match_float64_softmax(built: Built, temperature: float) -> None:
    store = open_store(built.url)
    n = store.num_tokens
    block = store.read(0, n)
    logp_t, tail = store.teacher_logprobs(block, temperature)
    assert logp_t.shape == (n, K) and logp_t.dtype == np.float32
    assert tail.shape == (n,)

    # Reference: float64 softmax of logits / T over the full vocabulary, on the stored top-k ids.
    scaled = built.logits / temperature
    ref_all = scaled - np.log(np.exp(scaled - scaled.max(1, keepdims=True)).sum(1, keepdims=True)) - scaled.max(
        1, keepdims=True
    )
    ref = np.take_along_axis(ref_all, built.expected["topk_ids"].astype(np.int64), axis=1)
    ref_tail = 1.0 - np.exp(ref).sum(axis=1)

    # Tolerance: the codec's error on log p at T=1 scales by 1/T; the float32 lse and the
    # float32 arithmetic add a few ulps of the magnitudes involved.
    logp1 = built.expected["topk_logp"].astype(np.float64)
    lse = built.expected["lse"].astype(np.float64)
    col = TEMPERATURES.index(temperature)
    z = np.abs(logp1) + np.abs(lse[:, :1])
    tol = built.codec.topk_error_bound(logp1) / temperature + 8 * EPS32 * (
        z / temperature + np.abs(lse[:, col : col + 1]) + np.abs(ref)
    )
    err = np.abs(logp_t.astype(np.float64) - ref)
    assert np.all(err <= tol), float((err / tol).max())

    # The tail bucket is the exact tail mass of the full distribution, to the same tolerance.
    safe_tail = np.clip(ref_tail, 1e-300, None)  # peaked rows at low T: float64 1 - sum may be <= 0
    tail_tol = (np.exp(ref) * np.expm1(tol)).sum(axis=1) + 8 * EPS32 * safe_tail * (1 + np.abs(np.log(safe_tail)))
    tail_err = np.abs(np.exp(tail.astype(np.float64)) - ref_tail)
    assert np.all(tail_err <= tail_tol), float((tail_err / tail_tol).max())
    # The rows span flat to peaked teachers: both a near-1 and a near-0 tail are exercised.
    assert ref_tail.max() > 0.5
    if temperature <= 1:
        assert ref_tail.min() < 1e-3


def test_uncaptured_temperature(built: Built) -> None:
    store = open_store(built.url)
    block = store.read(0, 10)
    with pytest.raises(TemperatureNotCapturedError) as info:
        store.teacher_logprobs(block, 3.0)
    msg = str(info.value)
    assert "temperature 3 was not captured" in msg
    assert "captured temperatures: 1, 2, 0.5, 4" in msg
    assert store.temperature_index(4.0) == 3
    assert store.temperature_index(0.5 + 1e-9) == 2


# -------------------------------------------------------------------------------- not stores


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(NotAStoreError, match="no such directory"):
        open_store(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match=r"no zarr\.json"):
        open_store(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotAStoreError):
        open_store(str(tmp_path / "file"))
    # A Zarr group that is not ours.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"foo": 1}})
    )
    with pytest.raises(NotAStoreError, match="not a logitstore store"):
        open_store(str(tmp_path / "other"))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "zarr.json").write_text("{not json")
    with pytest.raises(NotAStoreError, match="not valid JSON"):
        open_store(str(tmp_path / "garbled"))


def copy_store(built: Built, dst: Path) -> str:
    shutil.copytree(built.url, dst)
    return str(dst)


def edit_root_attrs(url: str, edit) -> None:
    path = Path(url) / "zarr.json"
    doc = json.loads(path.read_text())
    edit(doc["attributes"]["logitstore"])
    path.write_text(json.dumps(doc))


def test_unknown_format_version_on_disk(built: Built, tmp_path: Path) -> None:
    url = copy_store(built, tmp_path / "s")
    edit_root_attrs(url, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(FormatVersionError, match=f"format_version {FORMAT_VERSION + 1} is not supported"):
        open_store(url)


def test_bad_metadata_on_disk(built: Built, tmp_path: Path) -> None:
    url = copy_store(built, tmp_path / "s")
    edit_root_attrs(url, lambda m: m["capture"].update(k=0))
    with pytest.raises(MetadataError, match="invalid store metadata"):
        open_store(url)


# ------------------------------------------------------------------------------------ writing


def test_create_over_existing_store(built: Built) -> None:
    meta = open_store(built.url).meta
    with pytest.raises(StoreExistsError, match="already holds a store"):
        StoreWriter.create(built.url, meta)
    assert open_store(built.url).num_tokens == sum(SEGMENT_TOKENS)  # untouched


def test_commit_twice_refused(tmp_path: Path) -> None:
    segments, _ = build_logit_segments(7, sizes=(50, 60))
    url = str(tmp_path / "s")
    writer = StoreWriter.create(url, make_meta(num_segments=2, k=K, chunk_tokens=CHUNK))
    record = writer.write_segment(0, segments[0])
    assert (record.segment, record.tokens, record.sequences) == (0, 50, len(segments[0].seq_lengths))
    with pytest.raises(StoreExistsError, match=r"segment 0 .* already committed"):
        writer.write_segment(0, segments[1])
    # A second writer (another process) cannot commit it either.
    other = StoreWriter.resume(url, writer.meta)
    with pytest.raises(StoreExistsError):
        other.write_segment(0, segments[1])
    store = open_store(url)
    assert_block(store.read(0, 50), concat(segments[:1]), 0, 50, LogProbCodec())


def test_create_key_is_create_only(tmp_path: Path) -> None:
    kv = storage.open_kv(str(tmp_path), read_only=False)
    assert storage.create_key(kv, "commits/000001.json", b"first")
    assert not storage.create_key(kv, "commits/000001.json", b"second")
    assert storage.read_key(kv, "commits/000001.json") == b"first"
    assert [p.name for p in (tmp_path / "commits").iterdir()] == ["000001.json"]  # no temporary left over


def test_write_segment_rejects_bad_input(tmp_path: Path) -> None:
    writer = StoreWriter.create(str(tmp_path / "s"), make_meta(num_segments=2, k=K, logits_width=WIDTH))
    good = fast_segment(1, 100, k=K, width=WIDTH)
    with pytest.raises(ValueError, match="outside the planned"):
        writer.write_segment(2, good)
    with pytest.raises(ValueError, match="K=32"):
        writer.write_segment(0, fast_segment(1, 100, k=32, width=WIDTH))
    ids = good.topk_ids.copy()
    ids[3, 2] = WIDTH
    with pytest.raises(ValueError, match="logits_width"):
        writer.write_segment(0, SegmentData(**{**good.__dict__, "topk_ids": ids}))
    with pytest.raises(ValueError, match="sum to"):
        writer.write_segment(0, SegmentData(**{**good.__dict__, "seq_lengths": np.array([50, 49])}))
    # Padding is not stored, so it must be exactly what the reader puts back: a row's trailing
    # -1 ids with -inf log-probs, after at least one stored id.
    for row, slots in ((3, [2]), (4, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])):
        ids, logp = good.topk_ids.copy(), good.topk_logp.copy()
        ids[row, slots], logp[row, slots] = -1, -np.inf
        match = "after every stored id" if len(slots) == 1 else "at least one stored id"
        with pytest.raises(ValueError, match=match):
            writer.write_segment(0, SegmentData(**{**good.__dict__, "topk_ids": ids, "topk_logp": logp}))
    ids = good.topk_ids.copy()
    ids[5, K - 1] = -1
    with pytest.raises(ValueError, match="-inf exactly at padding"):
        writer.write_segment(0, SegmentData(**{**good.__dict__, "topk_ids": ids}))
    assert open_store(str(tmp_path / "s")).num_tokens == 0


def test_resume_checks_settings(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    meta = make_meta(num_segments=2, k=K)
    StoreWriter.create(url, meta)
    with pytest.raises(LogitStoreError, match=r"capture\.k: 16 != 8"):
        StoreWriter.resume(url, make_meta(num_segments=2, k=8))
    with pytest.raises(MetadataError, match="no store to resume"):
        StoreWriter.resume(str(tmp_path / "nothing"), meta)
    later = meta.model_copy(update={"created_at": "2031-01-01T00:00:00+00:00"})
    assert StoreWriter.resume(url, later).meta == meta  # the store's own metadata is kept


def test_collect_garbage_and_partial_commits(tmp_path: Path) -> None:
    segments, _ = build_logit_segments(8, sizes=(80, 130, 65, 99))
    url = str(tmp_path / "s")
    writer = StoreWriter.create(url, make_meta(num_segments=4, k=K, chunk_tokens=CHUNK))
    for i in (0, 1, 3):
        writer.write_segment(i, segments[i])
    # Segment 1: written in full but its commit record never made it (killed before commit).
    (tmp_path / "s" / layout.commit_key(1)).unlink()
    # Segment 2: killed halfway through its arrays.
    layout.write_array(writer._store, f"{layout.segment_prefix(2)}/input_ids", segments[2].input_ids, CHUNK)

    store = open_store(url)
    assert not store.complete
    assert [r.segment for r in store.segments] == [0, 3]
    assert store.num_tokens == 80 + 99
    assert store.num_sequences == len(segments[0].seq_lengths) + len(segments[3].seq_lengths)
    visible = concat([segments[0], segments[3]])
    assert_block(store.read(0, 179), visible, 0, 179, LogProbCodec())
    assert store.manifest().to_pylist() == expected_manifest([segments[0], segments[3]])

    assert writer.committed() == {0, 3}
    assert writer.collect_garbage() == [1, 2]
    seg_dir = tmp_path / "s" / "segments"
    assert sorted(p.name for p in seg_dir.iterdir() if p.is_dir()) == ["000000", "000003"]
    assert writer.collect_garbage() == []
    assert_block(open_store(url).read(0, 179), visible, 0, 179, LogProbCodec())

    writer.write_segment(1, segments[1])
    writer.write_segment(2, segments[2])
    store = open_store(url)
    assert store.complete
    assert_block(store.read(0, store.num_tokens), concat(segments), 0, store.num_tokens, LogProbCodec())


def test_padding_roundtrip(tmp_path: Path) -> None:
    seg = fast_segment(3, 700, k=K, width=WIDTH, seq_len=100, padding=True)
    assert (seg.topk_ids == -1).any() and (seg.topk_ids[:, 0] != -1).all()
    url = write_store(tmp_path / "s", make_meta(num_segments=1, k=K, chunk_tokens=CHUNK), [seg])
    block = open_store(url).read(0, 700)
    assert_block(block, concat([seg]), 0, 700, LogProbCodec())
    pad = seg.topk_ids == -1
    assert np.all(block.topk_ids[pad] == -1)
    assert np.all(np.isneginf(block.topk_logp[pad]))
    assert np.all(np.isfinite(block.topk_logp[~pad]))


@pytest.mark.parametrize("k", [K, 300])
def test_padding_is_not_stored_and_reads_back_at_any_range(tmp_path: Path, k: int) -> None:
    width = 2001
    segments = [fast_segment(s, n, k=k, width=width, seq_len=90, padding=True) for s, n in ((11, 257), (12, 130))]
    meta = make_meta(num_segments=2, k=k, logits_width=width, chunk_tokens=CHUNK)
    url = write_store(tmp_path / "s", meta, segments)
    kv = storage.open_kv(url, read_only=True)
    row_len = layout.open_array(kv, "segments/000000/row_len")
    assert row_len.dtype == (np.uint8 if k < 256 else np.uint16)
    np.testing.assert_array_equal(row_len[...], (segments[0].topk_ids >= 0).sum(axis=1))
    stored = int((segments[0].topk_ids >= 0).sum())
    for name in ("topk_ids", "topk_logp"):
        assert layout.open_array(kv, f"segments/000000/{name}").shape == (stored,)
    assert -1 not in layout.open_array(kv, "segments/000000/id_table")[...]

    # Slot chunks (CHUNK * k slots) and token chunks do not line up: read across both kinds of edge.
    store, expected = open_store(url), concat(segments)
    reused = store.read(0, 100)
    for a, b in ((0, 387), (0, 1), (63, 65), (100, 257), (250, 270), (256, 257), (257, 387), (386, 387)):
        assert_block(store.read(a, b), expected, a, b, LogProbCodec())
        assert_block(store.read(a, b, out=reused) if b - a <= 100 else store.read(a, b), expected, a, b,
                     LogProbCodec())


def test_a_damaged_id_table_names_the_tokens_read(tmp_path: Path) -> None:
    seg = fast_segment(13, 400, k=K, width=WIDTH, seq_len=100, padding=True)
    url = write_store(tmp_path / "s", make_meta(num_segments=1, k=K, chunk_tokens=CHUNK), [seg])
    kv = storage.open_kv(url, read_only=False)
    table = layout.open_array(kv, "segments/000000/id_table")[...]
    layout.write_array(kv, "segments/000000/id_table", table[:1], CHUNK)  # well-formed, but too short
    with pytest.raises(CorruptDataError, match=r"array 'topk_ids' of segment 0, tokens \[300, 310\)"):
        open_store(url).read(300, 310)


def test_int32_vocab_roundtrip(tmp_path: Path) -> None:
    width = 300_000
    # 5000 x 16 ids over 300k: about 70k distinct ids, so the index itself needs int32.
    big = fast_segment(4, 5000, k=K, width=width, seq_len=1000)
    small = fast_segment(5, 300, k=K, width=width, seq_len=100)
    assert big.topk_ids.max() > 65535 and len(np.unique(big.topk_ids)) > 65536
    meta = make_meta(num_segments=2, k=K, logits_width=width, vocab_size=299_990, chunk_tokens=1024)
    url = write_store(tmp_path / "s", meta, [big, small], finalize=True)
    store = open_store(url)
    assert_block(store.read(0, 5300), concat([big, small]), 0, 5300, LogProbCodec())
    kv = storage.open_kv(url, read_only=True)
    assert layout.open_array(kv, "segments/000000/topk_ids").dtype == np.int32
    assert layout.open_array(kv, "segments/000001/topk_ids").dtype == np.uint16
    assert layout.open_array(kv, "segments/000001/id_table").dtype == np.int32


def test_other_codec_roundtrip(tmp_path: Path) -> None:
    codec = LogProbCodec(mantissa_bits=4, min_exponent=-20)
    seg = fast_segment(9, 400, k=K, width=WIDTH, seq_len=64, padding=True)
    url = write_store(tmp_path / "s", make_meta(num_segments=1, k=K, codec=codec, chunk_tokens=CHUNK), [seg])
    store = open_store(url)
    assert LogProbCodec.from_dict(store.meta.capture.logp_codec) == codec
    assert_block(store.read(0, 400), concat([seg]), 0, 400, codec)


def test_pieces_helper_shape() -> None:
    table = make_pieces([5, 6, 1], doc_start=10)
    assert table.column("sequence").to_pylist() == [0, 1, 1, 2]
    assert table.column("doc_id").to_pylist() == [10, 11, 12, 13]


def test_uncommitting_a_finalized_segment_hides_it(tmp_path: Path) -> None:
    segments = [fast_segment(20 + i, 100, k=K, width=WIDTH, seq_len=50) for i in range(3)]
    meta = make_meta(num_segments=3, k=K, logits_width=WIDTH, chunk_tokens=CHUNK)
    url = write_store(tmp_path / "s", meta, segments, finalize=True)
    (tmp_path / "s" / layout.commit_key(1)).unlink()  # what CorruptDataError tells the user to do
    writer = StoreWriter.resume(url, meta)
    assert writer.collect_garbage() == [1]
    store = open_store(url)
    assert [r.segment for r in store.segments] == [0, 2]
    assert not store.complete
