"""`logitstore-train` as a user meets it: refusals before anything is loaded or lost, Ctrl-C,
`--help` without torch. Every run is the real CLI (`trainer.cli.main` or a subprocess) on a
tiny real store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

from trainer.checkpoint import checkpoints
from trainer.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def student_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("student") / "student.json"
    LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True).to_json_file(str(path))
    return path


def run_args(store: str, student: Path, out: Path, steps: int = 3) -> list[str]:
    return ["--store", store, "--student", str(student), "--out", str(out), "--steps", str(steps), "--batch-size", "2",
            "--seq-len", "16", "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1", "--device", "cpu",
            "--no-progress"]  # fmt: skip


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_resume_without_a_checkpoint_is_refused_and_deletes_nothing(tiny_store, student_config, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    earlier = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n'
    (out / "metrics.jsonl").write_text(earlier)
    assert main([*run_args(tiny_store, student_config, out), "--resume"]) == 1
    err = one_line_error(capsys)
    assert "--resume" in err and "no checkpoint" in err
    assert (out / "metrics.jsonl").read_text() == earlier
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]


def test_ctrl_c_writes_a_checkpoint_that_resume_continues_exactly(tiny_store, student_config, tmp_path):
    """SIGINT to a real `logitstore-train` process after its first step: it finishes the step, writes
    a checkpoint, says --resume, exits 130; the resumed run equals an uninterrupted one. Every run
    is a process with one thread: the weights are compared bit for bit."""
    steps = 20
    interrupted, full = tmp_path / "interrupted", tmp_path / "full"
    argv = [*run_args(tiny_store, student_config, interrupted, steps=steps), "--save-every", "0"]
    command = [sys.executable, "-m", "trainer"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*command, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((interrupted / "metrics.jsonl").exists() and (interrupted / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    [saved] = checkpoints(interrupted)  # --save-every 0: only the end would have written one
    step = int(saved.name.removeprefix("step_"))
    assert 1 <= step < steps, "the run finished before the signal arrived"
    assert f"wrote {saved}" in err and "--resume" in err.strip().splitlines()[-1]
    assert not (interrupted / "final").exists()
    assert [r["step"] for r in metrics(interrupted)] == list(range(1, step + 1))

    subprocess.run([*command, *argv, "--resume"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*command, *run_args(tiny_store, student_config, full, steps=steps), "--save-every", "0"],
                   env=env, check=True, capture_output=True, timeout=300)  # fmt: skip
    assert [r["loss"] for r in metrics(interrupted)] == [r["loss"] for r in metrics(full)]
    a = AutoModelForCausalLM.from_pretrained(interrupted / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    assert all(a[k].equal(b[k]) for k in a)


def test_save_every_past_the_end_is_clamped_and_the_run_resumes(tiny_store, student_config, tmp_path):
    """A run shorter than the default --save-every 500 records the value it followed (--steps), and
    its checkpoint is one --resume accepts."""
    out = tmp_path / "run"
    assert main(run_args(tiny_store, student_config, out, steps=3)) == 0
    assert json.loads((out / "config.json").read_text())["save_every"] == 3
    assert [p.name for p in checkpoints(out)] == ["step_00000003"]
    assert main([*run_args(tiny_store, student_config, out, steps=3), "--resume"]) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


@pytest.mark.parametrize("case", ["missing", "empty", "suffix", "not_utf8"])
def test_a_bad_eval_text_is_refused_before_training(case, tiny_store, student_config, tmp_path, capsys):
    path = tmp_path / {"suffix": "heldout.csv"}.get(case, "heldout.txt")
    contents = {"empty": b"\n \n", "suffix": b"a,b\n", "not_utf8": b"\xff\xfe held out\n"}
    if case in contents:
        path.write_bytes(contents[case])
    out = tmp_path / "run"
    assert main([*run_args(tiny_store, student_config, out), "--eval-text", str(path)]) == 1
    err = one_line_error(capsys)
    assert "--eval-text" in err and str(path) in err
    assert not out.exists()  # refused before the first step


def test_a_failing_final_evaluation_keeps_final(tiny_store, student_config, tmp_path, capsys):
    """The held-out file's first paragraph reads (so the check up front passes), a later one does
    not: the final evaluation fails, after final/ was written."""
    heldout = tmp_path / "heldout.txt"
    heldout.write_bytes(b"A first paragraph that reads.\n\n\xff\xfe a second that does not\n")
    out = tmp_path / "run"
    assert main([*run_args(tiny_store, student_config, out), "--eval-text", str(heldout)]) == 1
    assert "not valid UTF-8" in one_line_error(capsys)
    AutoModelForCausalLM.from_pretrained(out / "final")
    assert [p.name for p in checkpoints(out)] == ["step_00000003"]


@pytest.mark.parametrize(
    ("extra", "config", "message"),
    [
        (["--token", "KEY"], None, "--token is the API key of a store served by logitstore-server"),
        (["--storage-options", "[1, 2]"], None, "--storage-options must be a JSON object"),
        (["--storage-options", "{endpoint_url: x}"], None, "--storage-options: not valid JSON"),
        ([], ("run.json", '{"steps": "ten"}'), "steps must be an integer, got 'ten'"),
        ([], ("run.toml", 'alpha = "high"\n'), "alpha must be a number, got 'high'"),
        ([], ("run.toml", "resume = 1\n"), "resume must be true or false, got 1"),
        ([], ("run.json", '{"storage_options": ["a"]}'), "storage_options must be a table"),
        ([], ("run.json", "[1, 2]"), "expected an object of settings, got list"),
        # The loss settings: LossConfig checks them, the message names the flag (or --config key).
        (["--divergence", "kl"], None, "--divergence must be one of fkl, rkl, jsd, tvd, got 'kl'"),
        (["--report-to", "wandb"], None, "--report-to must be one or more of none, tensorboard, got 'wandb'"),
        (["--report-to", "tensorboard", "mlflow"], None, "got 'mlflow'"),
        (["--report-to", "none", "tensorboard"], None, "--report-to none goes alone"),
        ([], ("run.toml", 'report_to = ["wandb"]\n'), "--report-to must be one or more of none, tensorboard"),
        ([], ("run.toml", "report_to = 1\n"), "report_to must be a string or a list of strings, got 1"),
        (["--temperature", "0"], None, "--temperature must be a finite number > 0, got 0.0"),
        (["--loss-backend", "cuda"], None, "--loss-backend must be one of auto, triton, torch, got 'cuda'"),
        ([], ("run.toml", "alpha = 1.5\n"), "--alpha must be in [0, 1], got 1.5"),
    ],
)
def test_bad_values_get_one_line_errors_naming_the_flag(
    extra, config, message, tiny_store, student_config, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = [*run_args(tiny_store, student_config, out), *extra]
    if config is not None:
        name, text = config
        (tmp_path / name).write_text(text)
        argv += ["--config", str(tmp_path / name)]
    assert main(argv) == 1
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_help_is_fast_shows_defaults_and_marks_required_flags_without_importing_torch():
    script = (
        "import contextlib, io, sys\n"
        "import trainer.cli\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
        "    trainer.cli.main(['--help'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(buf.getvalue())\n"
        # The package's lazy exports are still the functions, also after their modules loaded.
        "import trainer.losses.kd_loss\n"
        "from trainer import LossConfig, kd_loss, kd_loss_from_hidden\n"
        "assert kd_loss.__module__ == 'trainer.losses.kd_loss' and callable(kd_loss_from_hidden)\n"
        "assert trainer.kd_loss is kd_loss and LossConfig().temperature == 1.0\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines
    required = text.split("required (on the command line or in --config):")[1].split("training options")[0]
    assert all(flag in required for flag in ("--store", "--student", "--out"))
    assert "optimizer steps (default: 1000)" in text and "(default: 500)" in text and "(default: fkl)" in text
