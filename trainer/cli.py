"""`logitstore-train`: train a student from a store; `logitstore-train plot DIR` draws its curves.

Every `TrainConfig` field is a flag (`--seq-len`, `--eval-store`, ...). `--config FILE`
(TOML or JSON, keys are the field names) gives defaults that flags override, so a run can
be described by one file and varied from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from logitstore.errors import LogitStoreError

HELP = {
    "store": "the store to train from: a path, s3://..., or http(s)://HOST/v1/stores/ID/zarr",
    "student": "a config.json (fresh weights) or a model directory / .gguf / hub id (pretrained)",
    "out": "run directory: metrics.jsonl, checkpoints/, final/",
    "tokenizer": "the student's tokenizer (default: its own, else the store's teacher's)",
    "token": "API key for a store served by logitstore-server",
    "storage_options": "fsspec options as JSON, e.g. '{\"endpoint_url\": \"http://...\"}' for S3",
    "loss": "kd (soft labels from the store), ce (hard labels only: the baseline) or online (the teacher "
    "in the loop, full vocabulary: the comparison; the store gives only the tokens)",
    "topk_renormalize": "kd without the tail: teacher and student renormalized over the stored ids "
    "(DistillKit's and Axolotl's sparse KD; for comparisons)",
    "teacher": "--loss online: the teacher (default: the store's), sharing the store's tokenizer",
    "temperature": "training temperature; one of the store's captured temperatures",
    "divergence": "fkl, rkl, jsd or tvd",
    "alpha": "weight of the hard-label CE mixed into the KD loss",
    "materialize_logits": "kd: compute the whole batch's logits and the loss on them (the old path, for "
    "comparison); by default the loss runs from the final hidden states in row chunks",
    "loss_backend": "kd: auto (the fused Triton kernel on CUDA, the torch reference on CPU), triton (on CPU "
    "only under TRITON_INTERPRET=1, for tests) or torch",
    "steps": "optimizer steps",
    "batch_size": "blocks per micro-batch per rank",
    "seq_len": "tokens per block",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine)",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices",
    "clip": "gradient-norm clipping (0: off)",
    "seed": "seed of the student's initial weights and of the data order",
    "log_every": "steps between metrics records",
    "eval_every": "steps between evaluations (0: at the end only)",
    "eval_text": "held-out text file: perplexity",
    "eval_store": "held-out store: KL to the teacher, top-1 agreement, perplexity",
    "eval_tokens": "tokens evaluated per eval source",
    "save_every": "steps between checkpoints (0: at the end only)",
    "num_workers": "DataLoader worker processes per rank",
    "device": "auto, cpu, cuda or cuda:N",
    "resume": "continue from the newest checkpoint in --out",
}
REQUIRED = ("store", "student", "out")


def _train_parser() -> argparse.ArgumentParser:
    from trainer.train import TrainConfig

    p = argparse.ArgumentParser(
        prog="logitstore-train",
        description="Train a student from a logitstore store (plot a run: logitstore-train plot DIR).",
    )
    p.add_argument("--config", help="TOML or JSON file of defaults (field names as keys)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
        else:
            kind = {"int": int, "float": float, "dict[str, Any]": json.loads}.get(f.type, str)
            p.add_argument(flag, type=kind, default=None, help=HELP[f.name])
    return p


def _config(args: argparse.Namespace) -> Any:
    from trainer.train import TrainConfig

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            text = path.read_text()
            loaded = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise LogitStoreError(f"--config {path}: {e}") from None
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LogitStoreError(f"--config {args.config}: unknown keys {', '.join(unknown)}")
    values |= {k: v for k, v in vars(args).items() if k in names and v is not None}
    missing = [f"--{k}" for k in REQUIRED if k not in values]
    if missing:
        raise LogitStoreError(f"missing {', '.join(missing)} (on the command line or in --config)")
    return TrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["plot"]:
            p = argparse.ArgumentParser(prog="logitstore-train plot", description="Draw a run's curves to a PNG.")
            p.add_argument("run", help="the --out directory of a run")
            p.add_argument("--out", help="PNG path (default RUN/curves.png)")
            args = p.parse_args(argv[1:])
            from trainer.plot import plot_run

            print(plot_run(args.run, args.out))
            return 0
        args = _train_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        cfg = _config(args)
        if args.no_progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        from trainer.train import train

        final = train(cfg, progress=not args.no_progress)
        print(final)
        return 0
    except LogitStoreError as e:
        print(f"logitstore-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("logitstore-train: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
