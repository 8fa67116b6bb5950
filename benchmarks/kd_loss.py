"""KD loss benchmark: forward+backward time and peak extra memory — ours vs its peers.

Measured in one run, per (V, K), all on the same student logits:

  ours             kd_loss (fused Triton kernel on CUDA; the torch reference on CPU)
  ours_inplace     the same, writing the gradient into the logits buffer (CUDA only)
  torch_eager      the torch reference (trainer.losses.reference), eager
  torch_compile    the torch reference under torch.compile
  liger_ce         Liger's LigerCrossEntropyLoss on hard labels: the floor a fused loss over
                   V can reach (it has no teacher at all)
  liger_kldiv      Liger's LigerKLDIVLoss given a dense teacher (closest peer); the dense
  liger_jsd        teacher costs an extra N x V tensor, which a top-k cache never builds,
                   and the student's log_softmax is done in torch before the Liger call
  dense_torch_kl   F.kl_div against a dense teacher in plain torch (the CPU stand-in for Liger)
  clone            logits.clone(): one read + one write of N x V, the memory-bandwidth bound

Prints one JSON line per (V, K) with milliseconds (median over --iters rounds after --warmup;
each round calls every peer once, so drift hits all peers alike),
peak extra memory in MiB (CUDA: torch.cuda.max_memory_allocated minus what was allocated
before the call, i.e. minus the inputs; it includes the [N, V] gradient unless in place),
and each peer's time and memory as a ratio to ours. Peers that cannot run say why.

    python benchmarks/kd_loss.py                # CUDA: bf16, N=8192, V in {49152, 128256, 262144}
    python benchmarks/kd_loss.py --cpu          # small fp32 shapes on CPU (also chosen without CUDA)

On CPU, times are only meaningful as ratios (device=cpu is in every line) and memory is not
measured. It is not a test and never gates CI.

--from-hidden measures kd_loss_from_hidden instead, per (H, V) pair and K, against the
materialized path it replaces (`hidden @ W.T` then kd_loss, autograd through the matmul):

  materialized          hidden @ W.T, kd_loss, backward (the [N, V] logits and their gradient)
  materialized_inplace  the same with inplace_grad=True (CUDA only: one [N, V] buffer fewer)
  from_hidden           kd_loss_from_hidden with its default chunk size
  from_hidden_c<rows>   the same with --chunk-sizes rows per chunk

and reports each one's time and memory as a ratio to materialized. Memory on CUDA is
torch.cuda.max_memory_allocated as above. On CPU it is the growth of the process's resident
set: each peer runs in a fresh subprocess, once to warm up, then the kernel's high-water mark
is reset (/proc/self/clear_refs = 5) and VmHWM - VmRSS(before) is taken over a second call.
The child runs with glibc's mmap and trim thresholds fixed at 128 KiB, so that freed buffers
leave the resident set instead of being reused unseen from the warm-up call's heap (Linux
only; torch's CPU allocator keeps no statistics and tracemalloc does not see it).

    python benchmarks/kd_loss.py --from-hidden        # CUDA: bf16, N=8192, K=64, (H, V) = (576, 49152), (2048, 128256)
    python benchmarks/kd_loss.py --from-hidden --cpu  # fp32, N=1024, H=256, V=32768, K=64, chunks of 128 rows too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from peak_memory import cpu_peak_extra_mib, cuda_peak_extra_mib
from timing import time_once_ms

from trainer.losses.config import LossConfig
from trainer.losses.from_hidden import default_chunk_size, kd_loss_from_hidden
from trainer.losses.kd_loss import kd_loss
from trainer.losses.reference import kd_loss_reference
from trainer.losses.sparse_target import SparseTarget


def teacher_topk(n: int, v: int, k: int, device: str, temperature: float, g: torch.Generator):
    """A random teacher's top-k at T: int32 ids, log-probs normalized over V, and the normalizer."""
    teacher = torch.randn(n, v, generator=g, device=device) * 2
    log_norm = torch.logsumexp(teacher / temperature, dim=1, keepdim=True)
    top = torch.topk(teacher, k, dim=1)
    return top.indices.to(torch.int32), top.values / temperature - log_norm, log_norm


def make_inputs(n: int, v: int, k: int, dtype: torch.dtype, device: str, temperature: float, seed: int = 0):
    """Student logits, a teacher's top-k at T (ids, log-probs normalized over V) and its dense log-probs."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, device=device) * 2).to(dtype)
    topk_ids, topk_logp, log_norm = teacher_topk(n, v, k, device, temperature, g)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    return logits, topk_ids, topk_logp, labels, log_norm


def dense_teacher_logp(topk_ids, topk_logp, n, v, dtype):
    """What a dense-teacher loss has to be fed: [N, V] log-probs (top-k, the tail spread evenly)."""
    tail = (1 - topk_logp.exp().sum(1, keepdim=True)).clamp(min=1e-12) / (v - topk_ids.shape[1])
    dense = tail.log().expand(n, v).clone()
    dense.scatter_(1, topk_ids.long(), topk_logp)
    return dense.to(dtype)


def measure(fns: dict[str, Callable[[], None]], device: str, warmup: int, iters: int) -> dict[str, dict | str]:
    """Median ms per peer, timed round-robin (one call of each peer per round) so that drift
    in clocks or in a shared CPU's load hits every peer alike; then peak memory per peer."""
    out: dict[str, dict | str] = {}
    live: dict[str, Callable[[], None]] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            live[name] = fn
        except Exception as e:  # one peer failing (OOM, missing compiler) must not hide the others
            oom = isinstance(e, torch.cuda.OutOfMemoryError)
            out[name] = "oom" if oom else f"failed: {type(e).__name__}: {e}"[:200]
        if device == "cuda":
            torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(iters):
        for name, fn in live.items():
            times[name].append(time_once_ms(fn, device))
    for name, fn in live.items():
        mib = cuda_peak_extra_mib(fn) if device == "cuda" else None
        out[name] = {
            "ms": round(statistics.median(times[name]), 4),
            "peak_extra_mib": None if mib is None else round(mib, 1),
        }
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> Callable[[], None]:
    """A closure that runs loss_fn forward and backward on a fresh leaf view of `logits`."""

    def run() -> None:
        x = logits.detach().requires_grad_()
        loss_fn(x).backward()
        del x

    return run


def peers(args, logits, topk_ids, topk_logp, labels, device) -> dict[str, Callable[[], None] | str]:
    """name -> closure, or a string saying why the peer is unavailable."""
    n, v = logits.shape
    t = args.temperature
    loss = LossConfig(temperature=t, divergence=args.divergence)
    out: dict[str, Callable[[], None] | str] = {}
    out["ours"] = fwd_bwd(lambda x: kd_loss(x, SparseTarget(topk_ids, topk_logp), loss), logits)
    if device == "cuda":
        inplace_buf = logits.clone()  # overwritten with gradients every call; fine for timing
        out["ours_inplace"] = fwd_bwd(
            lambda x: kd_loss(x, SparseTarget(topk_ids, topk_logp), loss, inplace_grad=True), inplace_buf
        )
    out["torch_eager"] = fwd_bwd(lambda x: kd_loss_reference(x, SparseTarget(topk_ids, topk_logp), loss), logits)
    try:
        compiled = torch.compile(kd_loss_reference, dynamic=False)
        out["torch_compile"] = fwd_bwd(lambda x: compiled(x, SparseTarget(topk_ids, topk_logp), loss), logits)
    except Exception as e:  # pragma: no cover - depends on the toolchain
        out["torch_compile"] = f"unavailable: {type(e).__name__}: {e}"[:200]

    dense = None
    try:
        import liger_kernel.transformers as lk

        if device != "cuda":
            raise ImportError("Liger-Kernel needs CUDA")
        dense = dense_teacher_logp(topk_ids, topk_logp, n, v, torch.float32)
        ce = lk.LigerCrossEntropyLoss()
        kl = lk.LigerKLDIVLoss(reduction="batchmean", log_target=True)
        jsd = lk.LigerJSD(beta=0.5)
        out["liger_ce"] = fwd_bwd(lambda x: ce(x, labels), logits)
        out["liger_kldiv"] = fwd_bwd(
            lambda x: kl(torch.log_softmax(x.float() / t, dim=-1), dense) * (t * t), logits
        )
        out["liger_jsd"] = fwd_bwd(lambda x: jsd(torch.log_softmax(x.float() / t, dim=-1), dense) * (t * t), logits)
    except ImportError as e:
        for name in ("liger_ce", "liger_kldiv", "liger_jsd"):
            out[name] = f"unavailable: {e}"[:200]
    if device != "cuda":
        dense = dense_teacher_logp(topk_ids, topk_logp, n, v, torch.float32)
        out["dense_torch_kl"] = fwd_bwd(
            lambda x: F.kl_div(torch.log_softmax(x.float() / t, dim=-1), dense, log_target=True, reduction="batchmean")
            * (t * t),
            logits,
        )

    def clone() -> None:
        logits.clone()

    out["clone"] = clone
    return out


def row_header(bench: str, args, device: str, dtype: torch.dtype, **shape: int) -> dict:
    """The fields that open every JSON line: what ran, where, on which shapes."""
    return {
        "bench": bench,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "dtype": str(dtype).removeprefix("torch."),
        **shape,
        "divergence": args.divergence,
        "temperature": args.temperature,
    }


def bench_one(args, n: int, v: int, k: int, device: str, dtype: torch.dtype) -> dict:
    logits, topk_ids, topk_logp, labels, _ = make_inputs(n, v, k, dtype, device, args.temperature)
    row: dict = {
        **row_header("kd_loss", args, device, dtype, N=n, V=v, K=k),
        "ours_backend": "triton" if device == "cuda" else "torch (kd_loss backend='auto' on CPU)",
        "results": {},
    }
    closures = peers(args, logits, topk_ids, topk_logp, labels, device)
    measured = measure({k: f for k, f in closures.items() if not isinstance(f, str)}, device, args.warmup, args.iters)
    row["results"] = {name: f if isinstance(f, str) else measured[name] for name, f in closures.items()}
    ours = row["results"].get("ours")
    if isinstance(ours, dict):
        for name, r in row["results"].items():
            if name != "ours" and isinstance(r, dict):
                r["time_x_ours"] = round(r["ms"] / ours["ms"], 3)
                if r["peak_extra_mib"] is not None and ours["peak_extra_mib"]:
                    r["mem_x_ours"] = round(r["peak_extra_mib"] / ours["peak_extra_mib"], 3)
    # Ours reads N x V twice and writes it once (plus the backward's in-place scale: one more
    # read + write); clone reads and writes it once.
    row["ours_min_bytes_gb"] = round(3 * n * v * logits.element_size() / 1e9, 3)
    return row


# ----------------------------------------------------------------------------------------------
# --from-hidden: kd_loss_from_hidden against materialized logits
# ----------------------------------------------------------------------------------------------


def hidden_inputs(n: int, h: int, v: int, k: int, dtype: torch.dtype, device: str, temperature: float, seed: int = 0):
    """hidden [N, H], lm_head weight [V, H] (logits ~ N(0, 4), like make_inputs) and a teacher's top-k."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) * (2 / h**0.5)).to(dtype)
    topk_ids, topk_logp, _ = teacher_topk(n, v, k, device, temperature, g)
    return hidden, weight, topk_ids, topk_logp


def from_hidden_peers(args, hidden, weight, topk_ids, topk_logp, device) -> dict[str, Callable[[], None]]:
    loss = LossConfig(temperature=args.temperature, divergence=args.divergence)

    def fwd_bwd_linear(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss_fn(x, w).backward()

        return run

    out = {"materialized": fwd_bwd_linear(lambda x, w: kd_loss(x @ w.T, SparseTarget(topk_ids, topk_logp), loss))}
    if device == "cuda":
        out["materialized_inplace"] = fwd_bwd_linear(
            lambda x, w: kd_loss(x @ w.T, SparseTarget(topk_ids, topk_logp), loss, inplace_grad=True)
        )
    out["from_hidden"] = fwd_bwd_linear(lambda x, w: kd_loss_from_hidden(x, w, SparseTarget(topk_ids, topk_logp), loss))
    for c in args.chunk_sizes or []:
        out[f"from_hidden_c{c}"] = fwd_bwd_linear(
            lambda x, w, c=c: kd_loss_from_hidden(x, w, SparseTarget(topk_ids, topk_logp), loss, chunk_size=c)
        )
    return out


def _cpu_peak_in_subprocess(args, peer: str, h: int, v: int, k: int) -> float | str:
    cmd = [sys.executable, __file__, "--from-hidden", "--cpu", "--probe", peer, "--n", str(args.n),
           "--h", str(h), "--v", str(v), "--k", str(k), "--divergence", args.divergence,
           "--temperature", str(args.temperature)]
    if args.chunk_sizes:
        cmd += ["--chunk-sizes", *map(str, args.chunk_sizes)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return f"failed: {res.stderr.strip().splitlines()[-1:]}"[:200]
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def bench_from_hidden(args, n: int, h: int, v: int, k: int, device: str, dtype: torch.dtype) -> dict:
    hidden, weight, topk_ids, topk_logp = hidden_inputs(n, h, v, k, dtype, device, args.temperature)
    row: dict = {
        **row_header("kd_loss_from_hidden", args, device, dtype, N=n, H=h, V=v, K=k),
        "backend": "triton" if device == "cuda" else "torch (backend='auto' on CPU)",
        "default_chunk_size": default_chunk_size(n, v),
        "memory": "torch.cuda.max_memory_allocated - allocated before"
        if device == "cuda"
        else "VmHWM - VmRSS over the 2nd call, fresh subprocess per peer",
    }
    closures = from_hidden_peers(args, hidden, weight, topk_ids, topk_logp, device)
    results = measure(closures, device, args.warmup, args.iters)
    if device == "cpu":
        for name, r in results.items():
            if isinstance(r, dict):
                mib = _cpu_peak_in_subprocess(args, name, h, v, k)
                r["peak_extra_mib"] = round(mib, 1) if isinstance(mib, float) else mib
    base = results.get("materialized")
    if isinstance(base, dict):
        for name, r in results.items():
            if name != "materialized" and isinstance(r, dict):
                r["time_x_materialized"] = round(r["ms"] / base["ms"], 3)
                if isinstance(r["peak_extra_mib"], float) and isinstance(base["peak_extra_mib"], float):
                    r["mem_x_materialized"] = round(r["peak_extra_mib"] / base["peak_extra_mib"], 3)
    row["results"] = results
    return row


def probe_from_hidden(args, device: str, dtype: torch.dtype) -> None:
    """Child of bench_from_hidden on CPU: one peer's peak extra memory, as a JSON line."""
    hidden, weight, topk_ids, topk_logp = hidden_inputs(args.n, args.h[0], args.v[0], args.k[0], dtype, device,
                                                        args.temperature)
    fn = from_hidden_peers(args, hidden, weight, topk_ids, topk_logp, device)[args.probe]
    print(json.dumps({"peak_extra_mib": cpu_peak_extra_mib(fn)}), flush=True)


def main_from_hidden(args, device: str) -> None:
    if device == "cuda":
        args.n, dtype = args.n or 8192, torch.bfloat16
        hs, vs, ks = args.h or [576, 2048], args.v or [49152, 128256], args.k or [64]
        args.warmup, args.iters = args.warmup or 3, args.iters or 10
    else:
        args.n, dtype = args.n or 1024, torch.float32
        hs, vs, ks = args.h or [256], args.v or [32768], args.k or [64]
        args.chunk_sizes = args.chunk_sizes if args.chunk_sizes is not None else [128]
        args.warmup, args.iters = args.warmup or 1, args.iters or 5
    if len(hs) != len(vs):
        raise SystemExit("--from-hidden pairs --h with --v (one model per pair): give as many of each")
    if args.probe:
        probe_from_hidden(args, device, dtype)
        return
    torch.manual_seed(0)
    for h, v in zip(hs, vs, strict=True):
        for k in ks:
            print(json.dumps(bench_from_hidden(args, args.n, h, v, min(k, v), device, dtype)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (small shapes); chosen automatically without CUDA")
    ap.add_argument("--n", type=int, default=None, help="tokens (default 8192 on CUDA, 256 on CPU)")
    ap.add_argument("--v", type=int, nargs="*", default=None, help="vocabulary sizes")
    ap.add_argument("--k", type=int, nargs="*", default=None, help="top-k sizes")
    ap.add_argument("--divergence", default="fkl", choices=["fkl", "rkl", "jsd", "tvd"])
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--from-hidden", action="store_true", help="benchmark kd_loss_from_hidden vs materialized logits")
    ap.add_argument("--h", type=int, nargs="*", default=None, help="--from-hidden: hidden sizes, paired with --v")
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=None, help="--from-hidden: extra chunk sizes")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one CPU memory measurement
    args = ap.parse_args()

    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    if args.from_hidden:
        main_from_hidden(args, device)
        return
    if device == "cuda":
        n, vs, ks, dtype = args.n or 8192, args.v or [49152, 128256, 262144], args.k or [16, 64, 128], torch.bfloat16
        args.warmup, args.iters = args.warmup or 5, args.iters or 20
    else:
        n, vs, ks, dtype = args.n or 256, args.v or [4099, 16384], args.k or [16, 64], torch.float32
        args.warmup, args.iters = args.warmup or 2, args.iters or 9
        torch.manual_seed(0)
    for v in vs:
        for k in ks:
            row = bench_one(args, n, v, min(k, v), device, dtype)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
