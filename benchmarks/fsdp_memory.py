"""Per-rank training memory of DDP vs FSDP2 (`logitstore-train --fsdp`), measured against the
memory model of docs/trainer.md.

    python benchmarks/fsdp_memory.py                   # CPU: 2 gloo ranks, a scaled-down Llama student
    python benchmarks/fsdp_memory.py --hidden 1024 --layers 8

Each mode runs under a real torchrun with 2 ranks and the trainer's own pieces: `HiddenStates`
(through DDP, or the FSDP2 root of `trainer.train._fully_shard`), `kd_loss_from_hidden_states`
(the fused loss from hidden states), AdamW. The student trains on a synthetic top-k target (the
memory does not depend on the store). After one warm-up step (the optimizer state exists), freed
memory is returned to the OS (malloc_trim) and the peak resident set (VmHWM) is reset; the
footprint is the peak over the next steps minus the rank's resident set before the model
existed. One JSON line per mode, with the model's prediction next to it:

    DDP   16 P + 4 P (gradient buckets)                                  + activations
    FSDP  16 P / W + 8 P_root (root weights and their gradient, gathered)
          + 8 P_layer (one layer gathered, and its gradient)               + activations

in bytes for fp32 training, P parameters, W ranks. On GPUs with bf16 compute the gathered
weights are 2-byte (docs/trainer.md has the 1B / 8B numbers).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 2**20


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from peak_memory import proc_status_kib, reset_cpu_peak
    from torch.nn.parallel import DistributedDataParallel
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.losses.config import LossConfig
    from trainer.losses.sparse_target import SparseTarget
    from trainer.train import HiddenStates, _fully_shard, kd_loss_from_hidden_states

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = reset_cpu_peak()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         tie_word_embeddings=False, max_position_embeddings=args.seq_len)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    sizes = {"params": sum(p.numel() for p in model.parameters()),
             "root": model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel(),
             "layer": sum(p.numel() for p in model.get_decoder().layers[0].parameters())}  # fmt: skip
    if args.mode == "fsdp":
        _fully_shard(model, torch.device("cpu"))
        runner: torch.nn.Module = HiddenStates(model)
    else:
        runner = DistributedDataParallel(HiddenStates(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    n, k = args.batch_size * args.seq_len, 64
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
    target = SparseTarget(torch.randint(0, args.vocab, (n, k), generator=g),
                          torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)[:, :k])  # fmt: skip

    def step() -> None:
        hidden = runner(input_ids=ids, use_cache=False)
        loss = kd_loss_from_hidden_states(hidden, model, target, LossConfig(), args.vocab, labels=None)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what was freed (FSDP: the unsharded model) leaves the RSS
    reset_cpu_peak()
    for _ in range(args.steps):
        step()
    peak = (proc_status_kib("VmHWM") - base) * 1024
    out = {"mode": args.mode, "rank": rank, "world": world, **sizes, "measured_mib": round(peak / MIB, 1)}
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()


def predicted_bytes(mode: str, params: int, root: int, layer: int, world: int) -> int:
    """The memory model (fp32), without activations."""
    if mode == "ddp":
        return 20 * params
    return 16 * params // world + 8 * root + 8 * layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--mode", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)  # set for the ranks
    args = ap.parse_args()
    if args.mode:
        rank_main(args)
        return
    here = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{here.parents[1]}:{here.parent}"}
    for mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(here),
               "--mode", mode, *sys.argv[1:]]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        r = ranks[0]
        predicted = predicted_bytes(mode, r["params"], r["root"], r["layer"], r["world"])
        print(json.dumps({"bench": "fsdp_memory", "mode": mode, "world": r["world"], "params": r["params"],
                          "root_params": r["root"], "layer_params": r["layer"],
                          "measured_mib_per_rank": [x["measured_mib"] for x in ranks],
                          "predicted_mib_without_activations": round(predicted / MIB, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
