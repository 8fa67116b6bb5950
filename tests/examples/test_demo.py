"""`make demo`'s script, end to end at toy size: a real server on a loopback port, uploads,
captures and training over HTTP, the report, and a clean server stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end_and_ends_with_the_report_path(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    student = tmp_path / "student.json"
    LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True).to_json_file(str(student))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "examples/demo.py", "--teacher", str(tiny_teacher_dir), "--student", str(student),
         "--tokens", "640", "--heldout-tokens", "256", "--steps", "5", "--seq-len", "32", "--batch-size", "2",
         "--max-len", "64", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = Path(lines[-1])
    assert report == out / "report.md" and report.is_file()
    text = report.read_text()
    assert "| train | 640 |" in text and "| heldout | 256 |" in text
    assert "KL(teacher ‖ student)" in text and "![curves](run/curves.png)" in text
    # The train store takes the default capture settings (the request names none); the held-out one is top-64.
    assert "default capture settings: sampled: the distinct ids of 64 draws from the teacher (counts only)" in text
    assert "The held-out store: topk: the 64 likeliest ids" in text
    assert (out / "run" / "curves.png").stat().st_size > 1000
    assert (out / "run" / "final" / "config.json").is_file()
    assert any(line.startswith("demo: server stopped (exit status 0)") for line in lines), proc.stdout


def test_demo_failure_is_one_clear_line_and_stops_the_server(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "examples/demo.py", "--teacher", str(tmp_path / "no-such-teacher"), "--tokens", "64",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("demo: error: ")
    assert "Traceback" not in proc.stderr
    assert "demo: server stopped" in proc.stdout


def test_sigterm_stops_the_server_too(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """A killed demo (Ctrl-C, `kill`, a CI timeout) leaves no server behind on its port."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "examples/demo.py", "--teacher", str(tiny_teacher_dir), "--tokens", "640",
         "--heldout-tokens", "256", "--steps", "100000", "--seq-len", "32", "--max-len", "64",
         "--out", str(tmp_path / "demo")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    url = None
    for line in proc.stdout:
        if line.startswith("demo: server up at "):
            url = line.split()[4]
        if line.startswith("demo: training"):
            break
    assert url is not None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "demo: interrupted" in err
    assert "demo: server stopped" in out
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=5)
