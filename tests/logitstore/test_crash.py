"""Crash safety: a writer SIGKILLed at any instant leaves a readable store of committed
segments, and resume + collect_garbage finishes it into the same content as an
uninterrupted run."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from store_helpers import fast_segment, make_meta, quantized

from logitstore import layout
from logitstore.codecs import LogProbCodec
from logitstore.reader import open_store
from logitstore.verify import verify
from logitstore.writer import SegmentData, StoreWriter

SEGMENTS = 4
TOKENS = 20_000
K = 32
CHUNK = 2048
SEED = 12345
TRIALS = 6
MAX_TRIALS = 10  # more only if none of the first TRIALS landed inside a segment write

HELPERS_DIR = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from store_helpers import fast_segment, make_meta
    from logitstore.writer import StoreWriter

    url, seed, segments, tokens, k, chunk = sys.argv[2], *map(int, sys.argv[3:8])
    writer = StoreWriter.create(url, make_meta(num_segments=segments, k=k, chunk_tokens=chunk))
    print("created", flush=True)
    for i in range(segments):
        data = fast_segment(seed + i, tokens, k=k, seq_len=1000, padding=i % 2 == 1)
        print(f"segment {i}", flush=True)
        writer.write_segment(i, data)
        print(f"committed {i}", flush=True)
    print("done", flush=True)
    """
)


def meta():
    return make_meta(num_segments=SEGMENTS, k=K, chunk_tokens=CHUNK)


@functools.cache
def segment_data(i: int) -> SegmentData:
    """What the child writes as segment i (same call, same seed)."""
    return fast_segment(SEED + i, TOKENS, k=K, seq_len=1000, padding=i % 2 == 1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, float]:
    """An uninterrupted run: its verify digest, and how long generating + writing took."""
    url = str(tmp_path_factory.mktemp("reference") / "s")
    t0 = time.perf_counter()
    writer = StoreWriter.create(url, meta())
    for i in range(SEGMENTS):
        writer.write_segment(i, segment_data(i))
    elapsed = time.perf_counter() - t0
    report = verify(url)
    assert report.ok and report.complete, report.errors
    assert report.tokens == SEGMENTS * TOKENS
    return report.digest, elapsed


def run_and_kill(script: Path, url: str, delay: float) -> list[str]:
    """Start the child, wait until it has created the store, SIGKILL it `delay` s later."""
    args = [sys.executable, str(script), str(HELPERS_DIR), url, str(SEED), str(SEGMENTS), str(TOKENS), str(K),
            str(CHUNK)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()
        assert first == "created", f"child failed before creating the store: {first!r} {proc.stderr.read()}"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return [first, *proc.stdout.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def check_visible(url: str) -> int:
    """Every committed segment reads back exactly what the child meant to write; returns their count."""
    store = open_store(url)
    committed = [r.segment for r in store.segments]
    assert committed == list(range(len(committed))), "segments are committed in order by this child"
    assert store.complete == (len(committed) == SEGMENTS)
    assert store.num_tokens == TOKENS * len(committed)
    codec = LogProbCodec()
    for (a, b), i in zip(store.segment_spans(), committed, strict=True):
        want = segment_data(i)
        block = store.read(a, b)
        np.testing.assert_array_equal(block.input_ids, want.input_ids)
        np.testing.assert_array_equal(block.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(block.topk_logp, quantized(codec, want.topk_logp))
        np.testing.assert_array_equal(block.lse, want.lse)
    lengths = [segment_data(i).seq_lengths for i in committed]
    np.testing.assert_array_equal(store.sequence_lengths(), np.concatenate(lengths) if lengths else [])
    return len(committed)


def test_sigkill_at_random_points(tmp_path: Path, reference: tuple[str, float]) -> None:
    ref_digest, write_time = reference
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(2024)
    # Stratified delays: one per slice of the (in-process) write time, plus some slack for a
    # slower child, so kills land early, late, and in between.
    span = 1.15 * write_time
    delays = list((np.arange(TRIALS) + rng.uniform(size=TRIALS)) / TRIALS * span)
    outcomes = []
    trial = 0
    while trial < len(delays):
        url = str(tmp_path / f"trial{trial}")
        lines = run_and_kill(script, url, delays[trial])
        assert (Path(url) / "zarr.json").exists()

        visible = check_visible(url)
        report = verify(url)
        assert report.ok, report.errors
        assert report.segments_committed == visible and report.tokens == visible * TOKENS

        writer = StoreWriter.resume(url, meta())
        assert writer.committed() == set(range(visible))
        removed = writer.collect_garbage()
        # Only the segment being written when the kill landed can have left a directory behind.
        assert removed in ([], [visible])
        assert not any((Path(url) / layout.segment_prefix(i)).exists() for i in range(visible, SEGMENTS))
        for i in range(visible, SEGMENTS):
            writer.write_segment(i, segment_data(i))
        writer.finalize()
        report = verify(url)
        assert report.ok and report.complete, report.errors
        assert report.digest == ref_digest

        mid_segment = f"segment {visible}" in lines  # killed inside write_segment(visible)
        outcomes.append((round(delays[trial], 3), visible, mid_segment, removed))
        trial += 1
        if trial == len(delays) and not any(o[2] for o in outcomes) and trial < MAX_TRIALS:
            delays.append(float(rng.uniform(0.2, 0.8) * span))
    assert any(o[2] for o in outcomes), f"no kill landed inside a segment write: {outcomes}"
