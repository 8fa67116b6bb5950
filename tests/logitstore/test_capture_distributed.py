"""Multi-process capture through a real torchrun (`logitstore capture --gpus 2`, two CPU
processes on gloo): the store equals a one-process capture, resume works across ranks, and a
failure is one line per rank plus one from the launcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from logitstore import open_store
from logitstore.capture.engine import capture
from logitstore.capture.teacher import load_teacher
from logitstore.spec import CaptureSpec, CaptureTuning
from logitstore.verify import verify
from tests.logitstore.store_helpers import assert_same_soft_labels

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare.txt"
SPEC = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=64, max_tokens=600)
TUNING = CaptureTuning(unit_tokens=100)


def cli_capture(teacher_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "logitstore.cli", "capture", "--gpus", "2", "--teacher", str(teacher_dir),
            "--corpus", str(CORPUS), "--out", str(out), "--mode", "topk", "--k", "8", "--temperatures", "1,2",
            "--max-len", "64", "--max-tokens", "600", "--unit-tokens", "100", "--device", "cpu", "--no-progress",
            *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_equal_one_and_resume(tiny_teacher_dir, tmp_path):
    one = capture(load_teacher(str(tiny_teacher_dir), device="cpu"), [CORPUS], str(tmp_path / "one"),
                  SPEC, tuning=TUNING)
    want = verify(one.url).digest
    assert one.meta.num_segments >= 6  # enough units that both ranks write several

    two = tmp_path / "two"
    proc = cli_capture(tiny_teacher_dir, two)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("600 tokens") == 1  # only rank 0 reports
    report = verify(str(two))
    assert report.ok and report.complete and report.digest == want

    # Lose one unit of each rank (as if both were killed before committing), then resume on 2 ranks.
    for i in (2, 3):
        (two / "commits" / f"{i:06d}.json").unlink()
    (two / "index.json").unlink()
    assert not open_store(str(two)).complete
    proc = cli_capture(tiny_teacher_dir, two, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert verify(str(two)).digest == want

    # A store that exists without --resume: the launcher refuses, in one line, before any rank starts.
    proc = cli_capture(tiny_teacher_dir, two)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "already holds a store" in errors[0] and "--resume" in errors[0]
    assert "Loading weights" not in proc.stderr


@pytest.mark.slow
def test_a_failure_on_the_ranks_is_reported_once_per_rank_and_by_the_launcher(tiny_teacher_dir, tmp_path):
    """A teacher whose config reads but whose weights do not load passes the launcher's checks
    and fails on every rank: one line per rank, then the launcher's line naming them."""
    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_teacher_dir / name).exists():
            (broken / name).write_bytes((tiny_teacher_dir / name).read_bytes())
    proc = cli_capture(broken, tmp_path / "out")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(errors) == 3 and "rank(s) [0, 1]" in errors[-1], proc.stderr[-2000:]


@pytest.mark.slow
def test_a_tensor_parallel_teacher_gives_the_one_process_store(tiny_teacher_dir, tmp_path):
    """`--tp 2`: the teacher sharded over two gloo processes (transformers' tp_plan) writes the store
    of the unsharded teacher, up to the rounding of its split matmuls: same fingerprint, ids and
    sequences; log-probs within one quantization step; lse within 1e-5."""
    one = capture(load_teacher(str(tiny_teacher_dir), device="cpu"), [CORPUS], str(tmp_path / "one"),
                  SPEC, tuning=TUNING)
    args = [sys.executable, "-m", "logitstore.cli", "capture", "--tp", "2", "--teacher", str(tiny_teacher_dir),
            "--corpus", str(CORPUS), "--out", str(tmp_path / "tp"), "--mode", "topk", "--k", "8", "--temperatures",
            "1,2", "--max-len", "64", "--max-tokens", "600", "--unit-tokens", "100", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("600 tokens") == 1  # rank 0 alone writes and reports
    tp = open_store(str(tmp_path / "tp"))
    assert verify(tp.url).ok and tp.meta.teacher == one.meta.teacher and len(tp.segments) == len(one.segments)
    assert_same_soft_labels(tp, one, TUNING.logp_codec)
