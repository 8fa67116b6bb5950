"""`make demo`: the whole product once, end to end, on this machine.

Starts `logitstore-server serve` (SQLite and stores in DEMO_DIR/data, one embedded worker),
creates a team and an API key, uploads tinyshakespeare (train part and held-out part) over
HTTP, captures both with the SmolLM2-135M teacher, trains a small Llama student from the
train store *over HTTP*, evaluates it on the held-out text and store, writes a markdown report
with the curves, and stops the server. The last line printed is the report's path.

On CPU a slice of the corpus is captured (the teacher runs at ~400 tokens/s on 2 cores);
on a GPU all of it. Every step is an ordinary API call or CLI run: README.md shows the same
flow by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "tinyshakespeare.txt"
STUDENT = ROOT / "examples" / "student-llama-tiny.json"


class DemoError(Exception):
    """A step failed; the message says which and why."""


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    args = _parser().parse_args()
    out = Path(args.out).resolve()
    started = time.perf_counter()
    try:
        report = run(args, out)
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    print(f"demo: done in {time.perf_counter() - started:.0f} s")
    print(report)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (`kill`, a CI timeout) unwinds like Ctrl-C, so the server and the trainer stop too."""
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    gpu = _cuda_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2-135m", help="model dir, .gguf, hub id or alias")
    p.add_argument("--student", default=str(STUDENT), help="student config.json (shares the teacher's tokenizer)")
    p.add_argument("--tokens", type=int, default=0 if gpu else 16384, help="train tokens to capture (0: all)")
    p.add_argument("--heldout-tokens", type=int, default=16384 if gpu else 2048)
    p.add_argument("--steps", type=int, default=2000 if gpu else 100)
    p.add_argument("--seq-len", type=int, default=512 if gpu else 128)
    p.add_argument("--batch-size", type=int, default=16 if gpu else 8)
    p.add_argument("--max-len", type=int, default=1024 if gpu else 256, help="sequence length the teacher sees")
    p.add_argument("--out", default=str(ROOT / "demo"), help="demo directory (replaced)")
    return p


def run(args: argparse.Namespace, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train_txt, heldout_txt = _split_corpus(out)
    timings: dict[str, float] = {}

    with _server(out, args.teacher) as (api, admin_key):
        admin = {"Authorization": f"Bearer {admin_key}"}
        _check(api.post("/v1/teams", json={"name": "demo"}, headers=admin), "create team")
        key = _check(api.post("/v1/teams/demo/keys", headers=admin), "create key")["key"]
        auth = {"Authorization": f"Bearer {key}"}
        print("demo: team 'demo' and an API key created")

        ids = {}
        for name, path in (("train", train_txt), ("heldout", heldout_txt)):
            with path.open("rb") as f:
                r = api.post("/v1/corpora", params={"filename": path.name}, content=f, headers=auth)
            ids[name] = _check(r, f"upload {path.name}")["id"]
        print(f"demo: uploaded {train_txt.name} and {heldout_txt.name}")

        t0 = time.perf_counter()
        # Small work units: a killed worker resumes from the last committed unit. The train store
        # takes the default capture settings; the held-out one is top-64 + tail, whose K+1 buckets
        # give the exact held-out KL (and acceptance bounds) at T = 1.
        common = {"teacher": "demo", "max_len": args.max_len, "unit_tokens": 4096}
        jobs = {
            "train": _check(api.post("/v1/captures", headers=auth, json={
                "corpus_id": ids["train"], "max_tokens": args.tokens or None, **common}), "capture request"),
            "heldout": _check(api.post("/v1/captures", headers=auth, json={
                "corpus_id": ids["heldout"], "max_tokens": args.heldout_tokens, "mode": "topk", "k": 64,
                **common}), "capture request"),
        }
        done = {name: _wait(api, auth, job["id"], name) for name, job in jobs.items()}
        timings["capture"] = time.perf_counter() - t0
        stores = {name: _check(api.get(f"/v1/stores/{job['store_id']}", headers=auth), "store info")
                  for name, job in done.items()}
        urls = {name: f"{api.base_url}/v1/stores/{job['store_id']}/zarr" for name, job in done.items()}

        t0 = time.perf_counter()
        run_dir = out / "run"
        print(f"demo: training {args.steps} steps from the store over HTTP")
        _run_cli("train", [
            sys.executable, "-m", "trainer", "--store", urls["train"], "--token", key, "--student", args.student,
            "--out", str(run_dir), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--seq-len", str(args.seq_len), "--lr", "2e-3", "--warmup-steps", str(max(1, args.steps // 20)),
            "--temperature", "1", "--eval-text", str(heldout_txt), "--eval-store", urls["heldout"],
            "--eval-every", str(max(1, args.steps // 5)), "--eval-tokens", "4096", "--log-every", "5",
            "--save-every", "0",
        ])
        timings["train"] = time.perf_counter() - t0

    plot = _run_cli("plot", [sys.executable, "-m", "trainer", "plot", str(run_dir)]).strip().splitlines()[-1]
    report = out / "report.md"
    report.write_text(_report(args, done, stores, run_dir, Path(plot).relative_to(out), timings))
    return report


def _split_corpus(out: Path) -> tuple[Path, Path]:
    """Paragraphs are documents: the last 10% of them are held out, never trained on."""
    paragraphs = CORPUS.read_text().split("\n\n")
    cut = len(paragraphs) * 9 // 10
    train, heldout = out / "shakespeare-train.txt", out / "shakespeare-heldout.txt"
    train.write_text("\n\n".join(paragraphs[:cut]) + "\n")
    heldout.write_text("\n\n".join(paragraphs[cut:]) + "\n")
    return train, heldout


@contextmanager
def _server(out: Path, teacher: str):
    """`logitstore-server serve` on a free loopback port → (client, admin key); stopped with
    SIGINT (uvicorn's graceful shutdown, which also stops the embedded worker) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    admin_key = secrets.token_urlsafe(24)
    log = out / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(out / "data"),
           "--teacher", f"demo={teacher}", "--gpus-per-job", "1" if _cuda_available() else "0"]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "LOGITSTORE_ADMIN_KEY": admin_key})
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise DemoError(f"the server exited with status {proc.returncode}; see {log}")
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"the server did not answer /healthz within 120 s; see {log}")
            time.sleep(0.3)
        print(f"demo: server up at {api.base_url} (log: {log})")
        yield api, admin_key
    finally:
        api.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise DemoError(f"the server did not stop within 60 s of SIGINT (killed); see {log}") from None
            print(f"demo: server stopped (exit status {proc.returncode})")


def _check(r: httpx.Response, what: str) -> dict:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        raise DemoError(f"{what}: HTTP {r.status_code}: {detail}")
    return r.json()


def _wait(api: httpx.Client, auth: dict, job_id: str, name: str) -> dict:
    """Poll a capture job until it ends, printing its progress now and then."""
    last = 0.0
    while True:
        job = _check(api.get(f"/v1/jobs/{job_id}", headers=auth), f"job {job_id}")
        if job["state"] == "succeeded":
            print(f"demo: capture '{name}' done: {job['tokens_done']} tokens")
            return job
        if job["state"] in ("failed", "cancelled"):
            raise DemoError(f"capture '{name}' {job['state']}: {job['error']}")
        if time.monotonic() - last > 10:
            total = job["tokens_total"] or "?"
            eta = f", ETA {job['eta_s']:.0f} s" if job["eta_s"] is not None else ""
            print(f"demo: capture '{name}' {job['state']}: {job['tokens_done']}/{total} tokens, "
                  f"{job['tokens_per_s']:.0f} tokens/s{eta}")
            last = time.monotonic()
        time.sleep(0.5)


def _run_cli(what: str, cmd: list[str]) -> str:
    """Run a CLI, its progress and errors on the terminal; returns its stdout (which is short)."""
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise DemoError(f"{what} failed (exit {proc.returncode}); its error is printed above")
    return proc.stdout


def _report(args, jobs: dict, stores: dict, run_dir: Path, plot: Path, timings: dict) -> str:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_kl" in r]
    train_logs = [r for r in records if "loss" in r]
    first, last = evals[0], evals[-1]
    train_info, heldout_info = stores["train"]["info"], stores["heldout"]["info"]
    fp16_bytes = 2 * train_info["meta"]["tokenizer"]["vocab_size"]
    tokens_trained = args.steps * args.batch_size * args.seq_len
    ppl = (first.get("eval_ppl", float("nan")), last.get("eval_ppl", float("nan")))
    store_rows = "\n".join(
        f"| {name} | {jobs[name]['tokens_done']} | {info['bytes_per_token']:.1f} | {jobs[name]['tokens_per_s']:.0f} |"
        for name, info in (("train", train_info), ("heldout", heldout_info))
    )
    rows = "\n".join(
        f"| {r['step']} | {r.get('eval_ppl', float('nan')):.1f} | {r['eval_kl']:.3f} | {r['eval_top1']:.3f} |"
        for r in evals
    )
    return f"""# logitstore demo report

Teacher `{args.teacher}` captured over HTTP by `logitstore-server`; student
`{Path(args.student).name}` trained from the store **over HTTP** with `logitstore-train`.

## Capture

| store | tokens | bytes/token | teacher tokens/s |
| --- | --- | --- | --- |
{store_rows}

The train store has the default capture settings: {_settings(train_info["meta"]["capture"])}.
The held-out store: {_settings(heldout_info["meta"]["capture"])}, whose tail bucket makes the held-out
KL exact. Both keep the full-vocabulary log-normalizer at T = 1. fp16 full logits would take
{fp16_bytes:,} bytes/token.

## Training

{args.steps} steps × {args.batch_size} × {args.seq_len} tokens = {tokens_trained:,} tokens, KD at T = 1
(the loss logged for a counts-only store is the cross-entropy to the draws: KL plus the
teacher's entropy); final train loss {train_logs[-1]['loss']:.4f}.

| step | held-out text perplexity | KL(teacher ‖ student), held-out store | top-1 agreement |
| --- | --- | --- | --- |
{rows}

From the first evaluation (step {first['step']}) to the last: perplexity {ppl[0]:.1f} → {ppl[1]:.1f},
KL {first['eval_kl']:.3f} → {last['eval_kl']:.3f}.

![curves]({plot.as_posix()})

## Wall time

capture (both stores, teacher load included) {timings['capture']:.0f} s; training with
evaluations {timings['train']:.0f} s.
"""


def _settings(cap: dict) -> str:
    """A store's capture settings in words, e.g. `sampled: the distinct ids of 64 draws ... (counts only)`."""
    if cap["mode"] == "sampled":
        head = f"the top {cap['head']} ids with log-probs + " if cap.get("head") else ""
        what = "counts only" if cap.get("counts_only") else "counts and log-probs"
        return f"sampled: {head}the distinct ids of {cap['draws']} draws from the teacher ({what})"
    return f"{cap['mode']}: the {cap['k']} likeliest ids with log-probs + the tail bucket"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
