"""`--report-to tensorboard`: real `logitstore-train` runs on a tiny real store; the event files
are read back with TensorBoard's own reader and must hold exactly what metrics.jsonl holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from tests.trainer.test_cli import REPO, metrics, run_args
from tests.trainer.test_train import write_student_config
from trainer.checkpoint import checkpoints
from trainer.cli import main


@pytest.fixture(scope="module")
def student_config(tmp_path_factory) -> Path:
    return write_student_config(tmp_path_factory.mktemp("student") / "student.json")


def scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in OUT/tensorboard, as TensorBoard shows them."""
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={SCALARS: 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by key, rounded to float32 as an event file stores them."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in metrics(out):
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], float(np.float32(value))))
    return expected


def test_tensorboard_holds_the_metrics_records_and_resume_keeps_appending(
    tiny_store, student_config, heldout_text, tmp_path
):
    """Training records every step and evaluations at steps 3 and 6 go to both metrics.jsonl and
    OUT/tensorboard. A run killed after its step-3 checkpoint (what was written after it is left
    in the event file) and resumed appends a second event file; TensorBoard then shows each step
    once, with the values metrics.jsonl keeps."""
    full = tmp_path / "full"
    argv = [*run_args(tiny_store, student_config, full, steps=6), "--save-every", "3", "--eval-every", "3",
            "--eval-text", str(heldout_text), "--report-to", "tensorboard"]  # fmt: skip
    assert main(argv) == 0
    records = metrics(full)
    assert {"loss", "kd_loss", "ce_loss", "lr", "tokens_per_s", "eval_ppl"} <= {k for r in records for k in r}
    assert [r["step"] for r in records if "eval_ppl" in r] == [3, 6]
    assert scalars(full) == expected_scalars(full)
    assert len(list((full / "tensorboard").iterdir())) == 1

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    shutil.rmtree(cut / "final")
    assert [p.name for p in checkpoints(cut)] == ["step_00000003"]
    resume = [str(cut) if a == str(full) else a for a in argv]
    assert main([*resume, "--resume"]) == 0
    assert [r["step"] for r in metrics(cut) if "loss" in r] == list(range(1, 7))
    assert [r.get("loss") for r in metrics(cut)] == [r.get("loss") for r in records]  # resume is exact
    assert len(list((cut / "tensorboard").iterdir())) == 2  # appended, the earlier file kept
    assert scalars(cut) == expected_scalars(cut)


def test_without_report_to_nothing_imports_or_writes_tensorboard(tiny_store, student_config, tmp_path):
    """The default (--report-to none): no OUT/tensorboard, and the tensorboard package is not
    imported (a process of its own, since this one has imported it)."""
    out = tmp_path / "run"
    script = (
        "import sys\n"
        "from trainer.cli import main\n"
        f"assert main({run_args(tiny_store, student_config, out, steps=2)!r}) == 0\n"
        "assert 'tensorboard' not in sys.modules and 'torch.utils.tensorboard' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert not (out / "tensorboard").exists()


def test_report_to_in_a_config_file_and_as_one_string(tiny_store, student_config, tmp_path):
    """`report_to = "tensorboard"` in --config (one string, as HF Trainer takes it) is a list of one."""
    config = tmp_path / "run.toml"
    config.write_text('report_to = "tensorboard"\n')
    out = tmp_path / "run"
    assert main([*run_args(tiny_store, student_config, out, steps=2), "--config", str(config)]) == 0
    assert scalars(out) == expected_scalars(out)
    assert json.loads((out / "config.json").read_text())["report_to"] == ["tensorboard"]
