"""Training throughput: targets streamed from a store vs the same loop fed from memory.

In one run, on the same student, shapes and device:
- `loader`: the store's data loader alone (tokens/s), no model;
- `in_memory`: the training step fed pre-built batches already in (pinned) host memory, the
  bound: nothing left to read or decode;
- `streamed`: the same training step fed by the StoreLoader.
Target: streamed >= 97% of in-memory tokens/s on a GPU.

    python benchmarks/train.py --store STORE [--device cuda] [--steps 50] [--batch-size 8] [--seq-len 512]
    python benchmarks/train.py --teacher smollm2-135m --tokens 16384   # captures a store first

Prints one JSON line per measurement and a summary line with the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from logitstore import open_store
from logitstore.capture.teacher import resolve_device
from trainer.data import StoreDataset, make_loader
from trainer.losses.config import LossConfig
from trainer.losses.targets import StoreTarget
from trainer.train import HiddenStates, Targets, TrainConfig, _micro_step

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt"


def student_for(vocab: int, size: str, seq_len: int) -> torch.nn.Module:
    """A Llama student: 'tiny' for CPU, 'small' (~30M non-embedding params) for a GPU."""
    dims = {"tiny": (64, 2, 4), "small": (512, 8, 8)}[size]
    hidden, layers, heads = dims
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def time_steps(
    model, batches, cfg: TrainConfig, loss_config: LossConfig, targets: Targets, steps: int, warmup: int
) -> dict:
    """Tokens/s and steps/s of forward + KD loss + backward + AdamW over `steps` steps after `warmup`."""
    device = targets.device
    runner = HiddenStates(model)  # the trainer's default: the KD loss from the final hidden states
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = 0
    for i, batch in enumerate(islice(batches, warmup + steps)):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        loss, _, _ = _micro_step(model, runner, batch, cfg, loss_config, targets, [], measure=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "steps_per_s": steps / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="a store; default: capture one with --teacher")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=16384, help="tokens to capture when no --store is given")
    p.add_argument("--device", default="auto")
    p.add_argument("--student", choices=["tiny", "small"], default=None, help="default: small on CUDA, tiny on CPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or _capture(args.teacher, args.tokens, args.seq_len, tmp, device)
        store = open_store(url)
        vocab = store.meta.tokenizer.vocab_size
        cfg = TrainConfig(store=url, student="-", out=tmp, temperature=args.temperature)
        targets = Targets(vocab, StoreTarget.of(store.meta, args.temperature, url), device)
        size = args.student or ("small" if device.type == "cuda" else "tiny")
        common = {"device": str(device), "student": size, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "vocab": vocab, "k": store.meta.capture.k, "num_workers": args.num_workers}

        def loader():
            ds = StoreDataset(url, seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
            return make_loader(ds, num_workers=args.num_workers, pin_memory=device.type == "cuda")

        # The loader alone.
        it = iter(loader())
        next(it)  # workers started, first batch read
        start, tokens = time.perf_counter(), 0
        for batch in islice(it, args.steps):
            tokens += int(batch["mask"].sum())
        loader_tps = tokens / (time.perf_counter() - start)
        print(json.dumps({"bench": "train", "arm": "loader", **common, "tokens_per_s": round(loader_tps)}))

        # The bound: the same batches, already decoded and in memory.
        cached = list(islice(iter(loader()), 8))
        if device.type == "cuda":
            cached = [{k: v.pin_memory() for k, v in b.items()} for b in cached]
        model = student_for(vocab, size, args.seq_len).to(device)
        results = {}
        for arm, batches in (("in_memory", cycle(cached)), ("streamed", iter(loader())),
                             ("in_memory_again", cycle(cached))):
            results[arm] = time_steps(model, batches, cfg, cfg.loss_config(), targets, args.steps, args.warmup)
            print(json.dumps({"bench": "train", "arm": arm, **common,
                              **{k: round(v, 2) for k, v in results[arm].items()}}))
        bound = max(results["in_memory"]["tokens_per_s"], results["in_memory_again"]["tokens_per_s"])
        print(json.dumps({"bench": "train", "summary": True, **common,
                          "streamed_vs_in_memory": round(results["streamed"]["tokens_per_s"] / bound, 4),
                          "loader_vs_training": round(loader_tps / results["streamed"]["tokens_per_s"], 2)}))


def _capture(teacher_name: str, tokens: int, seq_len: int, tmp: str, device: torch.device) -> str:
    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec

    teacher = load_teacher(teacher_name, device=device)
    out = str(Path(tmp) / "store")
    capture(teacher, [CORPUS], out, CaptureSpec(mode="topk", k=64, temperatures=(1.0, 2.0), max_len=max(seq_len, 512),
                                                max_tokens=tokens))
    del teacher
    return out


if __name__ == "__main__":
    main()
