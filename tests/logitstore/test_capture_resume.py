"""Never lose a capture: a real `logitstore capture` process SIGKILLed at several points
resumes (`--resume`) to the uninterrupted run's digest; resuming with different settings is
refused with the differing field named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from logitstore import open_store
from logitstore.capture.engine import capture
from logitstore.capture.teacher import load_teacher
from logitstore.cli import main as cli_main
from logitstore.errors import LogitStoreError
from logitstore.spec import CaptureSpec, CaptureTuning
from logitstore.verify import verify
from tests.logitstore.processes import sigkill_after_commits

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare.txt"
SPEC = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=64, max_tokens=768)
TUNING = CaptureTuning(unit_tokens=64)
CLI_ARGS = ["--mode", "topk", "--k", "8", "--temperatures", "1,2", "--max-len", "64", "--max-tokens", "768",
            "--unit-tokens", "64", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir), device="cpu")


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher, tmp_path_factory) -> tuple[str, int]:
    store = capture(tiny_teacher, [CORPUS], str(tmp_path_factory.mktemp("ref") / "s"), SPEC, tuning=TUNING)
    return verify(store.url).digest, store.meta.num_segments


def kill_after_commits(teacher_dir: Path, out: Path, commits: int) -> int:
    """Start `logitstore capture`, SIGKILL it once `commits` commit records exist (0: once the
    store exists); returns how many were committed when the kill landed."""
    args = [sys.executable, "-m", "logitstore.cli", "capture", "--teacher", str(teacher_dir), "--corpus",
            str(CORPUS), "--out", str(out), *CLI_ARGS]
    return sigkill_after_commits(args, out, commits)


@pytest.mark.slow
@pytest.mark.parametrize("commits", [0, 2, 7])
def test_sigkilled_capture_resumes_to_the_same_digest(tiny_teacher_dir, tiny_teacher, uninterrupted, tmp_path,
                                                      commits):
    digest, planned = uninterrupted
    out = tmp_path / "s"
    committed = kill_after_commits(tiny_teacher_dir, out, commits)
    assert commits <= committed < planned
    killed = open_store(str(out))
    assert not killed.complete and len(killed.segments) == committed
    assert verify(str(out)).ok  # what is visible after a kill is valid
    resumed = capture(tiny_teacher, [CORPUS], str(out), SPEC, tuning=TUNING, resume=True)
    assert resumed.complete and verify(resumed.url).digest == digest
    assert not any(p.name.endswith(".tmp") for p in (out / "commits").iterdir())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(k=9), "capture.k"),
        (dict(temperatures=(1.0, 3.0)), "capture.temperatures"),
        (dict(mode="sampled", draws=20), "capture.mode"),
        (dict(max_tokens=150), "corpus.tokens"),
    ],
)
def test_resume_refuses_different_settings(tiny_teacher, tmp_path, change, field):
    out = str(tmp_path / "s")
    base = dict(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=64, max_tokens=200)
    tuning = CaptureTuning(unit_tokens=1000)
    capture(tiny_teacher, [CORPUS], out, CaptureSpec(**base), tuning=tuning)
    with pytest.raises(LogitStoreError, match=rf"refusing to mix them: .*{field}"):
        capture(tiny_teacher, [CORPUS], out, CaptureSpec(**base | change), tuning=tuning, resume=True)


def test_resume_refuses_another_teacher_or_corpus(tiny_teacher_dir, tiny_teacher_dir_factory, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["capture", "--corpus", str(CORPUS), "--out", str(out), "--mode", "topk", "--k", "4", "--max-len", "32",
            "--max-tokens", "100", "--device", "cpu", "--no-progress"]
    assert cli_main([*base, "--teacher", str(tiny_teacher_dir)]) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    other_teacher = tiny_teacher_dir_factory(1)  # same architecture and tokenizer, other weights
    assert cli_main([*base, "--teacher", str(other_teacher), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "teacher.weights_sha256" in err
    assert "teacher.source" in err and "tokenizer.fingerprint" not in err

    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("A different corpus.\n\nWith two documents, long enough to make a hundred tokens. " * 20)
    args = [a if a != str(CORPUS) else str(other_corpus) for a in base]
    assert cli_main([*args, "--teacher", str(tiny_teacher_dir), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "corpus.fingerprint" in err and "corpus.sources" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing touched
