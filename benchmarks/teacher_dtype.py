"""What a bfloat16 (or float16) teacher costs in soft-label fidelity against the same teacher in float32.

Both load the same weights; over the same sequences of the example corpus, the full-vocabulary
distributions are compared token by token: mean and p99 KL(p_fp32 || p_low) at each temperature,
top-1 agreement, and the overlap of the top-k id sets (what a top-k store keeps). CPU runs bf16
matmuls natively in torch, so this runs anywhere; on CUDA it measures the GPU's kernels. Prints JSON.

    python benchmarks/teacher_dtype.py --tokens 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from logitstore.capture.corpus import read_documents, tokenize_and_pack
from logitstore.capture.teacher import load_teacher

CORPUS = Path(__file__).resolve().parents[1] / "examples" / "data" / "tinyshakespeare.txt"


@torch.inference_mode()
def log_probs(model: torch.nn.Module, sequences: list, device: torch.device) -> torch.Tensor:
    """fp32 logits [n_tokens, V] of every sequence, one forward per sequence (no padding)."""
    out = [model(torch.as_tensor(s.input_ids, dtype=torch.long, device=device)[None]).logits[0].float()
           for s in sequences]
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--temperatures", default="1,2")
    args = ap.parse_args()
    temps = [float(t) for t in args.temperatures.split(",")]

    reference = load_teacher(args.teacher, device=args.device, dtype="float32")
    device = next(reference.model.parameters()).device
    packed = tokenize_and_pack(read_documents([CORPUS]), reference.tokenizer, max_len=args.max_len,
                               max_tokens=args.tokens)
    z32 = log_probs(reference.model, packed.sequences, device)
    del reference
    low = load_teacher(args.teacher, device=args.device, dtype=args.dtype)
    zlo = log_probs(low.model, packed.sequences, device)

    result = {"bench": "teacher_dtype", "teacher": args.teacher, "device": str(device), "dtype": args.dtype,
              "tokens": int(z32.shape[0]), "vocab": int(z32.shape[1]), "k": args.k}
    for t in temps:
        p = torch.log_softmax(z32 / t, dim=-1)
        q = torch.log_softmax(zlo / t, dim=-1)
        kl = (p.exp() * (p - q)).sum(-1)
        result[f"kl_mean_T{t:g}"] = float(kl.mean())
        result[f"kl_p99_T{t:g}"] = float(kl.quantile(0.99))
    result["top1_agreement"] = float((z32.argmax(-1) == zlo.argmax(-1)).float().mean())
    top32, toplo = z32.topk(args.k, dim=-1).indices, zlo.topk(args.k, dim=-1).indices
    shared = (top32[:, :, None] == toplo[:, None, :]).any(-1).float().sum(-1) / args.k
    result[f"top{args.k}_overlap"] = float(shared.mean())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
