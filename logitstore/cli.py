"""`logitstore`: capture a teacher into a store, or its generations; describe a store, verify it.

Errors a user can cause print one line (`error: ...`) and exit 1; never a traceback.
`verify` exits 2 for an intact store whose capture is not finished (INCOMPLETE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Literal, get_args, get_origin

from logitstore.errors import LogitStoreError
from logitstore.reader import describe
from logitstore.schema import GenerationSettings
from logitstore.spec import CaptureSpec, CaptureTuning, SpecError
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
    _add_spec_flags(cap)
    cap.add_argument("--text-field", default="text",
                     help="JSONL field / Parquet column holding the text (default: text)")
    cap.add_argument("--messages-field", default="messages",
                     help="JSONL field / Parquet column holding a chat row's messages (default: messages); rows "
                     "with prompt and completion are chat rows too")
    cap.add_argument("--unit-tokens", type=int, default=CaptureTuning.unit_tokens,
                     help="tokens per work unit (= segment, = the step a resume restarts from) (default: %(default)s)")
    cap.add_argument("--batch-tokens", type=int, default=CaptureTuning.batch_tokens,
                     help="padded tokens per teacher forward, at least --max-len (default: %(default)s)")
    cap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    cap.add_argument("--gpus", type=int, default=1,
                     help="processes to run (one per GPU, or CPU processes without CUDA); >1 launches torchrun")
    cap.add_argument("--tp", type=int, default=1,
                     help="shard the teacher over this many GPUs (tensor parallel, its transformers tp_plan), for a "
                     "teacher larger than one GPU; >1 launches torchrun (default: %(default)s)")
    cap.add_argument("--device-map", choices=("auto", "balanced", "sequential"),
                     help="spread a teacher larger than one GPU over the visible GPUs, layer by layer (accelerate); "
                     "what does not fit runs offloaded from CPU memory, then from --offload-folder")
    cap.add_argument("--max-memory", type=_memory_limits, metavar="DEVICE=SIZE,...",
                     help="--device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=400GiB")
    cap.add_argument("--offload-folder", help="--device-map: where weights that fit nowhere else are kept")
    cap.add_argument("--resume", action="store_true", help="continue a killed capture of the same settings")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cap.set_defaults(run=_capture)

    gen = sub.add_parser("generate", help="let a teacher write completions for prompts and store its soft labels "
                         "along them")
    gen.add_argument("--teacher", required=True, help="HF model dir, .gguf file, hub id, or alias smollm2-135m")
    gen.add_argument("--prompts", required=True, nargs="+",
                     help=".jsonl or .parquet chat rows (messages, or prompt) or text rows, or .txt paragraphs")
    gen.add_argument("--out", required=True, help="directory of the new store")
    for name, info in GenerationSettings.model_fields.items():
        flag = "--n" if name == "n" else _flag(name)
        gen.add_argument(flag, dest=f"gen_{name}", type=type(info.default), default=info.default, metavar=name.upper(),
                         help=f"{info.description} (default: {info.default})")
    _add_spec_flags(gen, skip=("packing", "train_on", "max_tokens"), rename={"seed": "draws_seed"})
    gen.add_argument("--text-field", default="text", help="JSONL field / Parquet column of text prompts")
    gen.add_argument("--messages-field", default="messages", help="JSONL field / Parquet column of chat prompts")
    gen.add_argument("--unit-tokens", type=int, default=CaptureTuning.unit_tokens,
                     help="prompt + completion budget per work unit (= the step a resume restarts from)")
    gen.add_argument("--batch-tokens", type=int, default=CaptureTuning.batch_tokens,
                     help="prompt + completion budget per batch of samples (default: %(default)s)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--resume", action="store_true", help="continue a killed generation of the same settings")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(run=_generate)

    token_help = "API key for a store served by logitstore-server (http(s)://HOST/v1/stores/ID/zarr)"
    info = sub.add_parser("info", help="describe a store")
    info.add_argument("store")
    info.add_argument("--json", action="store_true")
    info.add_argument("--token", help=token_help)
    info.set_defaults(run=_info)

    ver = sub.add_parser("verify", help="read every chunk, check checksums and invariants, print a digest",
                         description="Exit status: 0 ok, 1 damaged (or unreadable), 2 intact but INCOMPLETE "
                         "(not every planned segment is committed: resume the capture).")
    ver.add_argument("store")
    ver.add_argument("--json", action="store_true")
    ver.add_argument("--token", help=token_help)
    ver.set_defaults(run=_verify)
    return parser


def _capture(args: argparse.Namespace) -> int:
    if args.no_progress:
        # No bars at all, the teacher's loading and GGUF de-quantization included. tqdm reads
        # TQDM_* once, on import, which happens just below (our own bar passes `disable` itself).
        os.environ.setdefault("TQDM_DISABLE", "1")
    # torch and transformers load only for the command that needs them.
    from tqdm import tqdm

    from logitstore.capture import distributed
    from logitstore.capture.engine import CaptureProgress, capture, check_inputs
    from logitstore.capture.teacher import load_teacher

    if args.gpus < 1 or args.tp < 1:
        raise LogitStoreError(f"--gpus {args.gpus} and --tp {args.tp} must be >= 1")
    if args.gpus > 1 and args.tp > 1:
        raise LogitStoreError("--gpus and --tp: data parallelism over tensor-parallel groups is not supported; "
                              "give one of them")
    if args.device_map and (args.gpus > 1 or args.tp > 1):
        raise LogitStoreError("--device-map places one teacher over all the GPUs of one process: it does not "
                              "combine with --gpus or --tp")
    if (args.max_memory or args.offload_folder) and not args.device_map:
        raise LogitStoreError("--max-memory and --offload-folder apply to --device-map; add --device-map auto")
    rank, _ = distributed.rank_and_world()
    spec = _spec_from_flags(args)
    try:
        tuning = CaptureTuning(unit_tokens=args.unit_tokens, batch_tokens=args.batch_tokens)
    except ValueError as e:
        raise LogitStoreError(str(e).replace("CaptureTuning.", "--").replace("_", "-")) from None
    if "RANK" not in os.environ:  # under torchrun the launcher (this branch) has checked already
        # Seconds now rather than after the teacher has loaded.
        check_inputs(args.corpus, args.out, text_field=args.text_field, messages_field=args.messages_field,
                     resume=args.resume)
        _check_context(spec, args)
        if args.gpus > 1 or args.tp > 1:  # become torchrun's launcher
            return distributed.launch(max(args.gpus, args.tp),
                                      _without_gpus(args.argv[args.argv.index("capture") + 1:]))  # fmt: skip
    if args.no_progress or rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    teacher = load_teacher(args.teacher, device=distributed.device_for_rank(args.device), dtype=spec.dtype,
                           tp=args.tp, device_map=args.device_map, max_memory=args.max_memory,
                           offload_folder=args.offload_folder)  # fmt: skip
    # Under torchrun rank 0 shows its own units' progress; the ranks' shares differ by at most one unit.
    with tqdm(total=0, unit="tok", unit_scale=True, disable=args.no_progress or rank != 0, desc="capture") as bar:

        def progress(p: CaptureProgress) -> None:
            bar.total = p.tokens_total
            bar.update(p.tokens_done - bar.n)

        store = capture(teacher, args.corpus, args.out, spec, tuning=tuning, text_field=args.text_field,
                        messages_field=args.messages_field, resume=args.resume, progress=progress)
    if rank == 0:
        print(f"{store.url}: {store.num_tokens} tokens, {store.num_sequences} sequences, "
              f"{store.meta.capture.mode} k={store.meta.capture.k}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.no_progress:
        os.environ.setdefault("TQDM_DISABLE", "1")  # as in _capture: before tqdm is imported
    from tqdm import tqdm

    from logitstore.capture.engine import CaptureProgress, check_inputs
    from logitstore.capture.generate import generate
    from logitstore.capture.teacher import load_teacher

    spec = _spec_from_flags(args)
    try:
        tuning = CaptureTuning(unit_tokens=args.unit_tokens, batch_tokens=args.batch_tokens)
    except ValueError as e:
        raise LogitStoreError(str(e).replace("CaptureTuning.", "--").replace("_", "-")) from None
    check_inputs(args.prompts, args.out, text_field=args.text_field, messages_field=args.messages_field,
                 resume=args.resume)
    _check_context(spec, args)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    teacher = load_teacher(args.teacher, device=args.device, dtype=spec.dtype)
    # The bar counts the generation budget (n x max_new_tokens per prompt; a sample that ends early
    # spends the rest of its budget at once), the rate the tokens actually generated.
    with tqdm(total=0, unit="tok", unit_scale=True, disable=args.no_progress, desc="generate") as bar:

        def progress(p: CaptureProgress) -> None:
            bar.total = p.tokens_total
            bar.set_postfix_str(f"{p.tokens_per_s:.0f} generated tok/s", refresh=False)
            bar.update(p.tokens_done - bar.n)

        store = generate(teacher, args.prompts, args.out, spec, tuning=tuning, text_field=args.text_field,
                         messages_field=args.messages_field, resume=args.resume, progress=progress)
    samples = store.samples()
    ended = sum(1 for r in samples.column("finish_reason").to_pylist() if r == "eos")
    print(f"{store.url}: {store.num_sequences} samples of {store.meta.corpus.documents} prompts ({ended} ended, "
          f"the others reached --max-new-tokens), {store.num_tokens} tokens, {store.meta.capture.mode} "
          f"k={store.meta.capture.k}")
    return 0


def _add_spec_flags(
    parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), rename: dict[str, str] | None = None
) -> None:
    """One flag per CaptureSpec field (`max_len` -> `--max-len`), with its default and description;
    `rename` gives a field another flag (its value still lands under the field's name)."""
    for name, info in CaptureSpec.model_fields.items():
        if name == "generate" or name in skip:  # generate: its own flags, on `logitstore generate`
            continue
        flag, kind = _flag((rename or {}).get(name, name)), info.annotation
        shown = ",".join(f"{t:g}" for t in info.default) if name == "temperatures" else info.default
        help_text = info.description if shown is None else f"{info.description} (default: {shown})"
        if kind is bool:  # --x / --no-x; unset (None) lets the spec choose (counts_only follows the mode)
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=info.description)
        elif get_origin(kind) is Literal:
            parser.add_argument(flag, dest=name, choices=get_args(kind), default=info.default, help=help_text)
        elif name == "temperatures":
            parser.add_argument(flag, dest=name, type=_numbers, default=info.default,
                                help=f"comma-separated; {help_text}")
        else:
            number = int if int in (kind, *get_args(kind)) else float
            parser.add_argument(flag, dest=name, type=number, default=info.default, help=help_text)


def _spec_from_flags(args: argparse.Namespace) -> CaptureSpec:
    """The spec, or the spec's own error re-phrased with the flags that set each field."""
    fields = {name: getattr(args, name) for name in CaptureSpec.model_fields if hasattr(args, name)}
    if hasattr(args, "gen_n"):
        fields["generate"] = {name: getattr(args, f"gen_{name}") for name in GenerationSettings.model_fields}
    try:
        return CaptureSpec.parse(fields)
    except SpecError as e:
        raise _as_flags(e, args) from None


def _as_flags(error: SpecError, args: argparse.Namespace) -> LogitStoreError:
    """The spec's error with each field phrased as the flag that set it: `--k 0: ...`."""
    return LogitStoreError("; ".join(f"{_flag_with_value(args, name)}: {msg}" for name, msg in error.problems))


def _check_context(spec: CaptureSpec, args: argparse.Namespace) -> None:
    """--max-len against the teacher's context length, read from its config, not its weights."""
    from logitstore.hf import teacher_context_length

    try:
        spec.check_teacher(context_length=teacher_context_length(args.teacher))
    except SpecError as e:
        raise _as_flags(e, args) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_with_value(args: argparse.Namespace, name: str) -> str:
    """`--k 0`, `--temperatures 1,1`, `--counts-only`: the flag as the user typed it."""
    if name.startswith("generate."):  # `logitstore generate`'s own flags
        name = name.removeprefix("generate.")
        return f"--{name.replace('_', '-')} {getattr(args, f'gen_{name}', '')}".rstrip()
    if name == "seed" and hasattr(args, "gen_n"):
        return f"--draws-seed {args.seed}"
    value = getattr(args, name, None)
    if isinstance(value, bool) or value is None:
        return _flag(name)
    return f"{_flag(name)} {','.join(f'{v:g}' for v in value) if name == 'temperatures' else value}"


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers such as 1,2,4") from None


def _memory_limits(text: str) -> dict[str | int, str]:
    """`0=70GiB,cpu=400GiB` -> {0: "70GiB", "cpu": "400GiB"} (accelerate's max_memory)."""
    limits: dict[str | int, str] = {}
    for item in text.split(","):
        device, sep, size = item.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not device or not size:
            raise argparse.ArgumentTypeError(f"{item!r} is not DEVICE=SIZE (e.g. 0=70GiB or cpu=400GiB)")
        limits[int(device) if device.isdigit() else device] = size
    return limits


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


def _info(args: argparse.Namespace) -> int:
    d = describe(args.store, token=args.token)
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
    if cap.get("generate"):
        g = cap["generate"]
        lines.append(f"generated   {g['n']} samples per prompt, at most {g['max_new_tokens']} new tokens, temperature "
                     f"{g['temperature']:g}, top-p {g['top_p']:g}, seed {g['seed']}")
    if cap.get("train_on"):
        lines.append(f"soft labels at the positions predicting {TRAINED_POSITIONS[cap['train_on']]}")
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


TRAINED_POSITIONS = {"assistant": "the assistant's tokens (chat rows)", "all": "every token",
                     "completion": "the completions' tokens"}

# verify's exit status: damage outranks incompleteness, so 2 means "intact so far, resume the capture".
VERIFY_EXIT = {"ok": 0, "FAILED": 1, "INCOMPLETE": 2}


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.store, token=args.token)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for err in report.errors:
            print(f"error: {err}", file=sys.stderr)
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
        status = {"FAILED": f"FAILED ({len(report.errors)} problem(s))",
                  "INCOMPLETE": "INCOMPLETE (resume the capture)"}.get(report.status, report.status)
        print(f"{report.url}: {status}, {report.tokens} tokens, {report.sequences} sequences, "
              f"{report.segments_committed}/{report.segments_planned} segments, digest {report.digest}")
    return VERIFY_EXIT[report.status]


if __name__ == "__main__":
    sys.exit(main())
