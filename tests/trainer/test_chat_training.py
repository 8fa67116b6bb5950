"""Training on a store of chat rows: only the positions of its loss mask (those predicting an
assistant token) reach the loss, in every backend, and the student trains and evaluates there."""

from __future__ import annotations

import json
import math

import pytest
import torch

from logitstore import open_store
from tests.trainer.test_train import write_student_config
from trainer.data import IGNORE_INDEX, StoreDataset
from trainer.losses.config import LossConfig
from trainer.losses.kd_loss import kd_loss
from trainer.losses.reference import kd_loss_reference
from trainer.losses.sparse_target import SparseTarget
from trainer.losses.targets import StoreTarget
from trainer.student import StudentError, load_student
from trainer.train import TrainConfig, train


@pytest.fixture(scope="module")
def student_config(tmp_path_factory):
    return write_student_config(tmp_path_factory.mktemp("student") / "student.json")


@pytest.fixture(scope="module")
def chat_store(tiny_store_factory, chat_corpus) -> str:
    return tiny_store_factory(corpus=chat_corpus, max_tokens=3000)


@pytest.fixture(scope="module")
def batch(chat_store) -> dict[str, torch.Tensor]:
    return next(iter(StoreDataset(chat_store, seq_len=48, batch_size=4, seed=0)))


def test_batches_train_only_where_the_store_kept_soft_labels(chat_store, batch):
    assert open_store(chat_store).meta.capture.train_on == "assistant"
    real = batch["input_ids"] != -1  # every position of these full blocks is a token
    mask, labels, has_ids = batch["mask"], batch["labels"], batch["topk_ids"][..., 0] >= 0
    assert real.all() and 0 < mask.sum() < mask.numel()  # prompts and answers in the batch
    assert torch.equal(mask, has_ids)
    assert (labels[~mask] == IGNORE_INDEX).all()
    assert (labels[mask] != IGNORE_INDEX).float().mean() > 0.9  # all but the ends of blocks


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_masked_out_position_never_reaches_the_loss(chat_store, batch, alpha, backend):
    """The loss over a batch = the reference over its masked-in rows alone, and the gradient at
    every masked-out row is exactly zero."""
    meta = open_store(chat_store).meta
    torch.manual_seed(0)
    n = batch["input_ids"].numel()
    z = (3 * torch.randn(n, meta.tokenizer.vocab_size)).requires_grad_()
    target = StoreTarget.of(meta, 2.0)(batch, torch.device("cpu"))
    labels, mask = batch["labels"].reshape(-1), batch["mask"].reshape(-1)
    config = LossConfig(temperature=2.0, alpha=alpha, backend=backend)
    loss = kd_loss(z, target, config, labels=labels)
    loss.backward()
    kept = SparseTarget(target.ids[mask], target.logp[mask])
    expected = kd_loss_reference(z.detach()[mask].double(), kept, config, labels=labels[mask])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert z.grad[~mask].abs().max() == 0 and z.grad[mask].abs().max() > 0


def test_a_student_trains_and_evaluates_on_the_assistant_positions(chat_store, student_config, tmp_path):
    cfg = TrainConfig(store=chat_store, student=str(student_config), out=str(tmp_path / "run"), steps=3,
                      batch_size=2, seq_len=48, lr=3e-3, warmup_steps=0, alpha=0.5, eval_store=chat_store,
                      eval_tokens=512, save_every=0, device="cpu")  # fmt: skip
    train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_kl" in r]
    assert evals and all(math.isfinite(evals[-1][k]) for k in ("eval_kl", "eval_top1", "eval_store_ppl"))


def test_a_student_whose_chat_template_differs_is_refused_by_name(chat_store, student_config, peaked_teacher_dir,
                                                                  tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(peaked_teacher_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "tok")
    meta = open_store(chat_store).meta
    with pytest.raises(StudentError, match="chat template differs"):
        load_student(str(student_config), meta, tokenizer=str(tmp_path / "tok"))
    load_student(str(student_config), meta, tokenizer=str(peaked_teacher_dir))  # the teacher's own: accepted
