"""The training loop end to end on CPU: tiny random teacher → store → tiny student.

Independent expectations: the teacher itself, evaluated as a student on its own store, has KL
≈ 0 and top-1 = 1; a resumed run reproduces the uninterrupted run's losses and weights
exactly; KD students end closer to the teacher than CE-only students trained on the same data.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from logitstore import open_store
from logitstore.errors import LogitStoreError
from trainer.cli import main as train_main
from trainer.data import StoreDataset
from trainer.evaluate import eval_store
from trainer.student import StudentError, load_student
from trainer.train import TrainConfig, enable_grad_checkpointing, lr_factor, train


def write_student_config(path: Path, vocab_size: int = 49152, **overrides) -> Path:
    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    tie_word_embeddings=True)
    settings.update(overrides)
    LlamaConfig(**settings).to_json_file(str(path))
    return path


@pytest.fixture(scope="module")
def student_config(tmp_path_factory) -> Path:
    return write_student_config(tmp_path_factory.mktemp("student") / "student.json")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def base_config(store: str, student: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(store=store, student=str(student), out=str(out), steps=12, batch_size=4, seq_len=32,
                    lr=3e-3, warmup_steps=2, log_every=1, save_every=4, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_teacher_as_student_agrees_with_its_own_store(peaked_teacher_dir, tiny_store):
    """The KL of the teacher to its own soft labels is only the codec's error; top-1 agreement is 1."""
    store = open_store(tiny_store)
    student = load_student(str(peaked_teacher_dir), store.meta)
    assert not student.fresh and student.vocab_size == store.meta.tokenizer.vocab_size
    m = eval_store(student.model, store, vocab_size=student.vocab_size, seq_len=64, batch_size=8, max_tokens=640)
    assert m["eval_kl"] < 1e-4
    assert m["eval_top1"] > 0.99  # exact ties between random logits may break either way
    # As its own draft the teacher is always accepted: the upper bound is 1, the lower bound the
    # stored ids' mass (k = 8 of a peaked teacher: most of it).
    assert m["eval_accept_max"] == pytest.approx(1.0, abs=1e-3) and 0.5 < m["eval_accept_min"] < m["eval_accept_max"]
    # Perplexity: against a direct forward over the same windows (whole sequences of 64 here).
    nll = n = 0.0
    with torch.no_grad():
        for i in range(10):
            ids = torch.from_numpy(store.sequence(i).input_ids.astype(np.int64))[None]
            logits = student.model(input_ids=ids).logits[0]
            nll += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    assert m["eval_store_ppl"] == pytest.approx(np.exp(nll / n), rel=1e-4)


def test_teacher_as_student_agrees_with_its_packed_documents_store(peaked_teacher_dir, tiny_store_factory):
    """The eval runs each document of a packed-documents store apart, as the capture did: the
    teacher then matches its own soft labels (run across documents it would not)."""
    store = open_store(tiny_store_factory(packing="packed-documents", max_tokens=1500))
    student = load_student(str(peaked_teacher_dir), store.meta)
    m = eval_store(student.model, store, vocab_size=student.vocab_size, seq_len=64, batch_size=8)
    assert m["eval_kl"] < 1e-4 and m["eval_top1"] > 0.99


def test_kd_loss_falls_and_kd_student_is_closer_to_the_teacher_than_ce(
    tiny_store, heldout_store, heldout_text, student_config, tmp_path
):
    runs = {}
    for loss in ("kd", "ce"):
        cfg = base_config(tiny_store, student_config, tmp_path / loss, loss=loss, steps=30, save_every=0, lr=2e-2,
                          eval_store=heldout_store, eval_text=str(heldout_text), eval_tokens=512, log_every=5)
        train(cfg, progress=False)
        runs[loss] = metrics(tmp_path / loss)
    kd_train = [r["kd_loss"] for r in runs["kd"] if "kd_loss" in r]
    assert kd_train[-1] < 0.5 * kd_train[0]
    for r in runs["kd"] + runs["ce"]:
        if "loss" in r:
            assert {"step", "loss", "kd_loss", "ce_loss", "lr", "tokens_per_s"} <= r.keys()
    final = {loss: next(r for r in reversed(runs[loss]) if "eval_kl" in r) for loss in runs}
    assert {"eval_ppl", "eval_kl", "eval_top1"} <= final["kd"].keys()
    assert final["kd"]["eval_kl"] < final["ce"]["eval_kl"]
    # The saved student loads with plain transformers.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "kd" / "final")
    AutoTokenizer.from_pretrained(tmp_path / "kd" / "final")
    assert model.config.vocab_size == 49152


@pytest.fixture(scope="module")
def ce_eval_kl(tiny_store, heldout_store, student_config, tmp_path_factory) -> float:
    """Held-out KL to the teacher of the CE-only student trained like `train_signal` trains."""
    out = tmp_path_factory.mktemp("ce")
    train(base_config(tiny_store, student_config, out, loss="ce", eval_store=heldout_store, **SIGNAL_RUN),
          progress=False)
    return next(r for r in reversed(metrics(out)) if "eval_kl" in r)["eval_kl"]


SIGNAL_RUN = dict(steps=30, save_every=0, lr=2e-2, eval_tokens=512, log_every=1)


@pytest.mark.parametrize("signal", ["sampled", "sampled_head", "renormalized", "online"])
def test_other_teacher_signals_train_the_student_toward_the_teacher(
    signal, tiny_store, tiny_store_factory, heldout_store, peaked_teacher_dir, student_config, ce_eval_kl, tmp_path
):
    store = {"sampled": lambda: tiny_store_factory(mode="sampled", draws=16, seed=1),
             "sampled_head": lambda: tiny_store_factory(mode="sampled", head=4, draws=8, seed=1)}.get(
        signal, lambda: tiny_store)()
    extra = {"renormalized": {"topk_renormalize": True}, "online": {"loss": "online"}}.get(signal, {})
    cfg = base_config(store, student_config, tmp_path, eval_store=heldout_store, **SIGNAL_RUN, **extra)
    train(cfg, progress=False)
    records = metrics(tmp_path)
    assert next(r for r in reversed(records) if "eval_kl" in r)["eval_kl"] < ce_eval_kl
    if signal != "online":
        return
    # The first step's KD is the initial student's full-vocabulary KL to the teacher on the first batch.
    meta = open_store(store).meta
    student = load_student(str(student_config), meta, seed=cfg.seed).model
    teacher = AutoModelForCausalLM.from_pretrained(peaked_teacher_dir)
    batch = next(iter(StoreDataset(store, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)))
    ids, mask = batch["input_ids"].long(), batch["mask"]
    with torch.no_grad():
        s, t = student(input_ids=ids).logits[mask], teacher(input_ids=ids).logits[mask]
    expected = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
    assert records[0]["kd_loss"] == pytest.approx(float(expected), rel=1e-4)


STORE_MODES = {
    "topk": {},
    "sampled": dict(mode="sampled", draws=16, seed=1),
    "head_draws": dict(mode="sampled", head=4, draws=8, seed=1),
    "counts_only": dict(mode="sampled", draws=16, seed=1, temperatures=(1.0,), counts_only=True),
    "head_counts_only": dict(mode="sampled", head=2, draws=16, seed=1, temperatures=(1.0,), counts_only=True),
    "packed_documents": dict(packing="packed-documents"),
}


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("mode", list(STORE_MODES))
def test_every_store_mode_trains_through_the_fused_kernel_from_hidden_states(
    mode, alpha, tiny_store_factory, student_config, tmp_path
):
    """One tiny step per store mode: the fused kernel (interpreted on CPU) from hidden states, the
    torch path from hidden states, and materialized logits log the same loss, KD and CE, and
    leave the same weights."""
    store = tiny_store_factory(**STORE_MODES[mode])
    temperature = 1.0 if "counts_only" in mode else 2.0
    runs = {}
    for name, extra in (("triton", dict(loss_backend="triton")), ("torch", dict(loss_backend="torch")),
                        ("materialized", dict(materialize_logits=True))):
        out = tmp_path / name
        train(base_config(store, student_config, out, steps=1, batch_size=2, seq_len=16, save_every=0,
                          temperature=temperature, alpha=alpha, **extra), progress=False)  # fmt: skip
        runs[name] = metrics(out)[0], AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    ref, ref_weights = runs["materialized"]
    assert all(math.isfinite(ref[key]) for key in ("loss", "kd_loss", "ce_loss"))
    assert ref["loss"] == pytest.approx((1 - alpha) * ref["kd_loss"] + alpha * ref["ce_loss"], rel=1e-5)
    for name in ("triton", "torch"):
        record, weights = runs[name]
        for key in ("loss", "kd_loss", "ce_loss"):
            assert record[key] == pytest.approx(ref[key], rel=1e-5), (name, key)
        # AdamW's first step moves every weight by ~lr * sign(g) (lr = 3e-3): where g ~ 0 its
        # direction is rounding noise, so a few weights may differ by up to a step; a path that
        # missed a gradient (say lm_head's) would differ almost everywhere.
        for key, w in weights.items():
            diff = (w - ref_weights[key]).abs()
            assert diff.max() <= 2 * 3e-3 and (diff > 1e-5).float().mean() < 0.01, (name, key)


@pytest.mark.parametrize("head", [0, 2])
def test_a_counts_only_store_trains_the_same_student(head, tiny_store_factory, heldout_text, student_config,
                                                     tmp_path):  # fmt: skip
    """Without log-probs (a head's alone, with a head) the sampled loss loses only its
    teacher-entropy term, a constant: the gradients, and so every weight of the trained student,
    are the same: bit for bit without a head (weights c / M sum exactly in any order), to float
    rounding with one (c / M * p_tail summed in the stored slot order, which differs)."""
    sampled = dict(mode="sampled", draws=16, seed=1, temperatures=(1.0,), head=head)
    runs = {}
    for name, counts_only in (("full", False), ("counts", True)):
        store = tiny_store_factory(**sampled, counts_only=counts_only)
        heldout = tiny_store_factory(corpus=heldout_text, max_tokens=1500, **sampled, counts_only=counts_only)
        train(base_config(store, student_config, tmp_path / name, steps=6, eval_store=heldout, eval_tokens=256),
              progress=False)
        runs[name] = metrics(tmp_path / name)
    full, counts = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "final") for name in ("full", "counts"))
    for (key, a), (_, b) in zip(full.state_dict().items(), counts.state_dict().items(), strict=True):
        assert torch.equal(a, b) if not head else torch.allclose(a, b, rtol=0, atol=1e-6), key
    # The logged loss is the cross-entropy to the draws instead: KL plus the teacher's entropy.
    steps = [(a, b) for a, b in zip(runs["full"], runs["counts"], strict=True) if "kd_loss" in a]
    assert steps and all(b["kd_loss"] > a["kd_loss"] for a, b in steps)
    last_full, last_counts = runs["full"][-1], runs["counts"][-1]
    assert "eval_kl" in last_full and "eval_kl" not in last_counts
    assert last_counts["eval_teacher_xent"] > last_full["eval_kl"] > 0
    assert last_counts["eval_store_ppl"] == pytest.approx(last_full["eval_store_ppl"], rel=1e-6)


def test_signal_options_are_checked(tiny_store, tiny_store_factory, tiny_teacher_dir, student_config, tmp_path):
    with pytest.raises(LogitStoreError, match="forward KL only"):
        train(base_config(tiny_store, student_config, tmp_path, topk_renormalize=True, divergence="rkl"))
    with pytest.raises(LogitStoreError, match="needs --loss online"):
        train(base_config(tiny_store, student_config, tmp_path, teacher=str(tiny_teacher_dir)))
    sampled = tiny_store_factory(mode="sampled", draws=16, seed=1)
    with pytest.raises(LogitStoreError, match="sampled-mode store"):
        train(base_config(sampled, student_config, tmp_path, divergence="jsd"), progress=False)


def test_several_teachers_train_on_the_weighted_sum_of_their_losses(tiny_store_factory, student_config, tmp_path):
    """`--store A --store B --store-weights 0.7,0.3`: the first step's loss (same data, same initial
    student) is 0.7 x A's alone + 0.3 x B's alone, for the loss and its KD part; the CE part is one."""
    a, b = tiny_store_factory(), tiny_store_factory(k=4, temperatures=(1.0, 2.0, 4.0))  # same corpus, other signal
    common = ["--student", str(student_config), "--steps", "1", "--batch-size", "4", "--seq-len", "32",
              "--save-every", "0", "--temperature", "2", "--alpha", "0.3", "--device", "cpu", "--no-progress"]
    runs = {}
    for name, stores in (("a", ["--store", a]), ("b", ["--store", b]),
                         ("ab", ["--store", a, "--store", b, "--store-weights", "0.7,0.3"])):  # fmt: skip
        assert train_main([*stores, *common, "--out", str(tmp_path / name)]) == 0
        runs[name] = metrics(tmp_path / name)[0]
    for key in ("loss", "kd_loss"):
        assert runs["ab"][key] == pytest.approx(0.7 * runs["a"][key] + 0.3 * runs["b"][key], rel=1e-5)
    assert runs["ab"]["ce_loss"] == pytest.approx(runs["a"]["ce_loss"], rel=1e-6)
    saved = json.loads((tmp_path / "ab" / "config.json").read_text())
    assert (saved["store"], saved["extra_stores"], saved["store_weights"]) == (a, [b], [0.7, 0.3])


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (dict(max_tokens=2000), "its corpus fingerprint"),  # fewer documents
        (dict(max_len=32), "its max_len (32) is not that of --store"),
        (dict(unit_tokens=700), "its segments or chunks are cut unlike"),
        (dict(corpus="heldout"), "several teachers' stores must hold the same corpus"),
    ],
)
def test_several_teachers_stores_must_hold_the_same_blocks(other, message, tiny_store, tiny_store_factory,
                                                           heldout_text, student_config, tmp_path, capsys):  # fmt: skip
    if other.get("corpus") == "heldout":
        other = dict(corpus=heldout_text, max_tokens=1500)
    argv = ["--store", tiny_store, "--store", tiny_store_factory(**other), "--student", str(student_config),
            "--out", str(tmp_path / "run"), "--steps", "1", "--device", "cpu", "--no-progress"]
    assert train_main(argv) == 1
    assert message in capsys.readouterr().err
    assert train_main([*argv, "--store-weights", "0.5,0.6"]) == 1
    assert "--store-weights must be 2 positive numbers, one per --store, summing to 1" in capsys.readouterr().err


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_store, student_config, tmp_path):
    full = tmp_path / "full"
    train(base_config(tiny_store, student_config, full, temperature=2.0, alpha=0.3), progress=False)
    # A run killed after its step-8 checkpoint: the newest checkpoint and everything after it are gone.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000012")
    shutil.rmtree(cut / "final")
    with pytest.raises(Exception, match="--resume"):
        train(base_config(tiny_store, student_config, cut, temperature=2.0, alpha=0.3), progress=False)
    train(base_config(tiny_store, student_config, cut, temperature=2.0, alpha=0.3, resume=True), progress=False)
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(full)]
    assert [r["step"] for r in metrics(cut)] == list(range(1, 13))
    a = AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(cut / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_with_another_tokenizer_is_refused(tiny_store, tiny_teacher_dir, student_config, tmp_path):
    meta = open_store(tiny_store).meta
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    tok.add_tokens(["<extra-token>"])
    other = tmp_path / "other_tok"
    tok.save_pretrained(other)
    with pytest.raises(StudentError, match=r"tokenizer differs.*49153 tokens.*49152 tokens"):
        load_student(str(student_config), meta, tokenizer=str(other))


def test_student_too_narrow_is_refused_and_a_padded_one_trains(tiny_store, tmp_path):
    meta = open_store(tiny_store).meta
    narrow = write_student_config(tmp_path / "narrow.json", vocab_size=1000)
    with pytest.raises(StudentError, match=r"scores 1000 tokens.*49152"):
        load_student(str(narrow), meta)
    padded = write_student_config(tmp_path / "padded.json", vocab_size=49152 + 64)
    student = load_student(str(padded), meta)
    assert student.vocab_size == 49152
    train(base_config(tiny_store, padded, tmp_path / "run", steps=3, save_every=0), progress=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.vocab_size == 49152 + 64


def test_cli_config_file_flags_override_and_plot(tiny_store, student_config, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'store = "{tiny_store}"\nstudent = "{student_config}"\nsteps = 50\nbatch-size = 2\n'
                      f'seq_len = 32\nlog_every = 1\nsave_every = 0\ndevice = "cpu"\n')
    out = tmp_path / "run"
    assert train_main(["--config", str(config), "--out", str(out), "--steps", "3", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "final")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert train_main(["plot", str(out)]) == 0
    png = Path(capsys.readouterr().out.strip())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line(tiny_store, student_config, tmp_path, capsys):
    common = ["--student", str(student_config), "--out", str(tmp_path / "o"), "--no-progress"]
    assert train_main(["--store", tiny_store, "--temperature", "3", *common]) == 1
    err = capsys.readouterr().err
    assert "temperature 3 was not captured" in err and "1, 2" in err and len(err.strip().splitlines()) == 1
    assert train_main(["--store", str(tmp_path / "nope"), *common]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert train_main(["--student", str(student_config)]) == 1
    assert "missing --store, --out" in capsys.readouterr().err


def test_gradient_checkpointing_trains_the_same_student(tiny_store, student_config, tmp_path):
    model = load_student(str(student_config), open_store(tiny_store).meta).model
    enable_grad_checkpointing(model)
    assert model.get_decoder().gradient_checkpointing  # on, not silently ignored
    runs = {}
    for name, extra in (("plain", {}), ("checkpointed", {"grad_checkpointing": True})):
        train(base_config(tiny_store, student_config, tmp_path / name, steps=3, save_every=0, **extra), progress=False)
        runs[name] = metrics(tmp_path / name), AutoModelForCausalLM.from_pretrained(tmp_path / name / "final")
    assert [r["loss"] for r in runs["plain"][0]] == pytest.approx([r["loss"] for r in runs["checkpointed"][0]],
                                                                  rel=1e-6)  # fmt: skip
    for (k, a), b in zip(runs["plain"][1].state_dict().items(), runs["checkpointed"][1].state_dict().values(),
                         strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(tiny_store, student_config, tmp_path):
    """2 gloo ranks with batch B see disjoint halves of the 1-rank batch 2B: averaged gradients
    equal the big batch's, so the weights after training match (up to reduction order)."""
    common = ["--store", tiny_store, "--student", str(student_config), "--steps", "4", "--seq-len", "32",
              "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "0", "--log-every", "1", "--device", "cpu",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(_free_port()), "-m", "trainer", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                   env=env, check=True, timeout=300, capture_output=True)
    assert train_main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # Same data per step: the logged losses (averaged over ranks) agree too.
    for x, y in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "one"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tiny_store, student_config, tmp_path):
    """A real `logitstore-train` process killed with SIGKILL mid-run, then `--resume`d."""
    args = ["--store", tiny_store, "--student", str(student_config), "--steps", "40", "--batch-size", "4",
            "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--save-every", "5",
            "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step_00000010").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (killed / "final").exists()
    assert train_main([*args, "--out", str(killed), "--resume"]) == 0
    assert train_main([*args, "--out", str(tmp_path / "full")]) == 0
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(tmp_path / "full")]
