"""Capture throughput and memory vs the bare teacher forward, and bytes/token + KL error per mode.

    python benchmarks/capture.py --tokens 4096                      # CPU, SmolLM2-135M GGUF, fp32
    python benchmarks/capture.py --device cuda --tokens 262144      # GPU, bf16 (the teacher's default there)

One JSON line per setting. The bound ("bare") is `model(input_ids, attention_mask).logits`
over exactly the batches the capture runs (same packing, same length-sorted batches), with
no top-k, no reduction and no write, measured in the same run, alternating with the captures
(each capture's bound is the mean of the bare runs just before and after it). A capture's
time is the whole `capture()` call: tokenizing, forward, reduction, encoding, writing,
fsync, finalize. Peak memory is the rise above the level at the start of each measurement:
on CUDA `max_memory_allocated`, on CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs after returning freed memory with malloc_trim).

KL error (after all timings, from a float64 full-softmax reference forward):
- `kl_full`: KL(p ‖ p̃) over the whole vocabulary, where p̃ puts the stored probability on
  each stored id and spreads the remaining mass uniformly over the other ids: what is lost
  by keeping only these ids, comparable across modes;
- `kl_buckets`: KL over the K+1 buckets the top-k trainer loss sees (stored ids + tail):
  the quantization error alone.
A counts-only store keeps no probabilities, so it has neither (null); its trainer gets the
same gradient as from the sampled store with log-probs (trainer/losses/targets.py).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peak_memory import proc_status_kib, reset_cpu_peak

from logitstore import open_store
from logitstore.capture.corpus import read_documents, tokenize_and_pack
from logitstore.capture.engine import _batches, capture
from logitstore.capture.teacher import load_teacher
from logitstore.spec import CaptureSpec, CaptureTuning

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt"
SETTINGS = {
    "topk k=16": dict(mode="topk", k=16),
    "topk k=64": dict(mode="topk", k=64),
    "adaptive c=0.99 k<=64": dict(mode="adaptive", coverage=0.99, k=64),
    "sampled M=50 k<=64": dict(mode="sampled", draws=50, k=64, seed=0),
    # Counts without log-probs exist at T=1 only: the same draws, compared at the same temperatures.
    "sampled M=50 k<=64 T=1": dict(mode="sampled", draws=50, k=64, seed=0, temperatures=(1.0,)),
    "sampled M=50 k<=64 T=1 counts-only": dict(mode="sampled", draws=50, k=64, seed=0, temperatures=(1.0,),
                                               counts_only=True),
}


class PeakMemory:
    """Peak memory above the level at __enter__, in bytes (CUDA allocator or process RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.start = reset_cpu_peak() * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = proc_status_kib("VmHWM") * 1024 - self.start


@torch.inference_mode()
def bare_forward(model: torch.nn.Module, sequences: list[np.ndarray], batch_tokens: int) -> None:
    device = next(model.parameters()).device
    lengths = np.array([len(s) for s in sequences])
    for batch in _batches(lengths, batch_tokens):
        longest = int(lengths[batch].max())
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, j in enumerate(batch):
            ids[b, : lengths[j]] = torch.from_numpy(sequences[j].astype(np.int64))
            mask[b, : lengths[j]] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        del logits
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device) -> tuple[float, int]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
    return elapsed, mem.peak


def store_bytes(url: str) -> tuple[int, int]:
    """(all files, chunk data only: no zarr.json, manifests, commit records)."""
    total = data = 0
    for d, _, files in os.walk(url):
        for f in files:
            size = os.path.getsize(os.path.join(d, f))
            total += size
            if "segments" in d and f not in ("zarr.json", "manifest.parquet"):
                data += size
    return total, data


@torch.inference_mode()
def kl_errors(model: torch.nn.Module, urls: dict[str, str]) -> dict[str, tuple[float, float, float]]:
    """name → (mean kl_full, mean kl_buckets, mean stored ids per token) against a float64 reference."""
    stores = {name: open_store(url) for name, url in urls.items()}
    first = next(iter(stores.values()))
    device = next(model.parameters()).device
    sums = {name: np.zeros(3) for name in stores}
    for i in range(first.num_sequences):
        ids = torch.from_numpy(first.sequence(i).input_ids.astype(np.int64))[None].to(device)
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1).cpu()  # [L, V]
        v = logp.shape[1]
        for name, store in stores.items():
            block = store.sequence(i)
            stored = torch.from_numpy(block.topk_ids.astype(np.int64))
            real = stored >= 0
            if block.topk_logp is None:  # counts-only: no probabilities to compare
                sums[name] += [np.nan, np.nan, real.sum().item()]
                continue
            safe = stored.clamp(min=0)
            q_stored = torch.where(real, torch.from_numpy(block.topk_logp).double(), -torch.inf)
            n_real = real.sum(dim=1)
            tail = (1 - q_stored.exp().sum(dim=1)).clamp(min=1e-12)
            # p̃: stored probabilities on stored ids, the rest of the mass uniform over the others.
            approx = (tail.log() - torch.log((v - n_real).double()))[:, None].expand_as(logp).clone()
            approx.scatter_(1, safe, torch.where(real, q_stored, approx.gather(1, safe)))
            kl_full = (logp.exp() * (logp - approx)).sum(dim=1)
            p_s = torch.where(real, logp.gather(1, safe).exp(), 0.0)
            p_tail = (1 - p_s.sum(dim=1)).clamp(min=0)
            q_s = q_stored.exp()
            kl_b = torch.where(p_s > 0, p_s * (p_s.clamp(min=1e-300).log() - q_s.clamp(min=1e-300).log()), 0.0).sum(1)
            kl_b += torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-300).log() - tail.log()), 0.0)
            sums[name] += [kl_full.sum().item(), kl_b.sum().item(), n_real.sum().item()]
    n = first.num_tokens
    return {name: tuple((s / n).tolist()) for name, s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--corpus", default=str(CORPUS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--unit-tokens", type=int, default=1024)
    parser.add_argument("--temperatures", default="1,2,4", help="of every setting that does not fix its own")
    parser.add_argument("--only", default="", help="run only the settings whose name contains this")
    args = parser.parse_args()

    teacher = load_teacher(args.teacher, device=args.device)
    device = next(teacher.model.parameters()).device
    temps = tuple(float(t) for t in args.temperatures.split(","))
    packed = tokenize_and_pack(read_documents([args.corpus]), teacher.tokenizer, max_len=args.max_len,
                               packing="packed", max_tokens=args.tokens)
    sequences = [s.input_ids for s in packed.sequences]
    n = packed.tokens
    common = dict(device=str(device), dtype=teacher.info.dtype, teacher=teacher.info.name, tokens=n,
                  max_len=args.max_len, batch_tokens=args.batch_tokens, threads=torch.get_num_threads())

    def bare_run() -> tuple[float, int]:
        return measure(lambda: bare_forward(teacher.model, sequences, args.batch_tokens), device)

    bare_run()  # warm-up
    # Bare and capture runs alternate; each capture is compared with the mean of the bare runs
    # just before and after it, so that drifting load on a shared machine affects both alike.
    bare, results, urls = [bare_run()], {}, {}
    tuning = CaptureTuning(batch_tokens=args.batch_tokens, unit_tokens=args.unit_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in SETTINGS.items():
            if args.only not in name:
                continue
            spec = CaptureSpec(**{"temperatures": temps, "max_len": args.max_len, "max_tokens": args.tokens,
                                  **settings})
            url = str(Path(tmp) / name.replace(" ", "_"))
            results[name] = measure(lambda s=spec, u=url: capture(teacher, [args.corpus], u, s, tuning=tuning), device)
            urls[name] = url
            bare.append(bare_run())
        bare_peak = int(np.mean([b[1] for b in bare]))
        print(json.dumps({"setting": "bare forward", **common,
                          "tokens_per_s": round(n / float(np.mean([b[0] for b in bare])), 1),
                          "runs_s": [round(b[0], 2) for b in bare], "peak_mb": round(bare_peak / 2**20, 1)}))
        errors = kl_errors(teacher.model, urls)
        for i, (name, (elapsed, peak)) in enumerate(results.items()):
            bare_s = (bare[i][0] + bare[i + 1][0]) / 2
            total, data = store_bytes(urls[name])
            kl_full, kl_b, ids = errors[name]
            print(json.dumps({
                "setting": name, **common,
                "tokens_per_s": round(n / elapsed, 1), "bare_tokens_per_s": round(n / bare_s, 1),
                "vs_bare": round(bare_s / elapsed, 3),
                "peak_mb": round(peak / 2**20, 1), "peak_vs_bare": round(peak / bare_peak, 3) if bare_peak else None,
                "bytes_per_token": round(total / n, 2), "data_bytes_per_token": round(data / n, 2),
                "temperatures": list(open_store(urls[name]).temperatures),
                "ids_per_token": round(ids, 2),
                "kl_full": None if np.isnan(kl_full) else float(f"{kl_full:.4g}"),
                "kl_buckets": None if np.isnan(kl_b) else float(f"{kl_b:.4g}"),
            }))


if __name__ == "__main__":
    main()
