"""`logitstore-train`: train a student from a store; `logitstore-train plot DIR` draws its curves.

Every `TrainConfig` field is a flag (`--seq-len`, `--eval-store`, ...). `--config FILE`
(TOML or JSON, keys are the field names) gives defaults that flags override, so a run can
be described by one file and varied from the command line. Torch is imported only when a
run starts, so `--help` and a mistyped flag answer at once.
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
from trainer.config import TrainConfig

HELP = {
    "store": "the store to train from: a path, s3://..., or http(s)://HOST/v1/stores/ID/zarr; repeat it for "
    "several teachers' stores of the same corpus (see --store-weights)",
    "student": "a config.json (fresh weights) or a model directory / .gguf / hub id (pretrained)",
    "out": "run directory: metrics.jsonl, checkpoints/, final/",
    "tokenizer": "the student's tokenizer (default: its own, else the store's teacher's)",
    "token": "API key for a store served by logitstore-server (http(s)://... only)",
    "storage_options": "fsspec options as a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}' for S3",
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
    "grad_checkpointing": "keep only each decoder layer's input and recompute the rest in the backward: "
    "activation memory of one layer instead of all, for about a third more compute",
    "fsdp": "under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2: each "
    "decoder layer, then the root; bf16 compute with fp32 reduction on CUDA) instead of replicating them "
    "(DDP); checkpoints are then sharded (torch.distributed.checkpoint)",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "final learning rate as a fraction of --lr (cosine)",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW weight decay on matrices",
    "clip": "gradient-norm clipping (0: off)",
    "seed": "seed of the student's initial weights and of the data order",
    "log_every": "steps between metrics records",
    "eval_every": "steps between evaluations (0: at the end only)",
    "eval_text": "held-out text file (.txt, .jsonl, .parquet; checked before training starts): perplexity",
    "eval_store": "held-out store: KL to the teacher, top-1 agreement, perplexity",
    "eval_tokens": "tokens evaluated per eval source",
    "save_every": "steps between checkpoints (0, or more than --steps: at the end only); Ctrl-C also writes one",
    "num_workers": "DataLoader worker processes per rank",
    "device": "auto, cpu, cuda or cuda:N",
    "resume": "continue from the newest checkpoint in --out",
    "store_weights": "with several --store: each teacher's weight in the KD loss, comma-separated in --store "
    "order, summing to 1 (default: equal)",
    "select": "a generated store's samples to train on: all, or best-of-n (per prompt the one the teacher finds "
    "likeliest)",
    "report_to": "where records go besides OUT/metrics.jsonl: none, or tensorboard (event files in "
    "OUT/tensorboard/; needs the tensorboard package)",
}
REQUIRED = ("store", "student", "out")
# What a --config value must be, by the TrainConfig field's type (a string: postponed annotations).
KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "dict[str, Any]": "a table (object)",
         "list[str]": "a string or a list of strings", "list[float]": "a list of numbers"}


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="logitstore-train",
        description="Train a student from a logitstore store (plot a run: logitstore-train plot DIR).",
    )
    p.add_argument("--config", help="TOML or JSON file of defaults (field names as keys)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    required = p.add_argument_group("required (on the command line or in --config)")
    options = p.add_argument_group("training options (also keys of --config)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra_stores":  # the second and later --store (a key of --config too)
            continue
        flag = "--" + f.name.replace("_", "-")
        group = required if f.name in REQUIRED else options
        # The parser's defaults stay None, so that a flag not given leaves --config's value;
        # the help shows TrainConfig's default. argparse %-formats help texts.
        text = (HELP[f.name] + _default_note(f)).replace("%", "%%")
        if f.name == "store":  # repeatable: the first is the store, the others are extra_stores
            group.add_argument(flag, action="append", default=None, help=text)
        elif f.type == "bool":
            group.add_argument(flag, action="store_true", default=None, help=text)
        elif f.type == "list[float]":
            group.add_argument(flag, type=_numbers, default=None, help=text)
        elif f.type == "list[str]":  # --report-to tensorboard [OTHER ...], as HF Trainer's report_to
            group.add_argument(flag, nargs="+", default=None, help=text)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)  # a JSON object (dict) is parsed in _config
            group.add_argument(flag, type=kind, default=None, help=text)
    return p


def _default_note(f: dataclasses.Field) -> str:
    """' (default: X)' for --help; nothing for a required field, an off switch or a None default
    (whose help says what it means)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, list):
        value = " ".join(value)
    return "" if value is None or value is False else f" (default: {value})"


def _config(args: argparse.Namespace) -> TrainConfig:
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            text = path.read_text()
            loaded = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as e:
            raise LogitStoreError(f"--config {path}: {e}") from None
        if not isinstance(loaded, dict):
            raise LogitStoreError(f"--config {path}: expected an object of settings, got {type(loaded).__name__}")
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(values) - set(types))
        if unknown:
            raise LogitStoreError(f"--config {path}: unknown keys {', '.join(unknown)}")
        for key, value in values.items():
            _check_type(f"--config {path}: {key}", value, types[key])
    if args.store:  # --store A --store B: A, and B as an extra store
        args.store, stores = args.store[0], args.store[1:]
        if stores:
            values["extra_stores"] = stores
    for name, value in vars(args).items():
        if name in types and value is not None:
            is_object = types[name] == "dict[str, Any]"
            values[name] = _json_object("--" + name.replace("_", "-"), value) if is_object else value
    missing = [f"--{k}" for k in REQUIRED if k not in values]
    if missing:
        raise LogitStoreError(f"missing {', '.join(missing)} (on the command line or in --config)")
    return TrainConfig(**values)


def _check_type(what: str, value: Any, hint: str) -> None:
    """Refuse a --config value of the wrong type (`steps = "ten"`) before it fails deep inside."""
    if hint == "bool":
        ok = isinstance(value, bool)
    elif hint == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint == "dict[str, Any]":
        ok = isinstance(value, dict)
    elif hint == "list[float]":
        ok = isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    elif hint == "list[str]":  # one string is a list of one (TrainConfig makes it so)
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    else:  # str, str | None, a Literal of strings
        ok = isinstance(value, str) or (value is None and "None" in hint)
    if not ok:
        raise LogitStoreError(f"{what} must be {KINDS.get(hint, 'a string')}, got {value!r}")


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers (e.g. 0.7,0.3)") from None


def _json_object(flag: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise LogitStoreError(f"{flag}: not valid JSON ({e}): {text}") from None
    if not isinstance(value, dict):
        raise LogitStoreError(f"{flag} must be a JSON object such as '{{\"endpoint_url\": \"http://...\"}}', "
                              f"got {type(value).__name__} {text}")
    return value


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
    except KeyboardInterrupt as e:
        checkpoint = getattr(e, "checkpoint", None)  # trainer.train.TrainingInterrupted: Ctrl-C during the loop
        if checkpoint is not None:
            print(f"logitstore-train: interrupted; wrote {checkpoint}: continue with the same command plus --resume",
                  file=sys.stderr)
        else:
            print("logitstore-train: interrupted; --resume continues from the newest checkpoint in --out, if any",
                  file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
