"""Generation capture: the teacher's samples, with its soft labels along each completion from the
forward that sampled it; deterministic per prompt and sample, resumable after a SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from logitstore import open_store
from logitstore.capture.generate import generate, sample_token
from logitstore.capture.teacher import load_teacher
from logitstore.codecs import LogProbCodec
from logitstore.spec import CaptureSpec, CaptureTuning
from logitstore.verify import verify
from tests.logitstore.processes import sigkill_after_commits
from tests.logitstore.test_capture import reference

PROMPTS = [
    {"prompt": "Name three colours."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five."}]},
    {"text": "Once upon a time"},
    {"prompt": "What is a river?"},
    {"text": "The king said"},
    {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "And then?"}]},
]
SPEC = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=64,
                   generate={"n": 2, "max_new_tokens": 10, "seed": 3})


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir), device="cpu")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def generated(tiny_teacher, prompts_file, tmp_path_factory) -> str:
    """One sample per batch (batch_tokens 1): the same batches however the prompts are cut into units."""
    out = str(tmp_path_factory.mktemp("gen") / "s")
    return generate(tiny_teacher, [prompts_file], out, SPEC, tuning=CaptureTuning(batch_tokens=1)).url


def test_the_soft_labels_are_the_teachers_along_its_own_samples(tiny_teacher, generated):
    store = open_store(generated)
    samples = store.samples().to_pylist()
    assert [(s["prompt"], s["sample"]) for s in samples] == [(p, i) for p in range(len(PROMPTS)) for i in range(2)]
    assert store.meta.capture.train_on == "completion" and store.meta.capture.generate.n == 2
    codec = LogProbCodec.from_dict(store.meta.capture.logp_codec)
    end = {tiny_teacher.tokenizer.eos_token_id}
    for i, s in enumerate(samples):
        block = store.sequence(i)
        p, c = s["prompt_tokens"], s["completion_tokens"]
        assert len(block) == p + c and 1 <= c <= 10
        assert (s["finish_reason"] == "eos") == (int(block.input_ids[-1]) in end)
        assert s["finish_reason"] == "eos" or c == 10
        # Soft labels exactly at the positions that predicted a completion token.
        assert np.flatnonzero(block.loss_mask).tolist() == list(range(p - 1, p + c - 1))
        assert (block.topk_ids[~block.loss_mask] == -1).all()
        # There, the teacher's top-k over the whole sequence run at once (no cache), within the codec.
        logp_ref, lse_ref = reference(tiny_teacher.model, block.input_ids, store.temperatures)
        rows = block.loss_mask
        got = np.take_along_axis(logp_ref[rows], block.topk_ids[rows].astype(np.int64), axis=1)
        np.testing.assert_allclose(got, -np.sort(-logp_ref[rows], axis=1)[:, :8], atol=1e-4)
        assert np.all(np.abs(block.topk_logp[rows] - got) <= codec.topk_error_bound(got) + 1e-4)
        np.testing.assert_allclose(block.lse[rows], lse_ref[rows], atol=2e-4)
        # The log-likelihood of the completion under the teacher, from the same reference.
        completion = block.input_ids[p:].astype(np.int64)
        assert s["teacher_logprob"] == pytest.approx(logp_ref[np.arange(p - 1, p + c - 1), completion].sum(), abs=1e-3)
    assert verify(generated).ok


def test_info_says_how_the_store_was_generated(generated, capsys):
    from logitstore.cli import main as cli_main

    assert cli_main(["info", generated]) == 0
    out = capsys.readouterr().out
    assert "generated   2 samples per prompt, at most 10 new tokens, temperature 0.8, top-p 0.95, seed 3" in out
    assert "soft labels at the positions predicting the completions' tokens" in out


def test_a_sample_does_not_depend_on_its_work_unit(tiny_teacher, prompts_file, generated, tmp_path):
    """One prompt per unit: the same samples and soft labels as all prompts in one."""
    alone = generate(tiny_teacher, [prompts_file], str(tmp_path / "alone"), SPEC,
                     tuning=CaptureTuning(batch_tokens=1, unit_tokens=1))  # fmt: skip
    assert len(alone.segments) == len(PROMPTS)
    assert verify(alone.url).digest == verify(generated).digest


def test_other_seeds_give_other_samples(tiny_teacher, prompts_file, generated, tmp_path):
    spec = SPEC.model_copy(update={"generate": SPEC.generate.model_copy(update={"seed": 4})})
    other = generate(tiny_teacher, [prompts_file], str(tmp_path / "other"), spec)
    a, b = open_store(generated), other
    assert not np.array_equal(a.read(0, a.num_tokens).input_ids[:50], b.read(0, min(50, b.num_tokens)).input_ids)


def test_sample_token_draws_from_the_nucleus_at_the_temperature():
    z = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], dtype=torch.float64)
    u = (torch.arange(20_000, dtype=torch.float64) + 0.5) / 20_000  # quantiles: frequencies are exact to 1/N
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9), (2.0, 0.5)):
        drawn = sample_token(z.expand(len(u), -1), temperature, top_p, u)
        p = torch.softmax(z[0] / temperature, dim=0)
        order = torch.argsort(p, descending=True)
        keep = order[: int((torch.cumsum(p[order], 0) - p[order] < top_p).sum())]
        expected = torch.zeros_like(p)
        expected[keep] = p[keep] / p[keep].sum()
        freq = torch.bincount(drawn, minlength=6).double() / len(u)
        assert torch.allclose(freq, expected, atol=2e-4), (temperature, top_p, freq, expected)


def test_prompts_that_cannot_be_answered_are_refused_by_row(tiny_teacher, tmp_path):
    from logitstore.errors import CorpusError

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
                    + "\n")
    with pytest.raises(CorpusError, match=r"p\.jsonl:1: a prompt ends with the assistant's message"):
        generate(tiny_teacher, [path], str(tmp_path / "s"), SPEC)
    path.write_text(json.dumps({"text": "word " * 80}) + "\n")
    with pytest.raises(CorpusError, match=r"p\.jsonl:1: the prompt has 81 tokens.* 1 to 54 for a prompt"):
        generate(tiny_teacher, [path], str(tmp_path / "s"), SPEC)


CLI = ["--n", "2", "--max-new-tokens", "10", "--seed", "3", "--mode", "topk", "--k", "8", "--temperatures", "1,2",
       "--max-len", "64", "--unit-tokens", "1", "--batch-tokens", "1", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
def test_a_sigkilled_generation_resumes_to_the_same_digest(tiny_teacher_dir, tiny_teacher, prompts_file, generated,
                                                           tmp_path):
    out = tmp_path / "s"
    args = [sys.executable, "-m", "logitstore.cli", "generate", "--teacher", str(tiny_teacher_dir), "--prompts",
            str(prompts_file), "--out", str(out), *CLI]
    assert sigkill_after_commits(args, out, 2) >= 2
    killed = open_store(str(out))
    assert 2 <= len(killed.segments) < len(PROMPTS) and verify(str(out)).ok
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "12 samples of 6 prompts" in resumed.stdout
    assert verify(str(out)).digest == verify(generated).digest


def test_capture_refuses_a_generation_spec(tiny_teacher, prompts_file, tmp_path):
    from logitstore.capture.engine import capture
    from logitstore.spec import SpecError

    with pytest.raises(SpecError, match="generate: a generation capture runs with"):
        capture(tiny_teacher, [prompts_file], str(tmp_path / "s"), SPEC)
    assert not (tmp_path / "s").exists()
