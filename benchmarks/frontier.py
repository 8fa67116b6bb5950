"""The quality frontier (issue 22): store bytes per token against recovery of online KD's gain.

Many store settings, alphas and seeds, on the same student, tokens and held-out text:

    python benchmarks/frontier.py                                  # everything: 31 stores x 2 alphas x 3 seeds
    python benchmarks/frontier.py --seeds 0                        # one seed (a first frontier)
    python benchmarks/frontier.py --corpus examples/data/kjv-genesis-judges.txt --seeds 0
    python benchmarks/frontier.py --report                         # table and plot from what is done
    python benchmarks/frontier.py --report --results a.jsonl --results b.jsonl

A point is (setting, alpha, seed): a student trained with `benchmarks/quality.py`'s loop (same
tokens, order, student config, steps, batch, lr and schedule for every point) and evaluated on the
held-out split (the end of the corpus) with quality.py's `evaluate`: the exact full-vocabulary
KL(teacher || student) at T = 1, the student's perplexity, top-1 agreement and speculative-decoding
acceptance. The settings (every store captured with temperatures [1]; training runs at T = 1):

- `topk16`, `topk64`: the k likeliest ids + the tail bucket.
- `sampled_m16` .. `sampled_m128`: M seeded draws, counts only (no log-probs), k = M. The stored
  slots are min(k, draws) = M whatever k >= M is given, so k = M is the same store as the largest k
  the spec accepts (4096); draws are capped at 255 by the format (8-bit counts), so M <= 255.
- `head{H}_d{D}`, H in 1, 4, 8, 16 and D in 8, 16, 32: the top H ids exact + D draws from the rest,
  k = D, with log-probs; `head{H}_d{D}_counts`: the same ids and counts with the head's log-probs
  alone (counts-only tail: the same gradient, fewer bytes).
- `adaptive`: the fewest ids (at most 64) reaching 99% of the T = 1 mass.
- baselines: `ce` (hard labels only, one point per seed: alpha does not apply) and `online`
  (full-vocabulary KD with the teacher in the loop, at each alpha); both read the topk64 store's tokens.

Resumable: every finished point appends one JSON line to `--results` (default
results/frontier/<corpus stem>.jsonl; one write, flushed and fsynced), carrying a fingerprint of
the configuration (corpus sha256, train tokens, steps, batch, sequence length, lr, warmup,
student, held-out tokens and fraction, teacher, device type); a point whose key and fingerprint are already in
the file is skipped, so a killed run loses at most the point in progress and the next
invocation continues. The stores persist in `--work` (default /tmp/logitstore-frontier/<corpus
stem>-<config hash>), are captured only when a pending point needs them (the teacher's decoder
runs once per process, shared by the captures: quality.py's SharedForward), and are reused when
they open, are complete and hold the same spec, teacher and tokens. The teacher's held-out
logits are computed once per process (about 0.8 GB at 4096 held-out tokens).

`--report` trains nothing: for every (setting, alpha) whose ce and online (same alpha) baselines
exist for the same seeds it prints one JSON line with the seed means and the recoveries
(ce - arm) / (ce - online) of KL, perplexity, top-1 and acceptance (of the seed means, and per
seed), and writes frontier.md (table by bytes/token, Pareto-optimal points on (bytes/token, KL
recovery) per alpha, and the ones meeting >= 95% KL and >= 90% perplexity recovery) and
frontier.png next to the first results file.

Time on the shared 2-core CPU box, at the defaults (98,304 tokens, 192 steps x 4 x 128, tiny
student, 4096 held-out tokens) with --threads 1. This is an extrapolation from a short run, not a
measured full run: with 8,192 tokens and 16 steps (--threads 1) training ran at a median 674 tokens/s
for topk64, 913 for sampled_m64, 697 for head16_d32, 1184 for ce and 180 for online; a point's
evaluation took 8-15 s (the teacher's half done once per process: 19 s), a store's capture 30 s
for the first (the teacher's decoder) and 7-8 s for each further one. Scaled to 192 steps and
98k tokens: a KD point ~2-2.7 min, ce ~1.6 min, online ~9.5 min; the first capture ~6 min, each
further one ~1.5 min. The full grid (31 stores, 186 KD points, 6 online and 3 ce points) is then
~9 hours, one seed (`--seeds 0`) ~3.5 hours. Measured on the session-28 box at --threads 2: a KD
point 1.4-2 min, a capture ~1 min, online 15-26 min. quality.py's measured 98k runs took 187 s (topk64)
and 787 s (online) per arm at 2 threads with other work beside it (docs/results.md), so allow
for more on a busy box. Peak memory ~4.5 GB at 8k tokens (the teacher's held-out logits are
0.8 GB, its cached decoder outputs 0.23 GB at 98k tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from quality import (
    CORPUS,
    ROOT,
    STUDENTS,
    SharedForward,
    evaluate,
    heldout_windows,
    recovery,
    split_corpus,
    store_info,
    store_spec,
    student_config,
    token_layout,
    train_arm,
)
from transformers import AutoModelForCausalLM

from logitstore import open_store
from logitstore.capture.corpus import read_documents, tokenize_and_pack
from logitstore.capture.engine import capture
from logitstore.capture.teacher import Teacher, load_teacher, resolve_device

T1 = {"temperatures": (1.0,)}
# Candidate stores: name -> CaptureSpec fields (max_len and max_tokens come from the CLI).
CANDIDATES: dict[str, dict] = {
    "topk16": dict(mode="topk", k=16, **T1),
    "topk64": dict(mode="topk", k=64, **T1),
    **{f"sampled_m{m}": dict(mode="sampled", k=m, draws=m, seed=0, counts_only=True, **T1) for m in (16, 32, 64, 128)},
    **{f"head{h}_d{d}{'_counts' * c}": dict(mode="sampled", head=h, draws=d, k=d, seed=0, counts_only=c, **T1)
       for h in (1, 4, 8, 16) for d in (8, 16, 32) for c in (False, True)},
    "adaptive": dict(mode="adaptive", k=64, coverage=0.99, **T1),
}
BASELINES = {"ce": ("topk64", "ce"), "online": ("topk64", "online")}  # setting -> (store it reads, loss)
# A counts-only tail behind a head holds the same ids and counts as its twin with every log-prob, and
# trains the same student (same gradient to float rounding: tests/trainer/test_train.py::
# test_a_counts_only_store_trains_the_same_student[2]): it is captured for its bytes only, and the
# report gives it its twin's students.
TWINS = {name: name.removesuffix("_counts") for name, spec in CANDIDATES.items() if spec.get("head") and
         spec.get("counts_only")}  # fmt: skip


def estimated_bytes(spec: dict) -> float:
    """A rough bytes/token for ordering only: head slots x (id + log-prob) + drawn slots x (id +
    count, or id + log-prob + count)."""
    drawn = min(spec["k"], spec.get("draws", spec["k"]))
    return spec.get("head", 0) * 4 + drawn * (3 if spec.get("counts_only") else 4)


# The default order: the baselines, then the cheapest candidates first (estimated bytes).
SETTINGS = ["ce", "online", *sorted(CANDIDATES, key=lambda n: (estimated_bytes(CANDIDATES[n]), n))]
METRICS = ("heldout_kl", "heldout_ppl", "heldout_top1", "heldout_accept")
PRESET = dict(train_tokens=98_304, heldout_tokens=4096, seq_len=128, batch_size=4, steps=192, lr=3e-3,
              warmup_steps=4, student="tiny", eval_batch=8)  # fmt: skip
TARGET = {"heldout_kl": 0.95, "heldout_ppl": 0.90}  # recovery the frontier looks for


# ---------------------------------------------------------------- results file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(args) -> dict:
    """Everything a point's numbers depend on besides (setting, alpha, seed)."""
    return {"corpus": Path(args.corpus).name, "corpus_sha256": sha256_file(Path(args.corpus)),
            "train_tokens": args.train_tokens, "steps": args.steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": args.warmup_steps, "student": args.student,
            "heldout_tokens": args.heldout_tokens, "heldout_fraction": args.heldout_fraction,
            "teacher": args.teacher, "device": torch.device(args.device).type}  # fmt: skip


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def point_key(setting: str, alpha: float | None, seed: int) -> str:
    return f"{setting}|{'-' if alpha is None else f'a{alpha:g}'}|s{seed}"


def read_lines(path: Path) -> list[dict]:
    """The results file's lines; a torn last line (a kill mid-write) is skipped with a warning."""
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"frontier: {path}:{n}: not JSON, skipped", file=sys.stderr)
    return out


def append_line(path: Path, record: dict) -> None:
    """One write of one line, flushed and fsynced; starts on a new line if a torn write left none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record) + "\n"
    with path.open("a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = "\n" + data
        f.write(data.encode())
        f.flush()
        os.fsync(f.fileno())


def lock(path: Path):
    """An exclusive lock on `path` (created) for this process's lifetime, or exit: one driver per
    results file and per work directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"frontier: {path} is locked: another frontier run uses it") from None
    return f


# ---------------------------------------------------------------- points


def plan(settings: list[str], alphas: list[float], seeds: list[int]) -> list[tuple[str, float | None, int]]:
    """Seed by seed, alpha by alpha, in settings order: a partial run has whole frontiers early."""
    points = []
    for seed in seeds:
        for i, alpha in enumerate(alphas):
            for s in settings:
                if s == "ce":
                    if i == 0:
                        points.append((s, None, seed))
                else:
                    points.append((s, alpha, seed))
    return points


class MemoTeacher(torch.nn.Module):
    """The teacher with its logits memoized by the input ids: every point is evaluated on the same
    held-out windows in the same batches, so the teacher runs once per process."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        key = hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.inner(input_ids=input_ids).logits
        return SimpleNamespace(logits=self.cache[key])


class Stores:
    """The stores the points read, captured on first use into `root/name` (or reused), all checked to
    hold the same tokens in the same sequences and segments (so every point sees the same data order)."""

    def __init__(self, teacher: Teacher, train_file: Path, root: Path, args) -> None:
        self.teacher, self.train_file, self.root, self.args = teacher, train_file, root, args
        self.shared = SharedForward(teacher.model)  # the decoder runs once per process
        self.runner = dataclasses.replace(teacher, model=self.shared)
        self.info: dict[str, dict] = {}
        self.layout: tuple | None = None
        packed = tokenize_and_pack(read_documents([train_file]), teacher.tokenizer, max_len=args.seq_len,
                                   max_tokens=args.train_tokens)
        self.corpus = (packed.fingerprint, packed.tokens)

    def reusable(self, url: Path, name: str) -> bool:
        if not url.exists():
            return False
        try:
            store = open_store(str(url))
            meta = store.meta
            wanted = store_spec(CANDIDATES[name], self.args).stored(
                logp_codec=meta.capture.logp_codec, chunk_tokens=meta.capture.chunk_tokens)
            return (store.complete and meta.capture == wanted
                    and meta.teacher.weights_sha256 == self.teacher.info.weights_sha256
                    and (meta.corpus.fingerprint, meta.corpus.tokens) == self.corpus)  # fmt: skip
        except Exception as e:  # anything that does not open as this store is captured again
            print(f"frontier: {url} does not open ({type(e).__name__}: {e}); capturing it again", file=sys.stderr)
            return False

    def get(self, name: str) -> dict:
        if name in self.info:
            return self.info[name]
        url = self.root / name
        capture_s = None
        if not self.reusable(url, name):
            shutil.rmtree(url, ignore_errors=True)
            started = time.perf_counter()
            capture(self.runner, [self.train_file], str(url), store_spec(CANDIDATES[name], self.args))
            capture_s = time.perf_counter() - started
        layout = token_layout(str(url))
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise SystemExit(f"store {url} does not hold the same tokens, sequences and segments as the others")
        self.info[name] = {"url": str(url), **store_info(str(url)), "capture_s": capture_s}
        print(json.dumps({"bench": "frontier", "store": name, "spec": CANDIDATES[name],
                          **{k: v for k, v in self.info[name].items() if k != "url"},
                          "reused": capture_s is None}), flush=True)  # fmt: skip
        return self.info[name]


def run(args) -> None:
    results = Path(args.results[0])
    fp = fingerprint(args)
    fid = fingerprint_id(fp)
    stem = Path(args.corpus).stem
    store_key = hashlib.sha256(json.dumps([fp["corpus_sha256"], args.train_tokens, args.seq_len, args.teacher,
                                           args.heldout_fraction]).encode()).hexdigest()[:12]
    work = Path(args.work or "/tmp/logitstore-frontier") / f"{stem}-{store_key}"
    held = [lock(Path(str(results) + ".lock")), lock(work / ".lock")]  # noqa: F841 (held until exit)

    lines = [r for r in read_lines(results) if r.get("fingerprint_id") == fid]
    done = {r["key"] for r in lines if r.get("kind") in ("point", "store")}
    have_teacher = any(r.get("kind") == "teacher" for r in lines)
    # Twins first: a capture each (no training), and their bytes place them on the frontier.
    points = [(s, None, -1) for s in args.settings if s in TWINS]  # key "X_counts|-|s-1"
    points += plan([s for s in args.settings if s not in TWINS], args.alphas, args.seeds)
    pending = [p for p in points if point_key(*p) not in done]
    print(json.dumps({"bench": "frontier", "results": str(results), "fingerprint_id": fid, "work": str(work),
                      "points": len(points), "skipped": len(points) - len(pending), "pending": len(pending),
                      "skipped_keys": sorted(point_key(*p) for p in points if point_key(*p) in done)}),
          flush=True)  # fmt: skip
    if not pending and have_teacher:
        return

    device = resolve_device(args.device)
    work.mkdir(parents=True, exist_ok=True)
    train_file, heldout_file = split_corpus(Path(args.corpus), args.heldout_fraction, work)
    teacher = load_teacher(args.teacher, device=device)
    vocab = teacher.tokenizer_info.vocab_size
    student = student_config(args.student, work) if args.student in STUDENTS else args.student
    windows = heldout_windows(heldout_file, teacher.tokenizer, args.seq_len, args.heldout_tokens)
    memo = MemoTeacher(teacher.model)
    stores = Stores(teacher, train_file, work / "stores", args)
    common = {"bench": "frontier", "fingerprint": fp, "fingerprint_id": fid, "device": str(device),
              "threads": torch.get_num_threads()}  # fmt: skip

    if not have_teacher:
        started = time.perf_counter()
        metrics = evaluate(memo, {}, windows, vocab, args.eval_batch, device)["teacher"]
        record = {**common, "kind": "teacher", "key": "teacher", **metrics,
                  "heldout_positions": int(sum(len(w) for w in windows)), "eval_s": time.perf_counter() - started,
                  "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
        append_line(results, record)
        print(json.dumps(record), flush=True)

    for setting, alpha, seed in pending:
        store_name, loss = BASELINES.get(setting, (setting, "kd"))
        info = stores.get(store_name)
        if setting in TWINS:
            record = {**common, "kind": "store", "key": point_key(setting, alpha, seed), "setting": setting,
                      "twin": TWINS[setting], "spec": CANDIDATES[setting], "bytes_per_token": info["bytes_per_token"],
                      "ids_per_token": info["ids_per_token"], "store_capture_s": info.pop("capture_s", None),
                      "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}  # fmt: skip
            append_line(results, record)
            print(json.dumps({k: v for k, v in record.items() if k != "fingerprint"}), flush=True)
            continue
        out = work / "runs" / point_key(setting, alpha, seed).replace("|", "_")
        shutil.rmtree(out, ignore_errors=True)  # a killed point's leftovers: start it over
        started = time.perf_counter()
        run_ = train_arm(info["url"], loss, False, seed, student, args, out, alpha=alpha or 0.0)
        eval_started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(run_["final"]).to(device).eval()
        metrics = evaluate(memo, {"student": model}, windows, vocab, args.eval_batch, device)["student"]
        eval_s = time.perf_counter() - eval_started
        del model
        record = {
            **common, "kind": "point", "key": point_key(setting, alpha, seed), "setting": setting, "alpha": alpha,
            "seed": seed, "loss": loss, "store": store_name, "spec": CANDIDATES.get(setting),
            "bytes_per_token": info["bytes_per_token"] if loss == "kd" else None,
            "ids_per_token": info["ids_per_token"] if loss == "kd" else None, **metrics,
            "train_wall_s": run_["train_wall_s"], "train_tokens_per_s": run_["train_tokens_per_s"],
            "final_train_loss": run_["curve"][-1]["loss"], "eval_s": eval_s,
            "point_s": time.perf_counter() - started, "store_capture_s": info.pop("capture_s", None),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        append_line(results, record)
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({k: v for k, v in record.items() if k != "fingerprint"}), flush=True)


# ---------------------------------------------------------------- report


def pareto(rows: list[dict], metric: str) -> set[int]:
    """Indices of rows no other row beats on both fewer bytes/token and higher recovery of `metric`."""
    ok = [i for i, r in enumerate(rows) if r["recovery"][metric] is not None]
    front = set()
    for i in ok:
        b, v = rows[i]["bytes_per_token"], rows[i]["recovery"][metric]
        dominated = any(
            rows[j]["bytes_per_token"] <= b and rows[j]["recovery"][metric] >= v
            and (rows[j]["bytes_per_token"] < b or rows[j]["recovery"][metric] > v)
            for j in ok if j != i
        )  # fmt: skip
        if not dominated:
            front.add(i)
    return front


def summarize(lines: list[dict]) -> tuple[list[dict], dict]:
    """One row per (setting, alpha) with ce and online at the same seeds (and alpha); baselines' means."""
    runs = {(r["setting"], r["alpha"], r["seed"]): r for r in lines if r.get("kind") == "point"}
    for twin in (r for r in lines if r.get("kind") == "store"):  # its twin's students, its own bytes
        for (name, a, s), r in list(runs.items()):
            if name == twin["twin"]:
                runs[(twin["setting"], a, s)] = {**r, "setting": twin["setting"], "twin": name,
                                                 **{k: twin[k] for k in ("bytes_per_token", "ids_per_token")}}
    rows = []
    pairs = sorted({(s, a) for s, a, _ in runs if s in CANDIDATES},
                   key=lambda p: (p[1], SETTINGS.index(p[0]) if p[0] in SETTINGS else 99, p[0]))
    for setting, alpha in pairs:
        seeds = sorted(s for (n, a, s) in runs if (n, a) == (setting, alpha)
                       and ("ce", None, s) in runs and ("online", alpha, s) in runs)  # fmt: skip
        if not seeds:
            continue

        def mean(name: str, a: float | None, metric: str, seeds=seeds) -> float:
            return float(np.mean([runs[(name, a, s)][metric] for s in seeds]))

        ce, arm, online = ({m: mean(n, a, m) for m in METRICS}
                           for n, a in (("ce", None), (setting, alpha), ("online", alpha)))
        # (ce - arm) / (ce - online): a ratio of two differences, so it reads the same for metrics where
        # lower is better (KL, perplexity) and where higher is better (top-1, acceptance): 1 = online's gain.
        rec = {m: recovery(ce, arm, online, m) for m in METRICS}
        per_seed = {m: [recovery(runs[("ce", None, s)], runs[(setting, alpha, s)], runs[("online", alpha, s)], m)
                        for s in seeds] for m in METRICS}  # fmt: skip
        rows.append({"setting": setting, "alpha": alpha, "seeds": seeds,
                     "bytes_per_token": mean(setting, alpha, "bytes_per_token"),
                     "ids_per_token": mean(setting, alpha, "ids_per_token"), **arm, "ce": ce, "online": online,
                     "recovery": rec, "recovery_per_seed": per_seed})  # fmt: skip
    for alpha in sorted({r["alpha"] for r in rows}):
        group = [r for r in rows if r["alpha"] == alpha]
        front = pareto(group, "heldout_kl")
        ppl_front = pareto(group, "heldout_ppl")
        for i, r in enumerate(group):
            r["pareto_kl"], r["pareto_ppl"] = i in front, i in ppl_front
    for r in rows:
        r["target_met"] = all(r["recovery"][m] is not None and r["recovery"][m] >= t for m, t in TARGET.items())
    baselines = {}
    for name, a, s in runs:
        if name in BASELINES:
            baselines.setdefault((name, a), []).append(s)
    base = {f"{n}" + ("" if a is None else f"@alpha={a:g}"): {
        "seeds": sorted(ss), **{m: float(np.mean([runs[(n, a, s)][m] for s in ss])) for m in METRICS}}
        for (n, a), ss in sorted(baselines.items(), key=lambda x: (x[0][0], x[0][1] or 0))}  # fmt: skip
    return rows, base


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def write_markdown(groups: list[tuple[dict, dict | None, list[dict], dict]], path: Path) -> None:
    out = ["# Quality frontier: bytes/token against recovery of online KD's gain", "",
           "Written by `python benchmarks/frontier.py --report`. Recovery = (ce − arm) / (ce − online) of the "
           "seed means (1 = all of online KD's gain over CE, at the same alpha; per-seed values in brackets). "
           "Pareto: no other setting at the same alpha has both fewer bytes/token and a higher KL recovery. "
           f"Target: KL recovery ≥ {TARGET['heldout_kl']:.0%} and perplexity recovery ≥ {TARGET['heldout_ppl']:.0%}. "
           "A setting named `X_counts` (a counts-only tail behind a head) is captured for its bytes only: it trains "
           "X's students (the same gradient, tested), so it shows X's metrics at its own size.",
           ""]  # fmt: skip
    for fp, teacher, rows, base in groups:
        out += [f"## {fp['corpus']}: {fp['train_tokens']} train tokens, {fp['steps']} steps x {fp['batch_size']} x "
                f"{fp['seq_len']}, lr {fp['lr']:g}, warmup {fp['warmup_steps']}, student {fp['student']}, "
                f"teacher {fp['teacher']}, {fp['heldout_tokens']} held-out tokens", ""]  # fmt: skip
        if teacher:
            out.append(f"Teacher on the held-out windows: perplexity {teacher['heldout_ppl']:.1f}.")
        out += ["", "| baseline | seeds | KL | ppl | top-1 | accept |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for name, b in base.items():
            out.append(f"| {name} | {','.join(map(str, b['seeds']))} | {b['heldout_kl']:.4f} | {b['heldout_ppl']:.1f} "
                       f"| {b['heldout_top1']:.4f} | {b['heldout_accept']:.4f} |")
        out += ["", "| setting | alpha | seeds | B/token | ids/token | KL | ppl | top-1 | KL recovery | ppl recovery "
                "| top-1 recovery | accept recovery | Pareto (KL) | target |",
                "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | :---: |"]
        for r in sorted(rows, key=lambda r: (r["bytes_per_token"], r["alpha"])):
            def rec(m: str, r=r) -> str:
                seeds = r["recovery_per_seed"][m]
                extra = f" ({', '.join(_pct(x).rstrip('%') for x in seeds)})" if len(seeds) > 1 else ""
                return _pct(r["recovery"][m]) + extra

            out.append(f"| {r['setting']} | {r['alpha']:g} | {','.join(map(str, r['seeds']))} | "
                       f"{r['bytes_per_token']:.1f} | {r['ids_per_token']:.1f} | {r['heldout_kl']:.4f} | "
                       f"{r['heldout_ppl']:.1f} | {r['heldout_top1']:.4f} | {rec('heldout_kl')} | "
                       f"{rec('heldout_ppl')} | {rec('heldout_top1')} | {rec('heldout_accept')} | "
                       f"{'●' if r['pareto_kl'] else ''} | {'✓' if r['target_met'] else ''} |")  # fmt: skip
        out.append("")
    path.write_text("\n".join(out) + "\n")


def family(setting: str) -> str:
    return next(f for f in ("topk", "sampled", "head", "adaptive") if setting.startswith(f))


def plot(groups: list[tuple[dict, dict | None, list[dict], dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"topk": "tab:blue", "sampled": "tab:orange", "head": "tab:purple", "adaptive": "tab:green"}
    markers = ["o", "^", "s", "D", "v"]
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.6 * len(groups)), squeeze=False)
    for row_axes, (fp, _, rows, _) in zip(axes, groups, strict=True):
        alphas = sorted({r["alpha"] for r in rows})
        for ax, (metric, title) in zip(row_axes, (("heldout_kl", "held-out KL recovery"),
                                                  ("heldout_ppl", "held-out perplexity recovery")), strict=True):
            for ai, alpha in enumerate(alphas):
                group = [r for r in rows if r["alpha"] == alpha and r["recovery"][metric] is not None]
                marker = markers[ai % len(markers)]
                for r in group:
                    y = r["recovery"][metric]
                    seeds = [v for v in r["recovery_per_seed"][metric] if v is not None]
                    yerr = [[y - min(seeds)], [max(seeds) - y]] if len(seeds) > 1 else None
                    ax.errorbar(r["bytes_per_token"], y, yerr=yerr, fmt=marker, color=colors[family(r["setting"])],
                                markersize=6, elinewidth=0.8, capsize=2, alpha=0.9)  # fmt: skip
                    if ai == 0 or not any(q["setting"] == r["setting"] for q in rows if q["alpha"] == alphas[0]):
                        ax.annotate(r["setting"], (r["bytes_per_token"], y), fontsize=6, xytext=(3, 2),
                                    textcoords="offset points")
                front = sorted((r for r in group if r[f"pareto_{metric.split('_')[1]}"]),
                               key=lambda r: r["bytes_per_token"])
                if front:
                    ax.step([r["bytes_per_token"] for r in front], [r["recovery"][metric] for r in front],
                            where="post", color="0.3", ls="--" if ai == 0 else ":", lw=1,
                            label=f"Pareto front, alpha={alpha:g}")  # fmt: skip
                ax.plot([], [], marker, color="0.4", ls="none", label=f"alpha={alpha:g}")
            ax.axhline(1.0, color="tab:green", lw=0.8, alpha=0.6)
            ax.axhline(0.0, color="0.5", lw=0.8, alpha=0.6)
            ax.axhline(TARGET[metric], color="tab:red", lw=0.8, ls="--", alpha=0.6)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=6)
            ax.set_xlabel("bytes / token (log scale)")
            ax.set_ylabel("recovery of online KD's gain over CE")
            ax.set_title(f"{fp['corpus']}: {title} (1 = online, 0 = CE, red: target)", fontsize=9)
            for fam, c in colors.items():
                ax.plot([], [], "s", color=c, label=fam)
            ax.legend(fontsize=7, loc="lower right")
            ax.grid(True, which="both", alpha=0.25)
    fig.suptitle("frontier: error bars span the per-seed recoveries", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(paths: list[Path]) -> None:
    latest: dict[tuple[str, str], dict] = {}  # (fingerprint id, key) -> its last line
    for path in paths:
        for r in read_lines(path):
            if "fingerprint_id" in r and "key" in r:
                latest[(r["fingerprint_id"], r["key"])] = r
    groups = []
    for fid in dict.fromkeys(f for f, _ in latest):
        lines = [r for (f, _), r in latest.items() if f == fid]
        teacher = next((r for r in lines if r.get("kind") == "teacher"), None)
        rows, base = summarize(lines)
        fp = lines[0]["fingerprint"]
        for r in rows:
            print(json.dumps({"bench": "frontier", "report": True, "fingerprint_id": fid, "corpus": fp["corpus"],
                              **{k: v for k, v in r.items() if k not in ("ce", "online")}}), flush=True)
        if rows:
            groups.append((fp, teacher, rows, base))
    if not groups:
        raise SystemExit("frontier: no (setting, alpha) has its ce and online baselines at the same seeds yet")
    out = paths[0].parent
    write_markdown(groups, out / "frontier.md")
    plot(groups, out / "frontier.png")
    print(json.dumps({"bench": "frontier", "wrote": [str(out / "frontier.md"), str(out / "frontier.png")]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated, run in this order (default: {','.join(SETTINGS)})")
    p.add_argument("--alphas", default="0,0.5", help="weights of the hard-label CE (ce ignores it)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--results", action="append",
                   help="JSON lines file (default results/frontier/<corpus stem>.jsonl); --report reads several")
    p.add_argument("--work", help="persistent stores (default /tmp/logitstore-frontier; a subdirectory per corpus "
                   "and capture config)")
    p.add_argument("--report", action="store_true", help="no training: the table and plot from --results")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--train-tokens", type=int, default=PRESET["train_tokens"])
    p.add_argument("--heldout-tokens", type=int, default=PRESET["heldout_tokens"])
    p.add_argument("--seq-len", type=int, default=PRESET["seq_len"])
    p.add_argument("--batch-size", type=int, default=PRESET["batch_size"])
    p.add_argument("--steps", type=int, default=PRESET["steps"])
    p.add_argument("--lr", type=float, default=PRESET["lr"])
    p.add_argument("--warmup-steps", type=int, default=PRESET["warmup_steps"])
    p.add_argument("--student", default=PRESET["student"], help="tiny, small, or a config/model path")
    p.add_argument("--eval-batch", type=int, default=PRESET["eval_batch"])
    args = p.parse_args()

    if not args.results:
        args.results = [str(ROOT / "results" / "frontier" / f"{Path(args.corpus).stem}.jsonl")]
    if args.report:
        report([Path(r) for r in args.results])
        return
    if len(args.results) > 1:
        raise SystemExit("frontier: training appends to one --results file")
    args.settings = args.settings.split(",")
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"frontier: unknown settings {unknown}; choose from {','.join(SETTINGS)}")
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = str(resolve_device(args.device))
    run(args)


if __name__ == "__main__":
    main()
