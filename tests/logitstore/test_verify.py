"""verify: checksums, missing shards, the content digest, and the CLI around it."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from store_helpers import concat, fast_segment, make_meta, quantized, write_store
from zarr.errors import ZarrUserWarning

from logitstore import layout
from logitstore.cli import main
from logitstore.codecs import LogProbCodec
from logitstore.errors import CorruptDataError, LogitStoreError
from logitstore.reader import describe, open_store
from logitstore.verify import verify
from logitstore.writer import SegmentData, StoreWriter

K = 16
CHUNK = 64
TOKENS = 900
SEQ_LEN = 50  # 18 sequences


@pytest.fixture(scope="module")
def content() -> SegmentData:
    """One capture's worth of soft labels, to be split into segments in different ways."""
    return fast_segment(77, TOKENS, k=K, seq_len=SEQ_LEN, padding=True)


def split(data: SegmentData, seq_cuts: list[int]) -> list[SegmentData]:
    """Cut `data` into segments at sequence boundaries (sequence indices in seq_cuts)."""
    offsets = np.concatenate([[0], np.cumsum(data.seq_lengths)])
    bounds = [0, *seq_cuts, len(data.seq_lengths)]
    out = []
    for s0, s1 in itertools.pairwise(bounds):
        a, b = int(offsets[s0]), int(offsets[s1])
        seq = data.pieces.column("sequence")
        pieces = data.pieces.filter(pc.and_(pc.greater_equal(seq, s0), pc.less(seq, s1)))
        pieces = pieces.set_column(0, "sequence", pc.subtract(pieces.column("sequence"), s0))
        out.append(
            SegmentData(
                input_ids=data.input_ids[a:b],
                topk_ids=data.topk_ids[a:b],
                topk_logp=data.topk_logp[a:b],
                lse=data.lse[a:b],
                seq_lengths=data.seq_lengths[s0:s1],
                pieces=pieces,
            )
        )
    return out


def build(path: Path, data: SegmentData, seq_cuts: list[int], chunk: int = CHUNK, *, finalize: bool = False) -> str:
    segments = split(data, seq_cuts)
    return write_store(path, make_meta(num_segments=len(segments), k=K, chunk_tokens=chunk), segments,
                       finalize=finalize)


def expected_digest(data: SegmentData) -> str:
    """The documented digest, computed from the inputs: one sha256 per decoded array in
    global token order, combined by name."""
    arrays = {
        "input_ids": data.input_ids.astype(np.int32),
        "topk_ids": data.topk_ids.astype(np.int32),
        "topk_logp": quantized(LogProbCodec(), data.topk_logp).astype(np.float32),
        "lse": data.lse.astype(np.float32),
        "seq_lengths": np.asarray(data.seq_lengths, dtype=np.int64),
    }
    combined = hashlib.sha256()
    for name in sorted(arrays):
        combined.update(f"{name}:{hashlib.sha256(arrays[name].tobytes()).hexdigest()}\n".encode())
    return combined.hexdigest()


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory, content: SegmentData) -> str:
    return build(tmp_path_factory.mktemp("good") / "s", content, [5, 6, 13])


@pytest.fixture(scope="module")
def finalized(tmp_path_factory: pytest.TempPathFactory, content: SegmentData) -> str:
    """`good`, finalized: with index.json and the consolidated manifest.parquet."""
    return build(tmp_path_factory.mktemp("finalized") / "s", content, [5, 6, 13], finalize=True)


def fresh_copy(good: str, tmp_path: Path) -> str:
    dst = tmp_path / "copy"
    shutil.copytree(good, dst)
    return str(dst)


def test_verify_good_store(good: str, content: SegmentData) -> None:
    report = verify(good)
    assert report.ok, report.errors
    assert report.errors == []
    assert report.tokens == TOKENS
    assert report.sequences == len(content.seq_lengths)
    assert report.segments_committed == report.segments_planned == 4
    assert report.complete
    assert report.digest == expected_digest(content)


def test_digest_independent_of_segment_split(tmp_path: Path, good: str, content: SegmentData) -> None:
    one = build(tmp_path / "one", content, [])
    other = build(tmp_path / "other", content, [1, 2, 3, 10, 17], chunk=100)
    digests = {verify(url).digest for url in (good, one, other)}
    assert len(digests) == 1 and None not in digests


def test_digest_changes_with_one_logp(tmp_path: Path, good: str, content: SegmentData) -> None:
    logp = content.topk_logp.copy()
    row = int(np.argmax(np.isfinite(logp[:, 3])))
    logp[row, 3] *= 1.25
    codec = LogProbCodec()
    assert codec.encode(logp[row, 3:4]) != codec.encode(content.topk_logp[row, 3:4])
    changed = SegmentData(**{**content.__dict__, "topk_logp": logp})
    url = build(tmp_path / "changed", changed, [5, 6, 13])
    report = verify(url)
    assert report.ok
    assert report.digest != verify(good).digest
    assert report.digest == expected_digest(changed)


# ------------------------------------------------------------------------------- corruption


def shard_path(url: str, segment: int, array: str) -> Path:
    (path,) = [p for p in (Path(url) / layout.segment_prefix(segment) / array / "c").rglob("*") if p.is_file()]
    return path


def shard_chunks(path: Path, n_chunks: int) -> list[tuple[int, int]]:
    """(offset, nbytes) of each inner chunk, from the shard index at the end of the file:
    n_chunks little-endian (uint64 offset, uint64 nbytes) pairs, then a 4-byte crc32c."""
    raw = path.read_bytes()
    index = np.frombuffer(raw[-(16 * n_chunks + 4) : -4], dtype="<u8").reshape(n_chunks, 2)
    return [(int(o), int(n)) for o, n in index]


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))


def segment_of(url: str, segment: int) -> tuple[int, int]:
    store = open_store(url)
    (span,) = [s for s, r in zip(store.segment_spans(), store.segments, strict=True) if r.segment == segment]
    return span


def test_flipped_byte_in_chunk(tmp_path: Path, good: str, content: SegmentData) -> None:
    url = fresh_copy(good, tmp_path)
    seg_start, seg_stop = segment_of(url, 2)  # segment 2: sequences 6..12, 350 tokens
    # topk_logp holds the stored slots (row_len per token) in chunks of CHUNK * K slots.
    row_len = (content.topk_ids[seg_start:seg_stop] >= 0).sum(axis=1)
    slot_starts = np.concatenate([[0], np.cumsum(row_len)])
    n_chunks = -(-int(slot_starts[-1]) // (CHUNK * K))
    path = shard_path(url, 2, "topk_logp")
    chunks = shard_chunks(path, n_chunks)
    assert n_chunks >= 3 and chunks[0][0] == 0 and all(n > 0 for _, n in chunks)
    j = 1
    offset, nbytes = chunks[j]
    flip_byte(path, offset + nbytes // 2)
    # The tokens with a slot in chunk j, then the CHUNK-token reads of verify that touch them.
    hit = np.flatnonzero((slot_starts[1:] > j * CHUNK * K) & (slot_starts[:-1] < (j + 1) * CHUNK * K))
    first, last = seg_start + int(hit[0]), seg_start + int(hit[-1]) + 1
    reads = [(a, min(a + CHUNK, seg_stop)) for a in range(seg_start, seg_stop, CHUNK)]
    damaged = [(a, b) for a, b in reads if a < last and b > first]

    report = verify(url)
    assert not report.ok
    assert report.digest is None
    assert len(report.errors) == len(damaged), report.errors
    for err, (a, b) in zip(report.errors, damaged, strict=True):
        assert "'topk_logp'" in err and f"tokens [{a}, {b})" in err

    store = open_store(url)
    with pytest.raises(CorruptDataError, match=rf"array 'topk_logp' of segment 2, tokens \[{first}, {last}\)"):
        store.read(first, last)
    with pytest.raises(CorruptDataError, match="'topk_logp'"):
        store.read(0, TOKENS)
    # The tokens before and after the damaged chunk still read.
    expected = concat([content])
    block = store.read(seg_start, first)
    np.testing.assert_array_equal(block.topk_logp, quantized(LogProbCodec(), expected["topk_logp"][seg_start:first]))
    np.testing.assert_array_equal(store.read(last, TOKENS).topk_ids, expected["topk_ids"][last:])


def test_flipped_byte_in_shard_index(tmp_path: Path, good: str) -> None:
    url = fresh_copy(good, tmp_path)
    path = shard_path(url, 1, "topk_logp")
    flip_byte(path, path.stat().st_size - 10)  # inside the index, before its crc32c
    report = verify(url)
    assert not report.ok
    assert report.errors and all("'topk_logp'" in e for e in report.errors)
    with pytest.raises(CorruptDataError, match="'topk_logp'"):
        open_store(url).read(0, TOKENS)


def test_truncated_shard(tmp_path: Path, good: str) -> None:
    url = fresh_copy(good, tmp_path)
    path = shard_path(url, 3, "topk_ids")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = verify(url)
    assert not report.ok
    assert report.errors and all("'topk_ids'" in e for e in report.errors)


@pytest.mark.parametrize("array", layout.SEGMENT_ARRAYS)
def test_missing_shard_is_an_error_never_zeros(tmp_path: Path, good: str, array: str) -> None:
    url = fresh_copy(good, tmp_path)
    shard_path(url, 0, array).unlink()
    report = verify(url)
    assert not report.ok
    assert report.errors and all(f"'{array}'" in e for e in report.errors), report.errors
    assert any("missing" in e for e in report.errors)
    store = open_store(url)
    with pytest.raises(CorruptDataError, match=f"'{array}'"):
        store.sequence(0) if array == "seq_offsets" else store.read(0, 10)


def test_missing_lse_names_segment_range(tmp_path: Path, good: str, content: SegmentData) -> None:
    url = fresh_copy(good, tmp_path)
    a, b = segment_of(url, 1)
    shard_path(url, 1, "lse").unlink()
    report = verify(url)
    assert not report.ok
    assert report.errors and all(f"array 'lse' of segment 1, tokens [{a}, {b})" in e for e in report.errors)
    # The undamaged segments still read, exactly.
    store = open_store(url)
    np.testing.assert_array_equal(store.read(0, a).lse, content.lse[:a])
    np.testing.assert_array_equal(store.read(b, TOKENS).lse, content.lse[b:])


# -------------------------------------------------------------------------------------- CLI


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_verify_json(good: str, content: SegmentData, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "verify", good, "--json")
    assert rc == 0, err
    report = json.loads(out)  # exactly one JSON object
    assert report["ok"] is True
    assert report["tokens"] == TOKENS
    assert report["sequences"] == len(content.seq_lengths)
    assert report["digest"] == expected_digest(content)
    assert report["errors"] == []


def test_cli_verify_text(good: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "verify", good)
    assert rc == 0
    assert ": ok, 900 tokens, 18 sequences, 4/4 segments, digest " in out


def test_cli_verify_corrupt(tmp_path: Path, good: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_copy(good, tmp_path)
    shard_path(url, 2, "lse").unlink()
    rc, out, _ = run_cli(capsys, "verify", url, "--json")
    assert rc != 0
    report = json.loads(out)
    assert report["ok"] is False and report["digest"] is None
    assert report["errors"] and all("'lse'" in e for e in report["errors"])

    rc, out, err = run_cli(capsys, "verify", url)
    assert rc == 1
    assert "FAILED" in out
    assert err.startswith("error: ") and "'lse'" in err
    assert "Traceback" not in err


def test_cli_info(good: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "info", good, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["tokens"] == TOKENS and info["sequences"] == 18
    assert info["segments_committed"] == info["segments_planned"] == 4 and info["complete"]
    assert info["meta"]["capture"]["k"] == K
    assert info["disk_bytes"] > 0 and info["bytes_per_token"] == pytest.approx(info["disk_bytes"] / TOKENS)

    rc, out, _ = run_cli(capsys, "info", good)
    assert rc == 0
    assert "900 tokens, 18 sequences, 4/4 segments committed" in out
    assert "INCOMPLETE" not in out


@pytest.mark.parametrize("command", ["info", "verify"])
def test_cli_bad_path(tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, command, str(tmp_path / "nope"))
    assert rc == 1
    assert err.startswith("error: ") and "no such directory" in err
    assert err.count("\n") == 1  # one line
    assert "Traceback" not in err


def test_cli_bad_metadata_one_line(tmp_path: Path, good: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_copy(good, tmp_path)
    path = Path(url) / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["logitstore"]["capture"]["k"] = 0
    path.write_text(json.dumps(doc))
    rc, _, err = run_cli(capsys, "info", url)
    assert rc == 1
    assert err.startswith("error: ") and "invalid store metadata" in err
    assert err.count("\n") == 1


def test_cli_entry_point_subprocess(tmp_path: Path, good: str) -> None:
    exe = Path(sys.executable).with_name("logitstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "logitstore.cli"]
    ok = subprocess.run([*cmd, "verify", good, "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    bad = subprocess.run([*cmd, "info", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert bad.stdout == ""


# ------------------------------------------------------------------------ older store formats

FORMAT1 = Path(__file__).parents[1] / "data" / "format1-sampled"  # padded [n, K] slot arrays, no row_len


def test_format1_store_reads_as_its_writer_read_it(tmp_path: Path) -> None:
    recorded = json.loads(FORMAT1.with_suffix(".json").read_text())["digest"]  # by format 1's own verify
    report = verify(str(FORMAT1))
    assert report.ok and report.complete, report.errors
    assert report.digest == recorded
    assert len(report.notes) == 1 and "manifest.parquet has no sha256" in report.notes[0]  # finalized before it
    store = open_store(str(FORMAT1))
    assert store.meta.format_version == 1 and store.meta.capture.mode == "sampled"
    block = store.read(0, store.num_tokens)
    assert (block.topk_ids == -1).any() and np.array_equal(block.counts == 0, block.topk_ids == -1)

    # This writer does not add format-2 segments to it; it says why.
    url = shutil.copytree(FORMAT1, tmp_path / "s")
    with pytest.raises(LogitStoreError, match="store format 1, and this logitstore writes format 2"):
        StoreWriter.resume(str(url), store.meta.model_copy(update={"format_version": 2}))


# --------------------------------------------------------------------------------- manifests


def column_chunk_middle(path: Path, column: str) -> int:
    """Offset of the middle byte of one column's chunk (first row group) in a Parquet file."""
    group = pq.ParquetFile(path).metadata.row_group(0)
    (chunk,) = [group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == column]
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    return start + chunk.total_compressed_size // 2


def set_index(url: str, change: Callable[[dict], None]) -> None:
    path = Path(url) / layout.INDEX_KEY
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def test_finalize_records_manifest_sha256(finalized: str, good: str) -> None:
    index = json.loads((Path(finalized) / layout.INDEX_KEY).read_text())
    manifest = (Path(finalized) / layout.MANIFEST_KEY).read_bytes()
    assert index["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    report = verify(finalized)
    assert report.ok and report.complete and report.notes == [], report.errors
    assert report.digest == verify(good).digest


@pytest.mark.parametrize(("store", "key"), [("finalized", "manifest.parquet"),
                                            ("finalized", "segments/000001/manifest.parquet"),
                                            ("good", "segments/000001/manifest.parquet")])
def test_flipped_byte_in_manifest(tmp_path: Path, request: pytest.FixtureRequest, store: str, key: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_copy(request.getfixturevalue(store), tmp_path)
    path = Path(url) / key
    flip_byte(path, column_chunk_middle(path, "source"))  # the documents' provenance
    report = verify(url)
    assert not report.ok and report.digest is None
    assert report.errors and all("manifest.parquet" in e for e in report.errors), report.errors
    if key.startswith("segments/"):
        assert "file 'manifest.parquet' of segment 1" in report.errors[0]
    rc, out, err = run_cli(capsys, "verify", url)
    assert rc == 1 and "FAILED" in out
    assert err.startswith("error: ") and "Traceback" not in err


def test_manifest_that_disagrees_with_the_segments(tmp_path: Path, finalized: str) -> None:
    """Valid Parquet with a recorded sha256 that matches, but other provenance than the segments'."""
    url = fresh_copy(finalized, tmp_path)
    path = Path(url) / layout.MANIFEST_KEY
    manifest = pq.read_table(path)
    sources = manifest.column("source").to_pylist()
    sources[3] = "elsewhere.txt:1"
    path.write_bytes(layout.parquet_bytes(manifest.set_column(4, "source", pa.array(sources))))
    set_index(url, lambda index: index.update(manifest_sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    report = verify(url)
    assert not report.ok
    assert [e for e in report.errors if "disagrees with the segments' manifests" in e and "source" in e], report.errors


def test_segment_manifest_that_does_not_tile_its_sequences(tmp_path: Path, good: str) -> None:
    url = fresh_copy(good, tmp_path)
    path = Path(url) / layout.segment_manifest_key(2)
    pieces = pq.read_table(path)
    num = pieces.column("num_tokens").to_pylist()
    num[0] -= 1  # a token of the sequence belongs to no document
    path.write_bytes(layout.parquet_bytes(pieces.set_column(2, "num_tokens", pa.array(num, pa.int32()))))
    report = verify(url)
    assert not report.ok
    assert len(report.errors) == 1 and "file 'manifest.parquet' of segment 2" in report.errors[0]
    assert "do not tile" in report.errors[0]


def test_store_finalized_before_the_manifest_sha256_verifies_with_a_note(tmp_path: Path, finalized: str) -> None:
    url = fresh_copy(finalized, tmp_path)
    set_index(url, lambda index: index.pop("manifest_sha256"))
    report = verify(url)
    assert report.ok and report.complete, report.errors
    assert len(report.notes) == 1 and "manifest.parquet has no sha256" in report.notes[0]
    # Without the sha256 the contents are still checked.
    path = Path(url) / layout.MANIFEST_KEY
    flip_byte(path, column_chunk_middle(path, "source"))
    assert not verify(url).ok


# ------------------------------------------------------------------ damaged index and commits


def _set_segments(index: dict, segments: object) -> None:
    index["segments"] = segments


DAMAGED_INDEX: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "not JSON": lambda raw: b"<html>502 Bad Gateway</html>",
    "not UTF-8": lambda raw: b"\xff\xfe\x00{",
    "a list": lambda raw: b"[1, 2]",
    "segments not a list": lambda raw: json.dumps({"segments": 4}).encode(),
    "tokens a string": lambda raw: raw.replace(b'"tokens": 350', b'"tokens": "350"'),
    "a key missing": lambda raw: raw.replace(b'"sequences": 7,', b""),
    "a segment missing": lambda raw: json.dumps({"segments": json.loads(raw)["segments"][:3]}).encode(),
}


@pytest.mark.parametrize("damage", list(DAMAGED_INDEX))
def test_damaged_index_json_is_an_error_not_a_traceback(tmp_path: Path, finalized: str, damage: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_copy(finalized, tmp_path)
    path = Path(url) / layout.INDEX_KEY
    raw = path.read_bytes()
    path.write_bytes(DAMAGED_INDEX[damage](raw))
    assert path.read_bytes() != raw
    with pytest.raises(CorruptDataError, match=r"index\.json is damaged"):
        open_store(url)
    report = verify(url)
    assert not report.ok and len(report.errors) == 1 and "index.json is damaged" in report.errors[0]
    for command in ("verify", "info"):
        rc, _, err = run_cli(capsys, command, url)
        assert rc == 1
        assert err.startswith("error: ") and "index.json is damaged" in err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_finalize_again_repairs_index_and_manifest(tmp_path: Path, finalized: str) -> None:
    url = fresh_copy(finalized, tmp_path)
    (Path(url) / layout.INDEX_KEY).write_bytes(b"{")
    manifest = Path(url) / layout.MANIFEST_KEY
    flip_byte(manifest, column_chunk_middle(manifest, "source"))
    StoreWriter.resume(url, make_meta(num_segments=4, k=K, chunk_tokens=CHUNK)).finalize()
    report = verify(url)
    assert report.ok and report.notes == [], report.errors
    assert report.digest == verify(finalized).digest
    assert manifest.read_bytes() == (Path(finalized) / layout.MANIFEST_KEY).read_bytes()


def test_damaged_commit_record_is_an_error(tmp_path: Path, good: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = fresh_copy(good, tmp_path)
    (Path(url) / layout.commit_key(2)).write_text('{"segment": 2, "tokens": "x"')
    with pytest.raises(CorruptDataError, match=r"commits/000002\.json is damaged"):
        open_store(url)
    rc, _, err = run_cli(capsys, "verify", url)
    assert rc == 1 and err.startswith("error: ") and "commits/000002.json is damaged" in err
    assert err.count("\n") == 1


def test_commit_record_that_disagrees_with_the_index(tmp_path: Path, finalized: str) -> None:
    """Readers of a finalized store use index.json; verify compares it with the commit records."""
    url = fresh_copy(finalized, tmp_path)
    path = Path(url) / layout.commit_key(1)
    path.write_text(json.dumps({**json.loads(path.read_text()), "sequences": 2}))
    report = verify(url)
    assert not report.ok
    assert len(report.errors) == 1, report.errors
    assert "index.json lists" in report.errors[0] and "commits/000001.json" in report.errors[0]


# ---------------------------------------------------------------------------- incomplete store


def test_incomplete_store_is_not_ok(tmp_path: Path, content: SegmentData, capsys: pytest.CaptureFixture[str]) -> None:
    segments = split(content, [5, 6, 13])
    url = write_store(tmp_path / "s", make_meta(num_segments=4, k=K, chunk_tokens=CHUNK), segments[:2])
    report = verify(url)
    assert report.ok and not report.complete and report.status == "INCOMPLETE", report.errors
    rc, out, err = run_cli(capsys, "verify", url)
    assert rc == 2 and err == ""
    assert ": INCOMPLETE (resume the capture), 300 tokens, 6 sequences, 2/4 segments" in out
    rc, out, _ = run_cli(capsys, "verify", url, "--json")
    report = json.loads(out)
    assert rc == 2 and report["complete"] is False and report["status"] == "INCOMPLETE" and report["ok"] is True

    shard_path(url, 1, "lse").unlink()  # damage outranks incompleteness
    rc, out, _ = run_cli(capsys, "verify", url)
    assert rc == 1 and "FAILED" in out


# --------------------------------------------------------------------------- --token, describe


@pytest.mark.parametrize("command", ["info", "verify"])
def test_cli_token_on_a_local_store(good: str, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, command, good, "--token", "some-key")
    assert rc == 1 and out == ""
    assert err.startswith("error: a token (--token, token=)") and "http(s)://" in err
    assert err.count("\n") == 1


def test_store_describe_is_what_info_prints(good: str, capsys: pytest.CaptureFixture[str]) -> None:
    d = open_store(good).describe()
    assert set(d) == {"url", "tokens", "sequences", "segments_committed", "segments_planned", "complete", "meta",
                      "disk_bytes", "bytes_per_token"}
    assert d == describe(good)
    rc, out, _ = run_cli(capsys, "info", good, "--json")
    assert rc == 0 and json.loads(out) == d


def test_no_zarr_user_warning(tmp_path: Path, content: SegmentData) -> None:
    """Zarr warned once per array written or opened that pcodec is not in the Zarr v3 spec."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        url = build(tmp_path / "s", content, [5], finalize=True)
        assert verify(url).ok
    assert not [w for w in caught if issubclass(w.category, ZarrUserWarning)]
