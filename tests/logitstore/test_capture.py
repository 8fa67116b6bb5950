"""Capture end to end on real models: the stored soft labels equal a full-softmax torch
computation over the same sequences, within the codec's error bound."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from logitstore import open_store
from logitstore.capture.document_attention import check_document_attention
from logitstore.capture.engine import CaptureProgress, capture, plan_units
from logitstore.capture.teacher import load_teacher
from logitstore.cli import main as cli_main
from logitstore.codecs import LogProbCodec
from logitstore.errors import LogitStoreError, StoreExistsError
from logitstore.spec import CaptureSpec, CaptureTuning, SpecError
from logitstore.verify import verify
from tests.logitstore.store_helpers import assert_same_soft_labels

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir), device="cpu")


def reference(model: torch.nn.Module, input_ids: np.ndarray, temperatures) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-softmax l at T=1 and its log-normalizer logsumexp(l/T) per T (the stored
    `lse`), from one unpadded forward."""
    with torch.inference_mode():
        z = model(torch.from_numpy(input_ids.astype(np.int64))[None]).logits[0].double()
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.stack([torch.logsumexp(logp / t, dim=-1) for t in temperatures], dim=-1)
    return logp.numpy(), lse.numpy()


def assert_matches_reference(store, model, codec: LogProbCodec, lse_atol: float = 2e-4) -> None:
    for i in range(store.num_sequences):
        block = store.sequence(i)
        logp_ref, lse_ref = reference(model, block.input_ids, store.temperatures)
        k = block.topk_ids.shape[1]
        # The stored ids are the teacher's top-k: their reference log-probs are the k largest.
        ref_sorted = -np.sort(-logp_ref, axis=1)[:, :k]
        got_ref = np.take_along_axis(logp_ref, block.topk_ids.astype(np.int64), axis=1)
        np.testing.assert_allclose(got_ref, ref_sorted, atol=1e-4)
        # Stored log-probs: within the codec bound plus fp32 forward noise.
        bound = codec.topk_error_bound(got_ref) + 1e-4
        assert np.all(np.abs(block.topk_logp - got_ref) <= bound)
        np.testing.assert_allclose(block.lse, lse_ref, atol=lse_atol, rtol=0)
        assert np.all(block.lse[:, store.temperatures.index(1.0)] == 0)  # normalized log-probs: exactly 0
        # The tail at every T is the reference's mass outside the top-k.
        for t in store.temperatures:
            logp_t, tail_t = store.teacher_logprobs(block, t)
            z_t = torch.log_softmax(torch.from_numpy(logp_ref) / t, dim=-1).numpy()
            exact = np.take_along_axis(z_t, block.topk_ids.astype(np.int64), axis=1)
            exact_tail = 1 - np.exp(exact).sum(axis=1)
            # Each p_T(i) may be off by the codec bound (divided by T) in log space; the tail
            # absorbs the sum of those errors.
            p_err = np.exp(exact) * np.expm1((bound + lse_atol) / t)
            assert np.all(np.abs(np.exp(logp_t) - np.exp(exact)) <= p_err + 1e-6)
            assert np.all(np.abs(np.exp(tail_t) - exact_tail) <= p_err.sum(axis=1) + 1e-5)


@pytest.mark.parametrize("packing", ["packed", "document"])
def test_capture_equals_full_softmax(tiny_teacher, tmp_path, packing):
    spec = CaptureSpec(mode="topk", k=16, temperatures=(1.0, 2.0, 4.0), max_len=96, packing=packing, max_tokens=700)
    tuning = CaptureTuning(unit_tokens=250, chunk_tokens=64, batch_tokens=200, row_chunk=37)
    store = capture(tiny_teacher, [CORPUS], str(tmp_path / "s"), spec, tuning=tuning)
    assert store.complete and store.meta.num_segments > 1
    assert store.num_tokens == 700 == store.meta.corpus.tokens
    assert store.meta.teacher.weights_sha256 == tiny_teacher.info.weights_sha256
    assert store.meta.tokenizer.fingerprint == tiny_teacher.tokenizer_info.fingerprint
    assert_matches_reference(store, tiny_teacher.model, tuning.logp_codec)
    # The manifest's pieces tile the token axis exactly, in order.
    m = store.manifest()
    starts, counts = m.column("token_start").to_numpy(), m.column("num_tokens").to_numpy()
    assert starts[0] == 0 and np.array_equal(starts[1:], np.cumsum(counts)[:-1]) and counts.sum() == 700
    assert verify(str(tmp_path / "s")).ok


def test_packed_documents_equal_each_document_captured_alone(tiny_teacher, tmp_path):
    """packed-documents shares sequences between documents without sharing context: every token's
    soft labels equal those of the document store, where each document is its own sequence."""
    spec = CaptureSpec(mode="topk", k=16, temperatures=(1.0, 2.0), max_len=96, packing="packed-documents",
                       max_tokens=900)
    tuning = CaptureTuning(unit_tokens=300, chunk_tokens=64, batch_tokens=200)
    packed = capture(tiny_teacher, [CORPUS], str(tmp_path / "p"), spec, tuning=tuning)
    alone = capture(tiny_teacher, [CORPUS], str(tmp_path / "d"), spec.model_copy(update={"packing": "document"}),
                    tuning=tuning)  # fmt: skip
    # The same tokens in the same order, in fewer sequences: documents were packed together.
    assert packed.num_tokens == alone.num_tokens == 900
    assert packed.num_sequences < alone.num_sequences
    pieces = packed.manifest().column("sequence").to_numpy()
    assert np.bincount(pieces).max() >= 3  # some sequence holds three documents or more
    assert np.all(packed.sequence_lengths() <= 96)
    assert_same_soft_labels(packed, alone, tuning.logp_codec)
    assert verify(packed.url).ok


class _PrefixMeanLM(torch.nn.Module):
    """A causal LM whose every position averages the embeddings of all before it: it takes
    position ids but ignores them, like an attention that does not know packed sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.config = SimpleNamespace(_attn_implementation="prefix-mean")

    def get_decoder(self) -> torch.nn.Module:
        return self

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        x = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return SimpleNamespace(last_hidden_state=x)


def test_packed_documents_need_an_attention_that_keeps_documents_apart(tiny_teacher):
    check_document_attention(tiny_teacher.model, "teacher")  # sdpa honors restarting position ids
    with pytest.raises(LogitStoreError, match=r"the teacher \(_PrefixMeanLM.*--packing document"):
        check_document_attention(_PrefixMeanLM(), "teacher")


def test_a_teacher_placed_by_device_map_and_offloaded_writes_the_same_store(tiny_teacher, tiny_teacher_dir, tmp_path):
    """device_map="auto" with no room in memory: accelerate offloads every weight to disk (meta
    parameters, read back per module). Same fingerprint, and the store of the plain teacher."""
    spec = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=64, max_tokens=300)
    offloaded = load_teacher(str(tiny_teacher_dir), device_map="auto", max_memory={"cpu": "64KB"},
                             offload_folder=str(tmp_path / "offload"))  # fmt: skip
    assert any(p.is_meta for p in offloaded.model.parameters())  # really offloaded
    assert offloaded.info == tiny_teacher.info
    a = capture(offloaded, [CORPUS], str(tmp_path / "a"), spec)
    b = capture(tiny_teacher, [CORPUS], str(tmp_path / "b"), spec)
    assert verify(a.url).digest == verify(b.url).digest


def test_units_and_batches_do_not_change_content(tiny_teacher, tmp_path):
    """Segment and batch boundaries are bookkeeping: the digest depends on content only."""
    spec = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=64, max_tokens=300, packing="document")
    a = capture(tiny_teacher, [CORPUS], str(tmp_path / "a"), spec, tuning=CaptureTuning(unit_tokens=10_000))
    b = capture(tiny_teacher, [CORPUS], str(tmp_path / "b"), spec,
                tuning=CaptureTuning(unit_tokens=90, batch_tokens=64, row_chunk=5))
    assert len(a.segments) == 1 and len(b.segments) > 2
    da, db = verify(a.url), verify(b.url)
    assert da.ok and db.ok
    # Batched (padded) forwards differ from single ones only by float rounding; compare decoded.
    np.testing.assert_array_equal(a.read(0, 300).topk_ids, b.read(0, 300).topk_ids)
    np.testing.assert_allclose(a.read(0, 300).lse, b.read(0, 300).lse, atol=1e-5)


def test_plan_units_is_a_partition():
    lengths = [5, 7, 3, 10, 1, 1, 9]
    units = plan_units(lengths, unit_tokens=12)
    assert [list(u) for u in units] == [[0, 1], [2], [3, 4, 5], [6]]
    assert plan_units([50], unit_tokens=10) == [range(0, 1)]


def test_capture_refuses_an_existing_store(tiny_teacher, tmp_path):
    spec = CaptureSpec(mode="topk", k=4, max_len=32, max_tokens=50)
    capture(tiny_teacher, [CORPUS], str(tmp_path / "s"), spec)
    with pytest.raises(StoreExistsError, match="--resume"):
        capture(tiny_teacher, [CORPUS], str(tmp_path / "s"), spec)


def test_resume_after_losing_a_unit_gives_the_same_digest(tiny_teacher, tmp_path):
    spec, tuning = CaptureSpec(mode="topk", k=8, max_len=64, max_tokens=400), CaptureTuning(unit_tokens=100)
    full = capture(tiny_teacher, [CORPUS], str(tmp_path / "s"), spec, tuning=tuning)
    digest = verify(full.url).digest
    # Un-commit two units (as if the writer died before their commit records), then resume.
    for i in (1, 3):
        (tmp_path / "s" / "commits" / f"{i:06d}.json").unlink()
    (tmp_path / "s" / "index.json").unlink()
    assert not open_store(full.url).complete
    resumed = capture(tiny_teacher, [CORPUS], str(tmp_path / "s"), spec, tuning=tuning, resume=True)
    assert resumed.complete and verify(resumed.url).digest == digest
    with pytest.raises(LogitStoreError, match=r"capture\.k"):
        capture(tiny_teacher, [CORPUS], str(tmp_path / "s"), spec.model_copy(update={"k": 9}), tuning=tuning,
                resume=True)


def test_progress_reports_every_batch_and_a_raising_observer_stops_the_capture(tiny_teacher, tmp_path):
    spec = CaptureSpec(mode="topk", k=8, max_len=64, max_tokens=400)
    tuning = CaptureTuning(unit_tokens=200, batch_tokens=64)
    seen: list[CaptureProgress] = []
    store = capture(tiny_teacher, [CORPUS], str(tmp_path / "s"), spec, tuning=tuning, progress=seen.append)
    sizes = [b - a for a, b in store.segment_spans()]
    # One report before the first batch, then one per teacher batch (several per unit) with the
    # running token count, which passes every unit boundary.
    done = [p.tokens_done for p in seen]
    assert done[0] == 0 and done[-1] == store.num_tokens and done == sorted(set(done))
    assert set(np.cumsum(sizes).tolist()) <= set(done) and len(done) > 2 * len(sizes)
    assert all(p.tokens_total == store.num_tokens for p in seen)
    assert seen[-1].eta_s == 0 and seen[-1].tokens_per_s > 0

    # Cancelling = raising from the observer; the committed units survive and resume finishes.
    class Cancelled(Exception):
        pass

    def cancel_after_two(p: CaptureProgress) -> None:
        if p.tokens_done >= sum(sizes[:2]):
            raise Cancelled

    with pytest.raises(Cancelled):
        capture(tiny_teacher, [CORPUS], str(tmp_path / "c"), spec, tuning=tuning, progress=cancel_after_two)
    resumed: list[CaptureProgress] = []
    store_c = capture(tiny_teacher, [CORPUS], str(tmp_path / "c"), spec, tuning=tuning, resume=True,
                      progress=resumed.append)
    assert resumed[0].tokens_done >= sizes[0] and resumed[0].tokens_this_run == 0
    assert verify(store_c.url).digest == verify(store.url).digest


def test_cli_capture_info_verify(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(CORPUS), "--out", str(out),
                   "--mode", "topk", "--k", "8", "--temperatures", "1,2", "--max-len", "64", "--max-tokens", "200",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0
    capsys.readouterr()
    assert cli_main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == 200 and info["meta"]["capture"]["temperatures"] == [1.0, 2.0]
    assert cli_main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["tokens"] == 200 and len(report["digest"]) == 64

    # The same capture with the teacher offloaded to disk by --device-map: the same store.
    offloaded = tmp_path / "offloaded"
    rc = cli_main(["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(CORPUS), "--out", str(offloaded),
                   "--mode", "topk", "--k", "8", "--temperatures", "1,2", "--max-len", "64", "--max-tokens", "200",
                   "--device-map", "auto", "--max-memory", "cpu=64KB", "--offload-folder", str(tmp_path / "w"),
                   "--no-progress"])  # fmt: skip
    assert rc == 0
    assert verify(str(offloaded)).digest == report["digest"]


def test_cli_counts_only_capture(tiny_teacher_dir, tmp_path, capsys):
    args = ["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(CORPUS), "--out", str(tmp_path / "c"),
            "--mode", "sampled", "--draws", "9", "--counts-only", "--temperatures", "1,2,4", "--max-len", "64",
            "--max-tokens", "100", "--device", "cpu", "--no-progress"]
    assert cli_main(args) == 1  # temperatures 1,2,4 need log-probs
    assert "--counts-only: needs temperatures [1]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert cli_main([*args, "--temperatures", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "c")]) == 0
    assert "sampled (9 draws, seed 0, counts only) k=9" in capsys.readouterr().out


def test_cli_capture_without_mode_flags_writes_the_default_store(tiny_teacher_dir, tmp_path, capsys):
    """The default store (issue 22): 64 sampled draws at T=1, counts only; --no-counts-only keeps the log-probs."""
    args = ["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(CORPUS), "--max-len", "64",
            "--max-tokens", "100", "--device", "cpu", "--no-progress"]
    assert cli_main([*args, "--out", str(tmp_path / "default")]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "default"), "--json"]) == 0
    cap = json.loads(capsys.readouterr().out)["meta"]["capture"]
    assert (cap["mode"], cap["draws"], cap["seed"], cap["counts_only"], cap["temperatures"]) == (
        "sampled", 64, 0, True, [1.0])
    assert cap["k"] == 64 and cap.get("head", 0) == 0  # min(k=64, draws=64) slots, no head
    default = open_store(str(tmp_path / "default"))
    block = default.read(0, 100)
    assert block.topk_logp is None and block.counts is not None
    assert np.all(block.counts.sum(axis=1, dtype=np.int64) <= 64) and block.counts.sum(axis=1).max() == 64

    assert cli_main([*args, "--out", str(tmp_path / "logp"), "--no-counts-only"]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "logp"), "--json"]) == 0
    cap = json.loads(capsys.readouterr().out)["meta"]["capture"]
    assert (cap["mode"], cap["draws"], cap["temperatures"]) == ("sampled", 64, [1.0])
    assert not cap.get("counts_only", False)
    with_logp = open_store(str(tmp_path / "logp")).read(0, 100)
    assert with_logp.topk_logp is not None and np.isfinite(with_logp.topk_logp[with_logp.topk_ids >= 0]).all()
    # The same draws either way (the seed and positions key them); only the log-probs differ.
    np.testing.assert_array_equal(with_logp.counts.sum(axis=1), block.counts.sum(axis=1))
    assert verify(str(tmp_path / "default")).ok and verify(str(tmp_path / "logp")).ok


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--temperatures", "1,1"], "--temperatures 1,1: must be distinct"),
        (["--temperatures", "1,1e-300"], "--temperatures 1,1e-300: each must be in [0.01, 100]"),
        (["--mode", "topk", "--head", "4"], "--head 4: applies to mode 'sampled' only"),
        (["--mode", "sampled", "--draws", "50", "--head", "4090"], "--head 4090: head + min(k, draws) = 4140 slots"),
        (["--corpus", "missing.txt"], "missing.txt: corpus file not found"),
        (["--corpus", "notes.md"], "unsupported corpus file type '.md'"),
        (["--corpus", "empty.txt"], "the corpus is empty"),
        (["--out", "existing"], "already holds a store"),
        (["--out", "nothing", "--resume"], "holds no store to resume"),
        (["--gpus", "2", "--tp", "2"], "--gpus and --tp: data parallelism over tensor-parallel groups"),
        (["--device-map", "auto", "--tp", "2"], "--device-map places one teacher over all the GPUs"),
        (["--max-memory", "0=70GiB"], "--max-memory and --offload-folder apply to --device-map"),
    ],
)
def test_cli_refuses_bad_input_before_loading_the_teacher(tmp_path, capsys, monkeypatch, flags, expected):
    """The teacher path does not exist: each error must come from the checks that run before it loads."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.md").write_text("text")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "zarr.json").write_text("{}")
    base = {"--teacher": "no-such-teacher-dir/", "--corpus": str(CORPUS), "--out": "new", "--device": "cpu"}
    given = dict(zip(flags[::2], flags[1::2], strict=False))
    argv = [a for flag, value in {**base, **given}.items() for a in (flag, value)]
    argv += [f for f in flags if f == "--resume"]
    assert cli_main(["capture", *argv, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and expected in err and "teacher" not in err.split(expected)[0]
    assert not (tmp_path / "new").exists()


def test_a_max_len_past_the_teacher_context_is_refused(tiny_teacher, tiny_teacher_dir, tmp_path, capsys):
    """The tiny teacher was trained for 512 positions: 513 would give soft labels past them."""
    rc = cli_main(["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(CORPUS), "--out",
                   str(tmp_path / "o"), "--max-len", "513", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--max-len 513: 513 tokens exceed the teacher's context length 512" in err
    assert "Loading weights" not in err and not (tmp_path / "o").exists()  # refused before loading it
    with pytest.raises(SpecError) as e:  # and by the engine, for callers that skip the CLI
        capture(tiny_teacher, [CORPUS], str(tmp_path / "e"), CaptureSpec(max_len=513, max_tokens=50))
    assert e.value.problems[0][0] == "max_len" and not (tmp_path / "e").exists()


def test_the_teacher_dtype_is_chosen_and_recorded(tiny_teacher_dir, tmp_path, capsys):
    args = ["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(CORPUS), "--mode", "topk", "--k", "8",
            "--max-len", "64", "--max-tokens", "128", "--device", "cpu", "--no-progress"]
    assert cli_main([*args, "--out", str(tmp_path / "f32")]) == 0
    assert cli_main([*args, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    f32, bf16 = open_store(str(tmp_path / "f32")), open_store(str(tmp_path / "bf16"))
    assert (f32.meta.teacher.dtype, bf16.meta.teacher.dtype) == ("float32", "bfloat16")  # auto on CPU: float32
    assert f32.meta.teacher.weights_sha256 != bf16.meta.teacher.weights_sha256
    a, b = f32.read(0, 128), bf16.read(0, 128)
    assert np.mean(a.topk_ids[:, 0] == b.topk_ids[:, 0]) > 0.9  # the same teacher, rounded differently
    capsys.readouterr()
    bf16_teacher = load_teacher(str(tiny_teacher_dir), device="cpu", dtype="bfloat16")
    with pytest.raises(SpecError, match="dtype: float32 asked for"):  # the engine checks what it was given
        capture(bf16_teacher, [CORPUS], str(tmp_path / "x"), CaptureSpec(max_len=64, max_tokens=50, dtype="float32"))


def test_cli_errors_are_one_line(tiny_teacher_dir, tmp_path, capsys):
    rc = cli_main(["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(tmp_path / "missing.txt"),
                   "--out", str(tmp_path / "o"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error:") and "missing.txt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written
    rc = cli_main(["capture", "--teacher", str(tiny_teacher_dir), "--corpus", str(CORPUS), "--out",
                   str(tmp_path / "o"), "--temperatures", "2,4", "--device", "cpu", "--no-progress"])
    assert rc == 1 and "include 1" in capsys.readouterr().err


@pytest.mark.slow
def test_capture_smollm2_gguf(smollm2_teacher, tmp_path):
    """The real teacher over a few hundred tokens of the example corpus."""
    spec = CaptureSpec(mode="topk", k=64, temperatures=(1.0, 2.0), max_len=160, max_tokens=320)
    store = capture(smollm2_teacher, [CORPUS], str(tmp_path / "smol"), spec)
    assert store.num_tokens == 320 and store.meta.tokenizer.logits_width == 49152
    assert_matches_reference(store, smollm2_teacher.model, CaptureTuning().logp_codec, lse_atol=1e-3)
    block = store.read(0, 320)
    # A real language model: its top-k holds most of the mass (DESIGN: ~0.93 at k=64).
    assert np.exp(block.topk_logp).sum(axis=1).mean() > 0.8
    assert verify(store.url).ok
