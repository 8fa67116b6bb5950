"""Store benchmark: bytes/token, fidelity, write and read speed — ours vs the naive layout.

Captures real tokens (SmolLM2-135M GGUF on the example corpus; CPU is fine), keeps the
teacher's fp32 logits as the exact reference, writes the soft labels twice — as a
logitstore store and as the naive layout most KD pipelines use (int32 ids + fp16
log-probs, zstd; given the same fp32 lse so it can be read at T=2) — and measures both
in the same run. Prints one JSON line.

    python benchmarks/store.py [--tokens 8192] [--k 64] [--teacher smollm2-135m]

Read speeds are taken on one core (the process pins itself to CPU 0 for them): ours into
a reused block (`Store.read(out=)`, as the trainer's loader reads) and into new arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from logitstore import open_store
from logitstore.capture.corpus import read_documents, tokenize_and_pack
from logitstore.capture.engine import _store_meta, capture_unit
from logitstore.capture.teacher import load_teacher
from logitstore.spec import CaptureSpec, CaptureTuning
from logitstore.writer import StoreWriter

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt"
READ_BLOCK = 16384  # tokens per sequential read: the trainer's loader reads runs of about this size


def exact_reference(model, seqs, temperatures):
    """Per token, float64 log-softmax of the fp32 logits at each T (as a callable over ids)."""
    out = {t: [] for t in temperatures}
    with torch.inference_mode():
        for s in seqs:
            z = model(torch.from_numpy(s.input_ids.astype(np.int64))[None]).logits[0].double()
            for t in temperatures:
                out[t].append(torch.log_softmax(z / t, dim=-1))
    return {t: torch.cat(v) for t, v in out.items()}


def kl_k_plus_1(exact_logp_t: torch.Tensor, ids: np.ndarray, logp_t: np.ndarray, tail_t: np.ndarray):
    """KL(exact || decoded) over the K+1 buckets (top-k ids + tail), per token."""
    p = torch.gather(exact_logp_t, 1, torch.from_numpy(ids.astype(np.int64))).exp().numpy()
    p_tail = np.clip(1 - p.sum(1), 0, None)
    q = np.exp(logp_t.astype(np.float64))
    q_tail = np.exp(tail_t.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0).sum(1)
        tail = np.where(p_tail > 0, p_tail * (np.log(p_tail) - np.log(np.maximum(q_tail, 1e-300))), 0)
    return terms + tail


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def per_array_bytes(root: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for seg in (p for p in (root / "segments").iterdir() if p.is_dir()):
        for arr in seg.iterdir():
            if arr.is_dir():
                sizes[arr.name] = sizes.get(arr.name, 0) + dir_bytes(arr)
    sizes["metadata"] = dir_bytes(root) - sum(sizes.values())
    return sizes


def read_speeds(read_block, read_sequence, n_tokens, n_seqs, block, seconds=2.0):
    """Sequential tokens/s over the whole store (the median pass: robust to a busy neighbour
    on a shared machine), and random sequence reads/s."""
    read_block(0, min(block, n_tokens))  # warm: open arrays, caches
    t0, rates = time.perf_counter(), []
    while time.perf_counter() - t0 < seconds or len(rates) < 3:
        t = time.perf_counter()
        for a in range(0, n_tokens, block):
            read_block(a, min(a + block, n_tokens))
        rates.append(n_tokens / (time.perf_counter() - t))
    rng = np.random.default_rng(0)
    t0, reads = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        read_sequence(int(rng.integers(n_seqs)))
        reads += 1
    return float(np.median(rates)), reads / (time.perf_counter() - t0)


class NaiveStore:
    """The peer: int32 ids + fp16 log-probs (+ fp32 lse), zstd, one Zarr array each."""

    def __init__(self, root: Path, data, seq_offsets, chunk):
        self.root, self.seq_offsets = root, seq_offsets
        zstd = [ZstdCodec(level=3)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, arr in (("input_ids", data.input_ids.astype(np.int32)), ("topk_ids", data.topk_ids),
                              ("topk_logp", data.topk_logp.astype(np.float16)), ("lse", data.lse)):
                z = zarr.create_array(str(root), name=name, shape=arr.shape, dtype=arr.dtype,
                                      chunks=(chunk, *arr.shape[1:]), compressors=zstd, fill_value=0)
                z[...] = arr
        self.arrays = {n: zarr.open_array(str(root), path=n, mode="r") for n in ("input_ids", "topk_ids",
                                                                                  "topk_logp", "lse")}

    def read(self, a, b):
        return {n: (x[a:b].astype(np.float32) if n == "topk_logp" else x[a:b]) for n, x in self.arrays.items()}

    def sequence(self, i):
        return self.read(int(self.seq_offsets[i]), int(self.seq_offsets[i + 1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--temperatures", default="1,2,4")
    ap.add_argument("--max-len", type=int, default=1024)
    args = ap.parse_args()
    temps = tuple(float(t) for t in args.temperatures.split(","))
    spec = CaptureSpec(mode="topk", k=args.k, temperatures=temps, max_len=args.max_len, max_tokens=args.tokens)
    tuning = CaptureTuning()

    teacher = load_teacher(args.teacher, device="cpu")
    packed = tokenize_and_pack(read_documents([CORPUS]), teacher.tokenizer, max_len=spec.max_len,
                               max_tokens=spec.max_tokens)
    data = capture_unit(teacher, packed.sequences, spec, tuning)
    exact = exact_reference(teacher.model, packed.sequences, [1.0, 2.0])
    n = len(data.input_ids)
    raw_mb = sum(a.nbytes for a in (data.input_ids, data.topk_ids, data.topk_logp, data.lse)) / 1e6
    seq_offsets = np.concatenate([[0], np.cumsum(data.seq_lengths)])
    tmp = Path(tempfile.mkdtemp(prefix="logitstore-bench-"))
    try:
        # --- ours
        meta = _store_meta(teacher, packed, spec, tuning, num_units=1)
        t0 = time.perf_counter()
        writer = StoreWriter.create(str(tmp / "ours"), meta)
        writer.write_segment(0, data)
        writer.finalize()
        ours_write = raw_mb / (time.perf_counter() - t0)
        store = open_store(str(tmp / "ours"))
        block = store.read(0, n)
        ours = {"bytes_per_token": dir_bytes(tmp / "ours") / n,
                "bytes_per_token_by_array": {k: v / n for k, v in per_array_bytes(tmp / "ours").items()},
                "write_mb_s": ours_write,
                "max_abs_logp_error": float(np.abs(block.topk_logp - torch.gather(
                    exact[1.0], 1, torch.from_numpy(block.topk_ids.astype(np.int64))).numpy()).max())}
        for t in (1.0, 2.0):
            logp_t, tail_t = store.teacher_logprobs(block, t)
            kl = kl_k_plus_1(exact[t], block.topk_ids, logp_t, tail_t)
            ours[f"kl_mean_T{t:g}"], ours[f"kl_max_T{t:g}"] = float(kl.mean()), float(kl.max())

        # --- the naive peer
        t0 = time.perf_counter()
        naive = NaiveStore(tmp / "naive", data, seq_offsets, tuning.chunk_tokens)
        peer_write = raw_mb / (time.perf_counter() - t0)
        nb = naive.read(0, n)
        peer = {"bytes_per_token": dir_bytes(tmp / "naive") / n,
                "bytes_per_token_by_array": {k: dir_bytes(tmp / "naive" / k) / n for k in naive.arrays},
                "write_mb_s": peer_write,
                "max_abs_logp_error": float(np.abs(nb["topk_logp"] - torch.gather(
                    exact[1.0], 1, torch.from_numpy(nb["topk_ids"].astype(np.int64))).numpy()).max())}
        one = temps.index(1.0)
        for t in (1.0, 2.0):
            lp = (nb["topk_logp"] + nb["lse"][:, one, None]) / t - nb["lse"][:, temps.index(t), None]
            tail = np.log1p(-np.minimum(np.exp(lp.astype(np.float64)).sum(1), 1.0))
            kl = kl_k_plus_1(exact[t], nb["topk_ids"], lp, tail)
            peer[f"kl_mean_T{t:g}"], peer[f"kl_max_T{t:g}"] = float(kl.mean()), float(kl.max())

        # --- read speeds on one core: blocks of READ_BLOCK tokens (what the trainer's loader reads,
        # into a reused block) and of one chunk; the peer's Zarr arrays allocate on every read.
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
        read_block, reused = min(READ_BLOCK, n), store.read(0, min(READ_BLOCK, n))
        ours["read_block_tokens"] = peer["read_block_tokens"] = read_block
        ours["seq_read_tokens_s"], ours["random_sequence_reads_s"] = read_speeds(
            lambda a, b: store.read(a, b, out=reused), store.sequence, n, store.num_sequences, read_block)
        ours["seq_read_fresh_tokens_s"], _ = read_speeds(
            store.read, store.sequence, n, store.num_sequences, read_block)
        ours["seq_read_chunk_tokens_s"], _ = read_speeds(
            lambda a, b: store.read(a, b, out=reused), store.sequence, n, store.num_sequences, tuning.chunk_tokens)
        peer["seq_read_tokens_s"], peer["random_sequence_reads_s"] = read_speeds(
            naive.read, naive.sequence, n, len(data.seq_lengths), read_block)
        peer["seq_read_chunk_tokens_s"], _ = read_speeds(
            naive.read, naive.sequence, n, len(data.seq_lengths), tuning.chunk_tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps({
        "benchmark": "store", "device": "cpu", "cpu": platform.processor() or platform.machine(),
        "teacher": teacher.info.name, "tokens": n, "k": args.k, "temperatures": list(temps),
        "logp_codec": tuning.logp_codec.to_dict(),
        "mean_topk_mass": float(np.exp(block.topk_logp.astype(np.float64)).sum(1).mean()),
        "ours": ours, "naive_int32_fp16_zstd": peer,
        "ratios": {"bytes": ours["bytes_per_token"] / peer["bytes_per_token"],
                   "seq_read": ours["seq_read_tokens_s"] / peer["seq_read_tokens_s"]},
    }))


if __name__ == "__main__":
    main()
