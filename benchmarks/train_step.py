"""One training step of a student's loss path: peak extra memory and time, ours vs its peers.

Measured in one run, per cell (store mode x alpha), on the same Hugging Face Llama student, the
same tokens and the same synthesized teacher target, forward + backward of one micro-batch the
way trainer/train.py `_micro_step` runs it:

  body_only          the student's body to its final hidden states (HiddenStates) and the
                     backward of hidden.float().square().mean(): the student without logits,
                     the baseline every other peer is measured against
  from_hidden        body, then kd_loss_from_hidden(hidden, lm_head weight, sparse target):
                     the trainer's default path, logits chunked over rows (default chunk size)
  from_hidden_c<r>   the same with r rows per chunk (--chunk-sizes, for tuning)
  materialized       model(input_ids).logits then kd_loss: the [N, V] logits and their
                     gradient (what users write by hand; the trainer's --materialize-logits)
  liger_flce         Liger's LigerFusedLinearCrossEntropyLoss on the next tokens (CUDA only):
                     a fused linear loss with no teacher at all, the floor
  liger_fl_jsd       Liger's chunked LigerFusedLinearJSDLoss (CUDA only), hard-loss weight
                     alpha: the closest fused peer, but an *online* teacher (a random frozen
                     teacher hidden [N, H] and head [V, H] are passed; it builds the teacher's
                     logits chunk by chunk) and JSD, not our sparse fkl target

Store modes (targets synthesized from a random teacher, log_softmax(randn * 3) per token,
through trainer.losses.targets like the trainer's `_target`):

  topk          top-64 ids with exact log-probs + the tail bucket (topk_target; K = 64)
  head_draws    top-64 exact + 16 draws from the tail (sampled_target, head=64; K = 80 slots)
  counts_only   the distinct ids of 64 draws with their counts, no log-probs (K = 64 slots)

and alpha in {0, 0.5} (alpha > 0: labels = the next tokens; alpha = 0: no labels, as the
trainer passes them on a non-logging step). fkl, temperature 1 (the trainer's defaults).

CPU (the default without CUDA): memory is the growth of the process's resident set. Each
(cell, peer) runs in a fresh subprocess (`--child`), which builds the model and the inputs,
runs the step once to warm up, resets the kernel's high-water mark (/proc/self/clear_refs = 5)
and takes VmHWM - VmRSS(before) over a second step, with glibc's mmap and trim thresholds
pinned at 128 KiB (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) so that freed buffers leave
the resident set rather than being reused unseen (the method of docs/kd_loss.md; torch keeps
no CPU allocator statistics). Time is measured in one more fresh subprocess per cell with
glibc's default settings (pinned thresholds would make every chunk a fresh mmap and page-fault
cost the chunked path that a normal process does not pay): every peer is warmed up once, then
--iters rounds each call every peer once (round-robin, so that the shared machine's load hits
all peers alike), and a peer's time is its median, with time.perf_counter (also: cpu_ms, the
median of the process's CPU time over all its threads, time.process_time). --threads sets the
children's torch threads; --skip-memory times only. On a shared machine use --threads 1: on the
2-core dev box under a load of 4-6, torch's two threads spent most of a step waiting for each
other (every op is an OpenMP barrier, and the chunked path runs ~50 ops per chunk), which made
materialized up to 1.8x and from_hidden 3-6x slower than one thread, with +-50% spread between runs.

CUDA (--gpu, or the default with CUDA): everything in one process (the model is built once):
memory is torch.cuda.max_memory_allocated over one step (after reset_peak_memory_stats) minus
what was allocated before it; times are CUDA events, median of --iters round-robin rounds after
--warmup calls. Weights fp32, body and head under bf16 autocast, the loss in bf16 as in the
trainer (from_hidden casts hidden and the head weight to bf16; materialized uses
inplace_grad=True). Both devices include the parameters' gradients, freed after each step
(zero_grad(set_to_none=True), as after the optimizer), in every peer's peak.

Per cell, one JSON line with each peer's ms and peak_extra_mib, and derived from them:
extra_over_body_mib (peer - body_only), fraction_of_one_fp32_NV (that over N*V*4 bytes) and
time_x_materialized (medians; also time_x_materialized_min, the ratio of the fastest rounds, and
on CPU cpu_time_x_materialized, of the CPU times: both less sensitive to a shared machine's
load). Target: from_hidden's extra over the body <= 10% of one fp32 [N, V] in
every mode and alpha, at <= 1.1x the time of materialized. A summary line follows.

On CUDA a kernel-only line follows: kd_loss at N = 8192, V = 128256, bf16, backend="triton",
inplace_grad=True, top-64 target, forward + torch.autograd.grad (the backward scales the
in-place gradient; autograd.grad returns it without accumulating into .grad), and the forward
alone (the fused pass: loss and gradient), each on a fresh copy of the logits restored outside
the timed region; against the bound "read the logits twice, write them once" measured in the
same run as ms(`out.copy_(logits)`) (one read + one write) + ms(`logits.sum(dtype=float32)`)
(one read); the ratio fwd+bwd / bound has a target of <= 1.3x.

    python benchmarks/train_step.py --threads 1 --iters 7   # CPU: N = 4096 (8 x 512), V = 49152, H = 64, fp32
    python benchmarks/train_step.py --threads 1 --only 'topk/*' --chunk-sizes 32 48 64 --iters 7
    python benchmarks/train_step.py --gpu                   # N = 16384 (4 x 4096), V = 128256, H = 2048, bf16

Not a test; never gates CI. Liger-Kernel peers that cannot run say why ("unavailable: ...").
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from peak_memory import MIB, cpu_peak_extra_mib, cuda_peak_extra_mib
from timing import time_once_ms

from trainer.losses.config import LossConfig
from trainer.losses.from_hidden import default_chunk_size, kd_loss_from_hidden
from trainer.losses.kd_loss import kd_loss
from trainer.losses.sparse_target import SparseTarget
from trainer.losses.targets import sampled_target, topk_target

MODES = ("topk", "head_draws", "counts_only")
ALPHAS = (0.0, 0.5)
TOP_K = 64  # top-k ids (topk), the exact head (head_draws)
TAIL_DRAWS = 16  # head_draws: draws from the tail behind the head
COUNT_DRAWS = 64  # counts_only: draws M (and slots K)
TARGET_FRACTION = 0.10  # from_hidden's extra peak over the body, of one fp32 [N, V]
TARGET_TIME_X = 1.1  # from_hidden's time over materialized
TARGET_KERNEL_X = 1.3  # kernel-only: kd_loss fwd+bwd over the read-twice-write-once bound


@dataclass(frozen=True)
class Preset:
    batch: int
    seq: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def n(self) -> int:
        return self.batch * self.seq


CPU_PRESET = Preset(batch=8, seq=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, vocab=49152)
# Llama-3.2-1B's widths (H = 2048, 32 heads, 8 KV heads, V = 128256), two layers.
GPU_PRESET = Preset(batch=4, seq=4096, hidden=2048, intermediate=8192, layers=2, heads=32, kv_heads=8, vocab=128256)


# ----------------------------------------------------------------------------------------------
# Inputs: the student, the tokens, the teacher's sparse target
# ----------------------------------------------------------------------------------------------


def build_model(p: Preset, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=p.hidden, intermediate_size=p.intermediate, num_hidden_layers=p.layers,
        num_attention_heads=p.heads, num_key_value_heads=p.kv_heads, vocab_size=p.vocab,
        max_position_embeddings=max(1024, p.seq), tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(device).train()


def build_tokens(p: Preset, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids [B, S] and their next tokens [B * S] (random ids in [0, V))."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, p.vocab, (p.batch, p.seq + 1), generator=g)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].reshape(-1).to(device)


def distinct_with_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the distinct ids of `draws` [R, M] and their counts, in M slots (-1 / 0 padding)."""
    s, _ = draws.sort(dim=1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = new.long().cumsum(1) - 1  # every draw's slot: its id's rank among the row's distinct ids
    ids = torch.full_like(s, -1).scatter_(1, slot, s)  # the draws of one slot all write its id
    counts = torch.zeros_like(s).scatter_add_(1, slot, torch.ones_like(s))
    return ids, counts


def build_target(mode: str, n: int, v: int, temperature: float, device: torch.device, seed: int) -> SparseTarget:
    """What a store of `mode` gives the trainer for N tokens of a random teacher (see the docstring).

    Built like the store (T=1 log-probs of z = log_softmax(teacher logits), so lse(1) = 0, and
    lse(T) over the full vocabulary) and turned into the loss's target the way `_target` does.
    """
    g = torch.Generator(device=device).manual_seed(seed + 1)
    rows = max(1, 2**26 // v)  # teacher logits in row blocks of <= 256 MiB fp32
    cols: dict[str, list[torch.Tensor]] = {}
    for start in range(0, n, rows):
        r = min(rows, n - start)
        logp = torch.log_softmax(torch.randn(r, v, generator=g, device=device) * 3, dim=-1)
        got = {"lse_t": torch.logsumexp(logp / temperature, dim=-1)}
        if mode in ("topk", "head_draws"):
            top = logp.topk(TOP_K, dim=-1)
            got["ids"], got["logp"] = top.indices, top.values
        if mode == "head_draws":
            p_tail = logp.exp().scatter_(1, top.indices, 0.0)
            ids, counts = distinct_with_counts(torch.multinomial(p_tail, TAIL_DRAWS, replacement=True, generator=g))
            tail_logp = torch.where(ids >= 0, logp.gather(1, ids.clamp(min=0)), float("-inf"))
            got["ids"] = torch.cat([got["ids"], ids], dim=1)
            got["counts"] = torch.cat([torch.zeros_like(top.indices), counts], dim=1)
            got["logp"] = torch.cat([got["logp"], tail_logp], dim=1)
        elif mode == "counts_only":
            got["ids"], got["counts"] = distinct_with_counts(
                torch.multinomial(logp.exp(), COUNT_DRAWS, replacement=True, generator=g)
            )
        for key, t in got.items():
            cols.setdefault(key, []).append(t)
        del logp
    t = {key: torch.cat(parts) for key, parts in cols.items()}
    ids, lse_t = t["ids"].to(torch.int32), t["lse_t"]
    lse_1 = torch.zeros_like(lse_t)
    if mode == "topk":
        return topk_target(ids, t["logp"], lse_1, lse_t, temperature)
    if mode == "head_draws":
        return sampled_target(ids, t["counts"], TAIL_DRAWS, temperature=temperature, teacher_logp=t["logp"],
                              lse_1=lse_1, lse_t=lse_t, head=TOP_K)  # fmt: skip
    return sampled_target(ids, t["counts"], COUNT_DRAWS, temperature=temperature)  # counts-only: T must be 1


# ----------------------------------------------------------------------------------------------
# The peers: one closure per peer, one training step each (forward, backward, grads freed)
# ----------------------------------------------------------------------------------------------


def liger_unavailable(device: torch.device) -> str | None:
    """Why Liger's fused linear losses cannot run here, or None."""
    try:
        for module in ("liger_kernel.transformers", "liger_kernel.chunked_loss"):
            importlib.import_module(module)
    except Exception as e:  # ImportError, or triton failing to initialize
        return f"unavailable: {type(e).__name__}: {e}"[:200]
    if device.type != "cuda":
        return "unavailable: Liger-Kernel's Triton kernels need CUDA"
    return None


def peer_names(args, device: torch.device) -> list[str]:
    names = ["body_only", "from_hidden", *(f"from_hidden_c{c}" for c in args.chunk_sizes), "materialized"]
    if device.type == "cuda":
        names += ["liger_flce", "liger_fl_jsd"]
    return [name for name in names if not args.peers or name in args.peers or name == "body_only"]


def chunk_of(name: str) -> int | None:
    """Rows per chunk of a from_hidden peer: from_hidden_c<rows>, or None (the default) for from_hidden."""
    return int(name.removeprefix("from_hidden_c")) if name.startswith("from_hidden_c") else None


def make_steps(
    names: list[str], model: torch.nn.Module, ids: torch.Tensor, next_tokens: torch.Tensor, target: SparseTarget,
    alpha: float, temperature: float, liger_why: str | None,
) -> dict[str, Callable[[], None] | str]:  # fmt: skip
    """name -> a closure running one step, or a string saying why the peer cannot run."""
    device = ids.device
    cuda = device.type == "cuda"
    v = model.config.vocab_size
    labels = next_tokens if alpha > 0 else None
    loss_config = LossConfig(temperature=temperature, divergence="fkl", alpha=alpha)
    kw = dict(labels=labels, return_parts=True)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def body() -> torch.Tensor:
        with autocast():
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])

    def head_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        hidden, weight = body(), model.get_output_embeddings().weight[:v]
        if cuda:  # what autocast would have run the head in (trainer/train.py _micro_step)
            hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
        return hidden, weight

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        model.zero_grad(set_to_none=True)

    def body_only() -> None:
        finish(body().float().square().mean())

    def materialized() -> None:
        with autocast():
            logits = model(input_ids=ids).logits
        z = logits.reshape(-1, logits.shape[-1])[:, :v]
        del logits
        # inplace_grad on CUDA: the kernel writes dL/dz over the logits (the trainer does too).
        finish(kd_loss(z, target, loss_config, inplace_grad=cuda, **kw)[0])

    def from_hidden(chunk: int | None) -> Callable[[], None]:
        def step() -> None:
            hidden, weight = head_inputs()
            finish(kd_loss_from_hidden(hidden, weight, target, loss_config, chunk_size=chunk, **kw)[0])

        return step

    out: dict[str, Callable[[], None] | str] = {}
    for name in names:
        if name == "body_only":
            out[name] = body_only
        elif name == "materialized":
            out[name] = materialized
        elif name.startswith("from_hidden"):
            out[name] = from_hidden(chunk_of(name))
        elif name.startswith("liger_"):
            out[name] = liger_why or liger_step(name, model, body, head_inputs, finish, next_tokens, alpha, temperature)
    return out


def liger_step(name, model, body, head_inputs, finish, next_tokens, alpha, temperature) -> Callable[[], None] | str:
    """Liger's fused linear losses from the student's hidden states (CUDA only; guarded)."""
    try:
        if name == "liger_flce":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss()

            def step() -> None:
                hidden, weight = head_inputs()
                finish(flce(weight, hidden, next_tokens))

            return step

        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=alpha, weight_soft_loss=1 - alpha, temperature=temperature)
        v, h = model.get_output_embeddings().weight.shape
        g = torch.Generator(device=next_tokens.device).manual_seed(7)
        # An online teacher of the student's shape, frozen: its hidden states and head (inputs,
        # allocated before the step; the teacher's body is not run).
        t_hidden = torch.randn(next_tokens.shape[0], h, generator=g, device=next_tokens.device).to(torch.bfloat16)
        t_weight = (torch.randn(v, h, generator=g, device=next_tokens.device) * h**-0.5).to(torch.bfloat16)
        with_bias = "student_bias" in inspect.signature(jsd.forward).parameters  # absent in older releases
        bias = {"student_bias": None, "teacher_bias": None} if with_bias else {}

        def step() -> None:
            hidden, weight = head_inputs()
            finish(jsd(hidden, weight, t_hidden, t_weight, next_tokens, **bias))

        return step
    except Exception as e:  # a Liger release with another API must not stop the benchmark
        return f"unavailable: {type(e).__name__}: {e}"[:200]


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(steps: dict[str, Callable[[], None]], device, warmup: int, iters: int) -> dict[str, dict | str]:
    """Median ms per peer over `iters` rounds, each round calling every peer once."""
    out: dict[str, dict | str] = {}
    live: dict[str, Callable[[], None]] = {}
    for name, fn in steps.items():
        try:
            for _ in range(warmup):
                fn()
            _sync(device)
            live[name] = fn
        except Exception as e:  # one peer failing (OOM, a missing compiler) must not hide the others
            oom = isinstance(e, torch.cuda.OutOfMemoryError)
            out[name] = "oom" if oom else f"failed: {type(e).__name__}: {e}"[:200]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in live}
    cpu_times: dict[str, list[float]] = {name: [] for name in live}  # CPU: the process's CPU time too
    for _ in range(iters):
        for name, fn in live.items():
            c0 = time.process_time()
            times[name].append(time_once_ms(fn, device))
            cpu_times[name].append((time.process_time() - c0) * 1e3)
    for name, ts in times.items():
        out[name] = {"ms": round(statistics.median(ts), 2), "ms_min": round(min(ts), 2), "ms_max": round(max(ts), 2)}
        if device.type == "cpu":
            out[name]["cpu_ms"] = round(statistics.median(cpu_times[name]), 2)
    return out


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


def cell_id(mode: str, alpha: float) -> str:
    return f"{mode}/alpha={alpha:g}"


def cells(args) -> list[tuple[str, float]]:
    out = [(m, a) for m in MODES for a in ALPHAS]
    if args.only:
        out = [(m, a) for m, a in out if any(fnmatch.fnmatch(cell_id(m, a), pat) or pat == m for pat in args.only)]
    return out


def row_header(args, p: Preset, device: torch.device, mode: str, alpha: float, k: int) -> dict:
    cuda = device.type == "cuda"
    return {
        "bench": "train_step",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or 'unknown'})",
        "torch_threads": getattr(args, "threads", None) or torch.get_num_threads(),
        "dtype": "bf16 autocast, fp32 weights, loss in bf16" if cuda else "float32",
        "cell": cell_id(mode, alpha),
        "mode": mode,
        "alpha": alpha,
        "N": p.n,
        "V": p.vocab,
        "K": k,
        **{key: val for key, val in asdict(p).items() if key != "vocab"},
        "divergence": "fkl",
        "temperature": args.temperature,
        "loss_backend": "triton" if cuda else "torch (backend='auto' on CPU)",
        "default_chunk_size": default_chunk_size(p.n, p.vocab, "triton" if cuda else "torch"),
        "memory": "torch.cuda.max_memory_allocated - allocated before, over one step after warm-up"
        if cuda
        else "VmHWM - VmRSS over the 2nd step, fresh subprocess per peer, malloc thresholds 128 KiB",
        "time": f"median of {args.iters} round-robin rounds after {args.warmup} warm-up call(s), "
        + ("CUDA events" if cuda else "perf_counter, one fresh subprocess per cell, default malloc"),
    }


def derive(row: dict) -> dict:
    """extra_over_body_mib, fraction_of_one_fp32_NV, time_x_materialized; whether from_hidden meets the target."""
    res = row["results"]
    one_nv_mib = row["N"] * row["V"] * 4 / MIB
    row["one_fp32_NV_mib"] = round(one_nv_mib, 1)
    body, mat = res.get("body_only"), res.get("materialized")
    for r in res.values():
        if not isinstance(r, dict):
            continue
        if isinstance(body, dict) and isinstance(r.get("peak_extra_mib"), float | int) and isinstance(
            body.get("peak_extra_mib"), float | int
        ):
            extra = r["peak_extra_mib"] - body["peak_extra_mib"]
            r["extra_over_body_mib"] = round(extra, 1)
            r["fraction_of_one_fp32_NV"] = round(extra / one_nv_mib, 4)
        if isinstance(mat, dict) and "ms" in r and "ms" in mat:
            r["time_x_materialized"] = round(r["ms"] / mat["ms"], 3)
            # Less sensitive to a shared machine's load than the medians: the fastest rounds, and
            # the process's CPU time (all its threads; CPU only).
            r["time_x_materialized_min"] = round(r["ms_min"] / mat["ms_min"], 3)
            if "cpu_ms" in r and "cpu_ms" in mat:
                r["cpu_time_x_materialized"] = round(r["cpu_ms"] / mat["cpu_ms"], 3)
    for name, r in res.items():
        if name.startswith("from_hidden") and isinstance(r, dict) and "fraction_of_one_fp32_NV" in r:
            r["meets_target"] = bool(
                r["fraction_of_one_fp32_NV"] <= TARGET_FRACTION and r.get("time_x_materialized", 1e9) <= TARGET_TIME_X
            )
    row["target"] = (f"from_hidden extra over body <= {TARGET_FRACTION:.0%} of one fp32 [N, V], "
                     f"time <= {TARGET_TIME_X}x materialized")  # fmt: skip
    return row


def summary(rows: list[dict]) -> dict:
    """Per from_hidden variant: the worst cell, and whether every cell meets the target."""
    variants: dict[str, dict] = {}
    for row in rows:
        for name, r in row["results"].items():
            if not (name.startswith("from_hidden") and isinstance(r, dict)):
                continue
            v = variants.setdefault(name, {"cells": 0, "meets_target_in": 0, "max_fraction": 0.0, "max_time_x": 0.0})
            v["cells"] += 1
            v["meets_target_in"] += int(r.get("meets_target", False))
            v["max_fraction"] = max(v["max_fraction"], r.get("fraction_of_one_fp32_NV", float("nan")))
            v["max_time_x"] = max(v["max_time_x"], r.get("time_x_materialized", float("nan")))
    for v in variants.values():
        v["all_cells_meet_target"] = v["cells"] > 0 and v["meets_target_in"] == v["cells"]
    return {"bench": "train_step_summary", "cells": [row["cell"] for row in rows],
            "default_chunk_size": rows[0]["default_chunk_size"] if rows else None, "from_hidden": variants,
            "target": rows[0]["target"] if rows else None}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# CPU: fresh subprocesses
# ----------------------------------------------------------------------------------------------


def child(spec: dict) -> None:
    """A fresh process: one peer's peak extra memory (task "memory"), or every peer's time ("time")."""
    device = torch.device("cpu")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    p = CPU_PRESET
    model = build_model(p, device)
    ids, next_tokens = build_tokens(p, device, spec["seed"])
    target = build_target(spec["mode"], p.n, p.vocab, spec["temperature"], device, spec["seed"])
    steps = make_steps(spec["peers"], model, ids, next_tokens, target, spec["alpha"], spec["temperature"], None)
    if spec["task"] == "memory":
        (name,) = spec["peers"]
        print(json.dumps({"peak_extra_mib": round(cpu_peak_extra_mib(steps[name]), 1)}), flush=True)
    else:
        print(json.dumps(time_round_robin(steps, device, spec["warmup"], spec["iters"])), flush=True)


def _run_child(spec: dict, pin_malloc: bool) -> dict | str:
    env = dict(os.environ)
    if pin_malloc:
        env |= {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env=env)  # fmt: skip
    if res.returncode != 0:
        return f"failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}"[:300]
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_cpu(args) -> list[dict]:
    device = torch.device("cpu")
    names = peer_names(args, device)
    liger_why = liger_unavailable(device)
    rows = []
    for mode, alpha in cells(args):
        spec = dict(mode=mode, alpha=alpha, temperature=args.temperature, seed=args.seed, warmup=args.warmup,
                    iters=args.iters, threads=args.threads)  # fmt: skip
        k = {"topk": TOP_K, "head_draws": TOP_K + TAIL_DRAWS, "counts_only": COUNT_DRAWS}[mode]
        row = row_header(args, CPU_PRESET, device, mode, alpha, k)
        results: dict[str, dict | str] = {}
        for name in names:
            mem = None if args.skip_memory else _run_child({**spec, "task": "memory", "peers": [name]}, pin_malloc=True)
            results[name] = {"peak_extra_mib": mem["peak_extra_mib"]} if isinstance(mem, dict) else mem or {}
        times = _run_child({**spec, "task": "time", "peers": names}, pin_malloc=False)
        for name in names:
            t = times.get(name) if isinstance(times, dict) else times
            if isinstance(results[name], dict) and isinstance(t, dict):
                results[name] = {**t, **results[name]}
            elif isinstance(results[name], dict):
                results[name]["ms"] = t
        for name in ("liger_flce", "liger_fl_jsd"):
            results[name] = liger_why or "unavailable"
        row["results"] = results
        for name, r in results.items():
            if name.startswith("from_hidden") and isinstance(r, dict):
                r["chunk_size"] = chunk_of(name) or row["default_chunk_size"]
        rows.append(derive(row))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# CUDA: one process
# ----------------------------------------------------------------------------------------------


def bench_gpu(args, p: Preset = GPU_PRESET, device: torch.device | None = None) -> list[dict]:
    device = device or torch.device("cuda")
    names = peer_names(args, device)
    liger_why = liger_unavailable(device)
    model = build_model(p, device)
    ids, next_tokens = build_tokens(p, device, args.seed)
    rows = []
    targets: dict[str, SparseTarget] = {}
    for mode, alpha in cells(args):
        if mode not in targets:
            targets.clear()
            targets[mode] = build_target(mode, p.n, p.vocab, args.temperature, device, args.seed)
        target = targets[mode]
        row = row_header(args, p, device, mode, alpha, target.ids.shape[1])
        steps = make_steps(names, model, ids, next_tokens, target, alpha, args.temperature, liger_why)
        results = time_round_robin({k: f for k, f in steps.items() if callable(f)}, device, args.warmup, args.iters)
        for name, fn in steps.items():
            if not callable(fn):
                results[name] = fn
            elif isinstance(results.get(name), dict):
                try:
                    results[name]["peak_extra_mib"] = round(cuda_peak_extra_mib(fn), 1)
                except torch.cuda.OutOfMemoryError:
                    results[name]["peak_extra_mib"] = "oom"
                if name.startswith("from_hidden"):
                    results[name]["chunk_size"] = chunk_of(name) or row["default_chunk_size"]
        del steps
        gc.collect()
        torch.cuda.empty_cache()
        row["results"] = results
        rows.append(derive(row))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def kernel_line(args, n: int = 8192, v: int = GPU_PRESET.vocab, device: torch.device | None = None) -> dict:
    """kd_loss fwd+bwd (Triton, in place) at [n, v] bf16 against read-twice-write-once, same run."""
    device = device or torch.device("cuda")
    target = build_target("topk", n, v, args.temperature, device, args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed + 2)
    logits = (torch.randn(n, v, generator=g, device=device) * 2).to(torch.bfloat16)
    buf, out = torch.empty_like(logits), torch.empty_like(logits)
    loss_config = LossConfig(temperature=args.temperature, backend="triton")

    def kernel(backward: bool) -> Callable[[], float]:
        def timed() -> float:
            buf.copy_(logits)  # the kernel overwrites its input with the gradient: restore it, untimed
            x = buf.detach().requires_grad_()
            _sync(device)

            def step() -> None:
                loss = kd_loss(x, target, loss_config, inplace_grad=True)
                if backward:  # autograd.grad: the gradient is returned, not accumulated into x.grad
                    torch.autograd.grad(loss, x)

            return time_once_ms(step, device)

        return timed

    fns = {
        "fwd_bwd": kernel(True),
        "fwd": kernel(False),  # the fused pass alone (loss and gradient), without backward's scale
        "copy": lambda: time_once_ms(lambda: out.copy_(logits), device),  # 1 read + 1 write of N x V
        "sum": lambda: time_once_ms(lambda: logits.sum(dtype=torch.float32), device),  # 1 read
    }
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(args.iters, 10)):
        for name, fn in fns.items():
            times[name].append(fn())
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    bound = ms["copy"] + ms["sum"]
    return {
        "bench": "train_step_kernel",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": "bfloat16", "N": n, "V": v, "K": TOP_K, "divergence": "fkl", "temperature": args.temperature,
        "alpha": 0.0,
        "kernel": "kd_loss(backend='triton', inplace_grad=True) forward + torch.autograd.grad (the backward "
                  "scales the in-place gradient by grad_output: one more read + write)",
        "bound": "read the logits twice + write once = ms(out.copy_(logits)) + ms(logits.sum(dtype=float32))",
        "time": f"median of {max(args.iters, 10)} round-robin rounds, CUDA events",
        "kernel_fwd_bwd_ms": round(ms["fwd_bwd"], 3), "kernel_fwd_ms": round(ms["fwd"], 3),
        "copy_ms": round(ms["copy"], 3), "sum_ms": round(ms["sum"], 3), "bound_ms": round(bound, 3),
        "bound_GBps": round(3 * n * v * 2 / (bound * 1e-3) / 1e9, 1),
        "ratio": round(ms["fwd_bwd"] / bound, 3), "ratio_fwd_only": round(ms["fwd"] / bound, 3),
        "target_ratio": TARGET_KERNEL_X, "meets_target": ms["fwd_bwd"] / bound <= TARGET_KERNEL_X,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the CUDA preset (chosen automatically when CUDA is there)")
    ap.add_argument("--cpu", action="store_true", help="the CPU preset even with CUDA")
    ap.add_argument("--only", nargs="*", default=None,
                    help="cells to run: modes or fnmatch patterns on 'mode/alpha=A', e.g. topk 'counts_only/alpha=0.5'")
    ap.add_argument("--peers", nargs="*", default=None, help="peers to run (body_only always runs)")
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=[],
                    help="extra from_hidden peers with these rows per chunk (from_hidden_c<rows>)")
    ap.add_argument("--temperature", type=float, default=1.0, help="training temperature (counts_only needs 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per peer before timing (CPU 1, CUDA 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed round-robin rounds (CPU 5, CUDA 5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads in the children (default: torch's)")
    ap.add_argument("--skip-memory", action="store_true", help="CPU: time only (no memory subprocesses)")
    ap.add_argument("--no-kernel", action="store_true", help="CUDA: skip the kernel-only line")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if any(c < 1 for c in args.chunk_sizes):
        raise SystemExit("--chunk-sizes: rows per chunk must be >= 1")
    cuda = args.gpu or (torch.cuda.is_available() and not args.cpu)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.iters = args.iters if args.iters is not None else 5
    if not cells(args):
        raise SystemExit(f"--only {args.only} matches no cell of {[cell_id(m, a) for m in MODES for a in ALPHAS]}")
    rows = bench_gpu(args) if cuda else bench_cpu(args)
    print(json.dumps(summary(rows)), flush=True)
    if cuda and not args.no_kernel:
        print(json.dumps(kernel_line(args)), flush=True)


if __name__ == "__main__":
    main()
