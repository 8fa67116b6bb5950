"""Training on a generated store: KD along the teacher's own completions (the prompts never reach
the loss), SFT on them with alpha 1, and best-of-n selection by the teacher's log-likelihood."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logitstore import open_store
from logitstore.errors import LogitStoreError
from tests.trainer.test_train import base_config, metrics, write_student_config
from trainer.data import IGNORE_INDEX, StoreDataset, best_of_n
from trainer.student import load_student
from trainer.train import train


@pytest.fixture(scope="module")
def student_config(tmp_path_factory):
    return write_student_config(tmp_path_factory.mktemp("student") / "student.json")


@pytest.fixture(scope="module")
def generated_store(peaked_teacher_dir, chat_corpus, tmp_path_factory) -> str:
    from logitstore.capture.generate import generate
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec

    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [json.loads(line) for line in chat_corpus.read_text().splitlines()[:12]]
    first_turns = [{"messages": (r["messages"][:1] if "messages" in r else [{"role": "user", "content": r["prompt"]}])}
                   for r in rows]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in first_turns))
    teacher = load_teacher(str(peaked_teacher_dir), device="cpu")
    spec = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=96, generate={"n": 3, "max_new_tokens": 24})
    return generate(teacher, [prompts], str(tmp_path_factory.mktemp("gen") / "s"), spec).url


def test_best_of_n_keeps_each_prompts_likeliest_sample(generated_store):
    store = open_store(generated_store)
    samples = store.samples().to_pylist()
    expected = []
    for prompt in sorted({s["prompt"] for s in samples}):
        mine = [s for s in samples if s["prompt"] == prompt]
        expected.append(max(mine, key=lambda s: (s["teacher_logprob"] / s["completion_tokens"], -s["sample"]))
                        ["sequence"])  # fmt: skip
    assert best_of_n(store).tolist() == sorted(expected) and len(expected) == 12
    # The loader then reads those sequences' tokens only.
    ds = StoreDataset(generated_store, seq_len=24, batch_size=4, sequences=best_of_n(store))
    starts = ds.blocks[0]
    spans = [store.sequence_span(i) for i in expected]
    assert all(any(a <= s < b for a, b in spans) for s in starts) and len(starts) >= 12


def test_sft_on_the_best_samples_is_the_cross_entropy_of_their_completions(generated_store, student_config, tmp_path):
    """alpha 1: the first step's loss = the initial student's CE on the first batch's completion tokens."""
    cfg = base_config(generated_store, student_config, tmp_path / "sft", steps=1, batch_size=4, seq_len=32, alpha=1.0,
                      select="best-of-n", save_every=0)  # fmt: skip
    train(cfg, progress=False)
    store = open_store(generated_store)
    batch = next(iter(StoreDataset(generated_store, seq_len=32, batch_size=4, seed=cfg.seed,
                                   sequences=best_of_n(store))))  # fmt: skip
    labels = batch["labels"]
    assert (labels[~batch["mask"]] == IGNORE_INDEX).all() and (labels != IGNORE_INDEX).any()
    model = load_student(str(student_config), store.meta, seed=cfg.seed).model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"].long()).logits[..., : store.meta.tokenizer.vocab_size]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
    assert metrics(tmp_path / "sft")[0]["loss"] == pytest.approx(float(expected), rel=1e-4)


def test_kd_along_the_completions_trains(generated_store, student_config, tmp_path):
    train(base_config(generated_store, student_config, tmp_path / "kd", steps=4, batch_size=2, seq_len=32,
                      save_every=0, eval_store=generated_store, eval_tokens=256), progress=False)  # fmt: skip
    records = metrics(tmp_path / "kd")
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(np.isfinite(losses)) and records[-1]["eval_kl"] > 0


def test_best_of_n_needs_a_generated_store(tiny_store, student_config, tmp_path):
    with pytest.raises(LogitStoreError, match="not a generated store"):
        train(base_config(tiny_store, student_config, tmp_path / "x", steps=1, select="best-of-n"), progress=False)


def test_a_generated_store_is_not_one_of_several_teachers(generated_store, tiny_store, student_config, tmp_path):
    """Another teacher's soft labels would be along the first teacher's samples: refused by name."""
    cfg = base_config(generated_store, student_config, tmp_path / "x", steps=1, extra_stores=[generated_store])
    with pytest.raises(LogitStoreError, match="a generated store's text is its teacher's own samples"):
        train(cfg, progress=False)
