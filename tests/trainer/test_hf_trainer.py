"""The store inside Hugging Face Trainer (trainer/hf.py) against logitstore-train itself: the same
rows per rank as our loader, the same first loss on the same batch and seed; and the example
script runs as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import IterableDatasetShard
from transformers import AutoModelForCausalLM, TrainingArguments

from logitstore import open_store
from tests.trainer.test_train import _free_port, base_config, metrics, write_student_config
from trainer.data import StoreDataset
from trainer.hf import KDTrainer, StoreExamples, collate
from trainer.student import load_student
from trainer.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def student_config(tmp_path_factory) -> Path:
    return write_student_config(tmp_path_factory.mktemp("student") / "student.json")


def test_each_process_gets_the_rows_of_our_loader(tiny_store):
    """Accelerate's split of the examples (process r: the r-th batch_size slice of every global
    batch) equals logitstore-train's loader on rank r of 2."""
    for rank in range(2):
        examples = StoreExamples(tiny_store, seq_len=32, batch_size=3, seed=1, world_size=2)
        shard = IterableDatasetShard(examples, batch_size=3, num_processes=2, process_index=rank)
        rows = iter(shard)
        ours = StoreDataset(tiny_store, seq_len=32, batch_size=3, seed=1, rank=rank, world_size=2)
        for batch in islice(iter(ours), 5):
            got = collate([next(rows) for _ in range(3)])
            assert got.keys() == batch.keys()
            for name in batch:
                assert torch.equal(got[name], batch[name]), name


def test_kd_trainer_starts_at_logitstore_trains_loss_and_learns(tiny_store, student_config, tmp_path):
    ours = tmp_path / "ours"
    train(base_config(tiny_store, student_config, ours, steps=1, batch_size=4, seq_len=32, temperature=2.0,
                      alpha=0.3, seed=5), progress=False)  # fmt: skip
    first = metrics(ours)[0]["loss"]

    student = load_student(str(student_config), open_store(tiny_store).meta, seed=5).model
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             seed=5, lr_scheduler_type="constant", dataloader_num_workers=0)  # fmt: skip
    trainer = KDTrainer(model=student, args=args, data_collator=collate, temperature=2.0, alpha=0.3,
                        train_dataset=StoreExamples(tiny_store, seq_len=32, batch_size=4, seed=5))  # fmt: skip
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 12
    assert losses[0] == pytest.approx(first, rel=1e-4, abs=1e-4)  # same batch, same weights, same loss
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1  # it learns (measured: 3.97 -> 3.76)


def test_the_example_script_distills_and_saves_a_loadable_student(tiny_store, student_config, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--store", tiny_store,
                           "--student", str(student_config), "--out", str(out), "--max-steps", "3",
                           "--batch-size", "2", "--seq-len", "32"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == open_store(tiny_store).meta.tokenizer.vocab_size


def test_two_trainer_processes_train_like_one_with_the_whole_batch(tiny_store, student_config, tmp_path):
    """torchrun with 2 CPU processes: Trainer's DDP (through KDTrainer's forward of the wrapped model)
    and Accelerate's split of the examples give the weights of one process with twice the batch."""
    args = ["--store", tiny_store, "--student", str(student_config), "--max-steps", "3", "--seq-len", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "examples" / "hf_trainer.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(_free_port())]
    for cmd in ([*launch, script, *args, "--batch-size", "2", "--out", str(tmp_path / "two")],
                [sys.executable, script, *args, "--batch-size", "4", "--out", str(tmp_path / "one")]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
