"""`--fsdp` (FSDP2) under a real torchrun on CPU (gloo): the same training as one process with the
whole batch, sharded checkpoints that resume exactly after a rank is SIGKILLed, and a final/
that `from_pretrained` loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.trainer.test_train import _free_port, metrics, write_student_config
from trainer.cli import main as train_main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def student_config(tmp_path_factory) -> Path:
    # Two decoder layers: two FSDP units besides the root.
    return write_student_config(tmp_path_factory.mktemp("student") / "student.json", num_hidden_layers=2)


def torchrun(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "trainer", *args, "--fsdp", "--no-progress"]  # fmt: skip
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def run(args: list[str]) -> None:
    proc = torchrun(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def test_fsdp_two_processes_equal_one_process_with_twice_the_batch(tiny_store, student_config, tmp_path):
    """As for DDP: 2 ranks with batch B train like 1 process with 2B (with gradient checkpointing
    inside the FSDP units, which recomputes the same activations). alpha 0: every rank counts the
    same tokens, so the mean of the ranks' means is the whole batch's mean (with alpha > 0 the
    labelled tokens, fewer at sequence ends, would fall unevenly between the ranks)."""
    common = ["--store", tiny_store, "--student", str(student_config), "--steps", "4", "--seq-len", "32",
              "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "2", "--log-every", "1", "--device", "cpu",
              "--temperature", "2"]  # fmt: skip
    run([*common, "--batch-size", "2", "--grad-checkpointing", "--out", str(tmp_path / "fsdp")])
    assert train_main([*common, "--batch-size", "4", "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    for x, y in zip(metrics(tmp_path / "fsdp"), metrics(tmp_path / "one"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert (tmp_path / "fsdp" / "checkpoints" / "step_00000004" / "sharded").is_dir()


@pytest.mark.slow
def test_a_sigkilled_rank_resumes_to_the_uninterrupted_result(tiny_store, student_config, tmp_path):
    args = ["--store", tiny_store, "--student", str(student_config), "--steps", "12", "--batch-size", "2",
            "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--save-every", "4",
            "--device", "cpu"]  # fmt: skip
    killed = tmp_path / "killed"
    proc = torchrun([*args, "--out", str(killed)])
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "step_00000004").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a rank could be killed"
        time.sleep(0.01)
    ranks = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) == proc.pid]
    os.kill(ranks[-1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (killed / "final").exists()
    run([*args, "--out", str(killed), "--resume"])
    run([*args, "--out", str(tmp_path / "full")])
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(tmp_path / "full")]
    a = AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError):
        return None
