"""Store read throughput over HTTP from logitstore-server vs direct local reads, same store, same run.

The store is captured through the server itself (upload → capture job → embedded worker),
then read whole, block by block, `--passes` times, by R concurrent reader processes (R = 1 and 8):
`local` opens the store directory, `http` opens `http://127.0.0.1:PORT/v1/stores/ID/zarr`
with an API key. Each reader reads every token once per pass, into one reused block as the trainer's
loader does; throughput is the aggregate.
Target: http >= 50% of local on loopback.

    python benchmarks/serve.py [--teacher tiny|smollm2-135m|DIR] [--tokens 131072] [--k 64] [--readers 1,8]
                               [--block 16384] [--passes 5] [--http-workers 1,2]

Prints one JSON line per measurement and one summary line per reader count with the ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from trainer.data import DEFAULT_READ_TOKENS

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "tinyshakespeare.txt"
KEY = "bench-admin"


def tiny_teacher(out: Path) -> Path:
    """A random 2-layer Llama with the real SmolLM2 tokenizer (no download; loads in a second)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from logitstore.hf import SMOLLM2_ALIAS, resolve_teacher_source

    src = resolve_teacher_source(SMOLLM2_ALIAS)
    tok = AutoTokenizer.from_pretrained(src.path_or_id, gguf_file=src.gguf_file)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def start_server(data: Path, teacher: str, http_workers: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (data.parent / "server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(data),
         "--teacher", f"bench={teacher}", "--http-workers", str(http_workers)],
        env={**os.environ, "LOGITSTORE_ADMIN_KEY": KEY}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start; see server.log")


def capture_through_server(base: str, args: argparse.Namespace) -> tuple[str, str]:
    """Returns (team key, store id) of a finished capture."""
    h = {"Authorization": f"Bearer {KEY}"}
    team = httpx.post(f"{base}/v1/teams", json={"name": "bench"}, headers=h)
    if team.status_code != 409:  # 409: made by an earlier server on the same data dir
        team.raise_for_status()
    key = httpx.post(f"{base}/v1/teams/bench/keys", headers=h).json()["key"]
    h = {"Authorization": f"Bearer {key}"}
    corpus = httpx.post(f"{base}/v1/corpora", params={"filename": CORPUS.name}, content=CORPUS.read_bytes(),
                        headers=h, timeout=120).json()["id"]
    job = httpx.post(f"{base}/v1/captures", headers=h, json={
        "corpus_id": corpus, "teacher": "bench", "mode": "topk", "k": args.k, "temperatures": [1.0, 2.0, 4.0],
        "max_len": 1024, "max_tokens": args.tokens, "unit_tokens": args.unit_tokens,
    }).json()
    while job["state"] in ("queued", "running"):
        time.sleep(0.5)
        job = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=h).json()
    if job["state"] != "succeeded":
        raise SystemExit(f"capture {job['state']}: {job['error']}")
    return key, job["store_id"]


def _reader(url: str, token: str | None, block: int, passes: int, start, out) -> None:
    from logitstore import open_store

    store = open_store(url, token=token)
    reused = store.read(0, min(block, store.num_tokens))  # as the trainer's loader reads: into one block
    start.wait()
    t0 = time.perf_counter()
    n = 0
    for _ in range(passes):
        for a in range(0, store.num_tokens, block):
            n += len(store.read(a, min(a + block, store.num_tokens), out=reused))
    out.put((n, t0, time.perf_counter()))


def measure(url: str, token: str | None, readers: int, block: int, passes: int) -> dict:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(readers), ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(url, token, block, passes, start, out)) for _ in range(readers)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    tokens = sum(r[0] for r in results)
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="tiny", help="'tiny' (random, fast), smollm2-135m, or a model dir")
    parser.add_argument("--tokens", type=int, default=131_072)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--unit-tokens", type=int, default=262_144, help="tokens per segment (capture default)")
    parser.add_argument("--block", type=int, default=DEFAULT_READ_TOKENS, help="tokens per read (default: the "
                        "trainer's read size)")
    parser.add_argument("--readers", default="1,8")
    parser.add_argument("--http-workers", default="1,2", help="server API processes; one server per value, "
                        "the same store (the capture request is deduplicated)")
    parser.add_argument("--passes", type=int, default=5, help="times each reader reads the whole store")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = str(tiny_teacher(tmp / "teacher")) if args.teacher == "tiny" else args.teacher
        for http_workers in (int(w) for w in args.http_workers.split(",")):
            proc, base = start_server(tmp / "data", teacher, http_workers)
            try:
                measure_server(base, tmp, http_workers, args)
            finally:
                proc.terminate()
                proc.wait(30)


def measure_server(base: str, tmp: Path, http_workers: int, args: argparse.Namespace) -> None:
    """Local vs HTTP reads of the server's store, for each reader count; prints JSON lines."""
    key, store_id = capture_through_server(base, args)
    local = tmp / "data" / "stores" / store_id
    store_bytes = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    remote = f"{base}/v1/stores/{store_id}/zarr"
    measure(remote, key, 1, args.block, 1)  # warm the page cache and the server
    for readers in (int(r) for r in args.readers.split(",")):
        rows = {}
        for name, url, token in (("local", str(local), None), ("http", remote, key)):
            best = max((measure(url, token, readers, args.block, args.passes) for _ in range(args.repeats)),
                       key=lambda r: r["tokens_per_s"])
            mb_s = best["tokens_per_s"] * store_bytes / args.tokens / 1e6
            rows[name] = {"bench": "serve_read", "source": name, "readers": readers, "http_workers": http_workers,
                          "block": args.block, "passes": args.passes, "k": args.k, "store_tokens": args.tokens,
                          "store_bytes": store_bytes,
                          "tokens_per_s": round(best["tokens_per_s"]), "mb_per_s": round(mb_s, 2),
                          "wall_s": round(best["wall_s"], 3), "cpus": os.cpu_count()}
            print(json.dumps(rows[name]), flush=True)
        ratio = rows["http"]["tokens_per_s"] / rows["local"]["tokens_per_s"]
        print(json.dumps({"bench": "serve_summary", "readers": readers, "http_workers": http_workers,
                          "http_over_local": round(ratio, 3), "target": 0.5, "met": ratio >= 0.5}), flush=True)

if __name__ == "__main__":
    main()
