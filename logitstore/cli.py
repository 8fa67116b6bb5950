"""`logitstore`: capture a teacher into a store, describe a store, verify it.

Errors a user can cause print one line (`error: ...`) and exit 1; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from logitstore import storage
from logitstore.errors import LogitStoreError
from logitstore.reader import open_store
from logitstore.verify import verify


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except LogitStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; committed work units are kept (continue with --resume)", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logitstore", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    cap = sub.add_parser("capture", help="run a teacher over a corpus and write a store")
    cap.add_argument("--teacher", required=True, help="HF model dir, .gguf file, hub id, or alias smollm2-135m")
    cap.add_argument("--corpus", required=True, nargs="+", help=".txt, .jsonl or .parquet files")
    cap.add_argument("--out", required=True, help="directory of the new store")
    cap.add_argument("--k", type=int, default=64,
                     help="ids stored per token (default 64); the cap in adaptive and sampled modes")
    cap.add_argument("--mode", choices=["topk", "adaptive", "sampled"], default="topk",
                     help="topk: the k most likely ids; adaptive: the fewest ids whose mass reaches --coverage; "
                     "sampled: the distinct ids of --draws seeded draws, with counts")
    cap.add_argument("--coverage", type=float, default=0.99, help="adaptive mode: T=1 mass to cover (default 0.99)")
    cap.add_argument("--draws", type=int, default=50, help="sampled mode: draws per token, <= 255 (default 50)")
    cap.add_argument("--seed", type=int, default=0, help="sampled mode: seed of the draws (default 0)")
    cap.add_argument("--head", type=int, default=0,
                     help="sampled mode: store the top HEAD ids exactly and draw from the rest (default 0)")
    cap.add_argument("--counts-only", action="store_true",
                     help="sampled mode with --temperatures 1: store ids and counts without log-probs "
                     "(about half the bytes; the trainer's gradient is the same)")
    cap.add_argument("--temperatures", default="1,2,4", help="comma-separated temperatures to store lse for")
    cap.add_argument("--max-len", type=int, default=1024, help="longest sequence the teacher sees")
    cap.add_argument("--packing", choices=["packed", "document"], default="packed")
    cap.add_argument("--max-tokens", type=int, default=None, help="stop after this many corpus tokens")
    cap.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    cap.add_argument("--unit-tokens", type=int, default=262_144, help="tokens per work unit (= segment)")
    cap.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per teacher forward")
    cap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    cap.add_argument("--gpus", type=int, default=1,
                     help="processes to run (one per GPU, or CPU processes without CUDA); >1 launches torchrun")
    cap.add_argument("--resume", action="store_true", help="continue a killed capture of the same settings")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cap.set_defaults(run=_capture)

    info = sub.add_parser("info", help="describe a store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=_info)

    ver = sub.add_parser("verify", help="read every chunk, check checksums and invariants, print a digest")
    ver.add_argument("store")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(run=_verify)
    return parser


def _capture(args: argparse.Namespace) -> int:
    # torch and transformers load only for the command that needs them.
    from tqdm import tqdm

    from logitstore.capture import distributed
    from logitstore.capture.engine import CaptureConfig, CaptureProgress, capture
    from logitstore.capture.teacher import load_teacher

    if args.gpus < 1:
        raise LogitStoreError(f"--gpus {args.gpus} must be >= 1")
    rank, _ = distributed.rank_and_world()
    if args.gpus > 1 and "RANK" not in os.environ:  # not yet under torchrun: become its launcher
        return distributed.launch(args.gpus, _without_gpus(args.argv[args.argv.index("capture") + 1:]))

    try:
        temperatures = tuple(float(t) for t in args.temperatures.split(","))
    except ValueError:
        raise LogitStoreError(f"--temperatures {args.temperatures!r}: expected numbers such as 1,2,4") from None
    config = CaptureConfig(
        k=args.k,
        temperatures=temperatures,
        max_len=args.max_len,
        packing=args.packing,
        max_tokens=args.max_tokens,
        text_field=args.text_field,
        unit_tokens=args.unit_tokens,
        batch_tokens=max(args.batch_tokens, args.max_len),
        mode=args.mode,
        coverage=args.coverage,
        draws=args.draws,
        head=args.head,
        counts_only=args.counts_only,
        seed=args.seed,
    )
    if args.no_progress or rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    teacher = load_teacher(args.teacher, device=distributed.device_for_rank(args.device))
    # Under torchrun rank 0 shows its own units' progress; the ranks' shares differ by at most one unit.
    with tqdm(total=0, unit="tok", unit_scale=True, disable=args.no_progress or rank != 0, desc="capture") as bar:

        def progress(p: CaptureProgress) -> None:
            bar.total = p.tokens_total
            bar.update(p.tokens_done - bar.n)

        store = capture(teacher, args.corpus, args.out, config, resume=args.resume, progress=progress)
    if rank == 0:
        print(f"{store.url}: {store.num_tokens} tokens, {store.num_sequences} sequences, "
              f"{store.meta.capture.mode} k={store.meta.capture.k}")
    return 0


def _without_gpus(argv: list[str]) -> list[str]:
    """The capture arguments minus --gpus (the workers are one process each)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def describe(url: str, storage_options: dict[str, Any] | None = None) -> dict:
    """What `info --json` prints: the metadata plus sizes (`disk_bytes` where the store can be listed)."""
    store = open_store(url, storage_options=storage_options)
    out = {
        "url": store.url,
        "tokens": store.num_tokens,
        "sequences": store.num_sequences,
        "segments_committed": len(store.segments),
        "segments_planned": store.meta.num_segments,
        "complete": store.complete,
        "meta": store.meta.model_dump(mode="json"),
    }
    disk = storage.tree_bytes(url, storage_options)
    if disk is not None:
        out["disk_bytes"] = disk
        out["bytes_per_token"] = disk / store.num_tokens if store.num_tokens else None
    return out


def _info(args: argparse.Namespace) -> int:
    d = describe(args.store)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    m = d["meta"]
    cap = m["capture"]
    lines = [
        f"store       {d['url']}",
        f"teacher     {m['teacher']['name']} ({m['teacher']['source']}), {m['teacher']['dtype']}",
        f"tokenizer   {m['tokenizer']['name']}, vocab {m['tokenizer']['vocab_size']}, "
        f"logits width {m['tokenizer']['logits_width']}, fingerprint {m['tokenizer']['fingerprint'][:16]}",
        f"capture     {_mode(cap)} k={cap['k']}, temperatures {', '.join(f'{t:g}' for t in cap['temperatures'])}, "
        f"max_len {cap['max_len']} ({cap['packing']})",
        f"corpus      {m['corpus']['documents']} documents from {', '.join(m['corpus']['sources'])}",
        f"content     {d['tokens']} tokens, {d['sequences']} sequences, "
        f"{d['segments_committed']}/{d['segments_planned']} segments committed"
        + ("" if d["complete"] else " (INCOMPLETE: resume the capture)"),
    ]
    if "disk_bytes" in d:
        lines.append(f"size        {d['disk_bytes'] / 1e6:.2f} MB, {d['bytes_per_token'] or 0:.1f} bytes/token")
    print("\n".join(lines))
    return 0


def _mode(cap: dict) -> str:
    """The capture mode and its own settings, e.g. `sampled (50 draws, seed 0, counts only)`."""
    if cap["mode"] == "adaptive":
        return f"adaptive (coverage {cap['coverage']:g})"
    if cap["mode"] == "sampled":
        head = f"top {cap['head']} + " if cap.get("head") else ""
        counts_only = ", counts only" if cap.get("counts_only") else ""
        return f"sampled ({head}{cap['draws']} draws, seed {cap['seed']}{counts_only})"
    return cap["mode"]


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.store)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for err in report.errors:
            print(f"error: {err}", file=sys.stderr)
        status = "ok" if report.ok else f"FAILED ({len(report.errors)} problem(s))"
        print(f"{report.url}: {status}, {report.tokens} tokens, {report.sequences} sequences, "
              f"{report.segments_committed}/{report.segments_planned} segments, digest {report.digest}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
