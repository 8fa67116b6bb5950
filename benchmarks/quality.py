"""Distillation quality per arm (issue 8): CE only, cached top-k + tail, top-k renormalized, sampled,
adaptive and online full-vocabulary KD, trained on the same tokens and evaluated on held-out text.

    python benchmarks/quality.py --out results/quality           # CPU: the reduced version (no CUDA)
    python benchmarks/quality.py --gpu --out results/quality     # the full version (default with CUDA)

Steps, all in one process:
1. Split the corpus (tinyshakespeare) at a paragraph boundary: the first 1 - `--heldout-fraction`
   of its characters is the train split, the rest (the end of the corpus) the held-out split.
2. Capture one store per setting (top-k k=8, 16, 64; adaptive c=0.99 k<=64; sampled M=50) from
   the first `--train-tokens` tokens of the train split with `max_len = --seq-len`, so a training
   block is one captured sequence and the teacher's context at every position is the same
   for stored and online targets. The decoder's outputs are computed once and shared by the
   captures (`--no-share-forward` runs the teacher in each); the projection, reduction, encoding
   and writing run in every capture. Bytes/token is what `logitstore info` reports: all the
   store's files over its tokens.
3. Train every arm with the same student config, seed, steps, batch, sequence length, learning
   rate and schedule. Every store has the same tokens and sequences, and the data order depends
   only on those, so every arm sees the same tokens in the same order (CE, online and the
   renormalized arm read the k=64 store; online uses only its tokens and runs the teacher in
   the loop). The key arms (CE, top-64 + tail, online) also run with the other `--seeds`.
4. Evaluate every student and the teacher on the same held-out windows of `--seq-len` tokens:
   the exact full-vocabulary KL(teacher || student) at T = 1, top-1 agreement (argmax equal),
   and the student's next-token perplexity.

One JSON line per store, per run and a summary line with the recovery ratios
(metric_CE - metric_top64) / (metric_CE - metric_online) for the held-out KL and perplexity;
`--out` gets results.json and quality.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from logitstore import open_store
from logitstore.capture.corpus import read_documents, tokenize_and_pack
from logitstore.capture.engine import capture
from logitstore.capture.teacher import Teacher, load_teacher, resolve_device
from logitstore.reader import describe
from logitstore.spec import CaptureSpec
from trainer.student import load_student
from trainer.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "tinyshakespeare.txt"
FP16_BYTES_PER_VALUE = 2

STORES = {
    "topk8": dict(mode="topk", k=8),
    "topk16": dict(mode="topk", k=16),
    "topk64": dict(mode="topk", k=64),
    "adaptive": dict(mode="adaptive", k=64, coverage=0.99),
    "sampled": dict(mode="sampled", k=64, draws=50, seed=0),
    "topk64_draws": dict(mode="sampled", head=64, k=16, draws=16, seed=0),
}
# arm -> (store it reads, loss, topk_renormalize, what it is)
ARMS = {
    "ce": ("topk64", "ce", False, "CE only (hard labels)"),
    "topk8": ("topk8", "kd", False, "cached top-8 + tail"),
    "topk16": ("topk16", "kd", False, "cached top-16 + tail"),
    "topk64": ("topk64", "kd", False, "cached top-64 + tail"),
    "topk64_renorm": ("topk64", "kd", True, "cached top-64 renormalized, no tail (DistillKit/Axolotl)"),
    "adaptive": ("adaptive", "kd", False, "adaptive c=0.99, k<=64, + tail"),
    "sampled": ("sampled", "kd", False, "sampled M=50 (unbiased estimator)"),
    "topk64_draws": ("topk64_draws", "kd", False, "top-64 exact + 16 draws from the tail (unbiased)"),
    "online": ("topk64", "online", False, "online full-vocabulary KD, teacher in the loop"),
}
KEY_ARMS = ("ce", "topk64", "online")

# Sized for the shared 2-core CPU box (~35 min for everything) and for one GPU.
PRESETS = {
    "cpu": dict(train_tokens=32_768, heldout_tokens=4096, seq_len=128, batch_size=4, steps=64, lr=3e-3,
                warmup_steps=4, student="tiny", seeds="0,1", eval_batch=8),
    "gpu": dict(train_tokens=None, heldout_tokens=None, seq_len=512, batch_size=16, steps=2000, lr=1e-3,
                warmup_steps=100, student="small", seeds="0,1,2", eval_batch=16),
}
STUDENTS = {
    "tiny": str(ROOT / "examples" / "student-llama-tiny.json"),
    # ~25M non-embedding parameters; written to the work directory when used.
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}


def split_corpus(path: Path, heldout_fraction: float, work: Path) -> tuple[Path, Path]:
    """Cut at the first paragraph boundary after (1 - fraction) of the characters: train, held-out."""
    text = path.read_text(encoding="utf-8")
    cut = text.find("\n\n", int(len(text) * (1 - heldout_fraction)))
    if cut < 0:
        raise SystemExit(f"{path}: no paragraph boundary after {1 - heldout_fraction:.0%} of the text")
    train_file, heldout_file = work / "train.txt", work / "heldout.txt"
    train_file.write_text(text[:cut].rstrip() + "\n", encoding="utf-8")
    heldout_file.write_text(text[cut:].lstrip() + "\n", encoding="utf-8")
    return train_file, heldout_file


class SharedForward(torch.nn.Module):
    """The teacher with its decoder's outputs memoized by the batch's ids and mask.

    Every capture of this benchmark packs the same tokens into the same batches, so the decoder
    (the expensive part on a CPU) runs once per batch; the capture engine still projects,
    reduces, encodes and writes in each capture. Exposes what `capture` uses of a model: its
    parameters, config, decoder, input and output embeddings (anything else fails loudly).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        self.cache: dict[str, torch.Tensor] = {}

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.get_output_embeddings()

    def get_decoder(self):
        body = self.inner.get_decoder()

        def decoder(*, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
            h = hashlib.sha256(input_ids.cpu().numpy().tobytes())
            h.update(attention_mask.cpu().numpy().tobytes())
            key = h.hexdigest()
            if key not in self.cache:
                self.cache[key] = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return SimpleNamespace(last_hidden_state=self.cache[key])

        return decoder


def student_config(name: str, work: Path) -> str:
    spec = STUDENTS[name]
    if isinstance(spec, str):
        return spec
    base = json.loads(Path(STUDENTS["tiny"]).read_text())
    config = LlamaConfig(**{**base, **spec})
    path = work / f"student-{name}.json"
    path.write_text(config.to_json_string())
    return str(path)


def store_spec(kwargs: dict, args) -> CaptureSpec:
    """The capture of one setting (`kwargs`: CaptureSpec fields; temperatures 1 and 2 unless given) from
    the first `args.train_tokens` tokens in sequences of `args.seq_len`."""
    return CaptureSpec(**{"temperatures": (1.0, 2.0), **kwargs}, max_len=args.seq_len, max_tokens=args.train_tokens)


def store_info(url: str) -> dict:
    """Tokens, sequences, bytes/token (what `logitstore info` reports) and stored ids per token."""
    store = open_store(url)
    ids = 0.0
    for a in range(0, store.num_tokens, 65_536):
        ids += float((store.read(a, min(a + 65_536, store.num_tokens)).topk_ids >= 0).sum())
    return {"tokens": store.num_tokens, "sequences": store.num_sequences,
            "bytes_per_token": describe(url)["bytes_per_token"], "ids_per_token": ids / store.num_tokens}


def token_layout(url: str) -> tuple:
    """What the trainer's data order depends on: the corpus, the tokens, the sequences, the segments.
    Stores with the same layout give every arm the same tokens in the same order."""
    store = open_store(url)
    return (store.meta.corpus.fingerprint, store.num_tokens, tuple(store.sequence_lengths().tolist()),
            len(store.segments))


def capture_stores(teacher: Teacher, train_file: Path, specs: dict[str, dict], args, work: Path) -> dict[str, dict]:
    """Capture every {name: CaptureSpec fields} setting into `work/stores/name`; its info by name."""
    shared = SharedForward(teacher.model) if args.share_forward else None
    runner = dataclasses.replace(teacher, model=shared) if shared is not None else teacher
    stores = {}
    for name, kwargs in specs.items():
        url = str(work / "stores" / name)
        started = time.perf_counter()
        capture(runner, [train_file], url, store_spec(kwargs, args))
        elapsed = time.perf_counter() - started
        stores[name] = {"url": url, **kwargs, **store_info(url), "capture_s": elapsed}
    if shared is not None:
        shared.cache.clear()
    # Same tokens, same sequences, same segments: the trainer's data order is then the same for all.
    first = token_layout(next(iter(stores.values()))["url"])
    for name, s in stores.items():
        if token_layout(s["url"]) != first:
            raise SystemExit(f"store {name} does not hold the same tokens, sequences and segments as the others")
    return stores


def train_arm(url: str, loss: str, renorm: bool, seed: int, student: str, args, out: Path, *, alpha: float,
              temperature: float = 1.0) -> dict:
    """Train `student` on the store at `url` with `loss` ("kd", "ce" or "online"; `renorm`: top-k
    renormalized) into `out`, with the step, batch, length, lr and schedule of `args`."""
    cfg = TrainConfig(
        store=url, student=student, out=str(out), loss=loss, topk_renormalize=renorm,
        temperature=temperature, alpha=alpha, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps, seed=seed,
        log_every=max(1, args.steps // 12), save_every=0, device=args.device,
    )  # fmt: skip
    started = time.perf_counter()
    final = train(cfg, progress=False)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    tps = [r["tokens_per_s"] for r in steps]
    return {
        "final": str(final), "train_wall_s": wall, "train_tokens_per_s": float(np.median(tps)),
        "curve": [{k: r[k] for k in ("step", "loss", "kd_loss", "ce_loss")} for r in steps],
    }


def heldout_windows(heldout_file: Path, tokenizer, seq_len: int, max_tokens: int | None) -> list[np.ndarray]:
    """The held-out split packed as a capture packs it, in windows of `seq_len` tokens."""
    packed = tokenize_and_pack(read_documents([heldout_file]), tokenizer, max_len=seq_len, max_tokens=max_tokens)
    return [s.input_ids for s in packed.sequences]


@torch.inference_mode()
def evaluate(teacher: torch.nn.Module, students: dict[str, torch.nn.Module], windows: list[np.ndarray],
             vocab: int, batch: int, device: torch.device) -> dict[str, dict]:
    """Exact full-vocabulary KL(teacher || student) at T=1, top-1 agreement, next-token perplexity,
    and the speculative-decoding acceptance rate sum_v min(p_v, q_v) of the student as a draft for
    the teacher; the teacher runs once per batch of windows and every model sees the same windows."""
    models = {"teacher": teacher, **students}
    sums = {name: np.zeros(5) for name in models}  # kl, top1, nll, next-token count, acceptance
    positions = 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        longest = max(len(w) for w in chunk)
        ids = torch.zeros((len(chunk), longest), dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.bool)
        for r, w in enumerate(chunk):
            ids[r, : len(w)] = torch.from_numpy(w.astype(np.int64))
            mask[r, : len(w)] = True
        ids, mask = ids.to(device), mask.to(device)
        nxt = mask[:, 1:] & mask[:, :-1]
        targets = ids[:, 1:][nxt]
        t_logp = None
        for name, model in models.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=ids).logits
            logp = logits[..., :vocab].float().log_softmax(-1)
            if t_logp is None:
                t_logp = logp  # the teacher comes first
            rows_t, rows_s = t_logp[mask], logp[mask]
            kl = (rows_t.exp() * (rows_t - rows_s)).sum(-1)
            top1 = rows_t.argmax(-1) == rows_s.argmax(-1)
            accept = torch.minimum(rows_t.exp(), rows_s.exp()).sum(-1)
            nll = F.nll_loss(logp[:, :-1][nxt], targets, reduction="sum")
            sums[name] += [kl.double().sum().item(), top1.sum().item(), nll.double().item(), int(nxt.sum()),
                           accept.double().sum().item()]  # fmt: skip
            del logits, logp
        positions += int(mask.sum())
    return {
        name: {"heldout_kl": float(s[0] / positions), "heldout_top1": float(s[1] / positions),
               "heldout_ppl": math.exp(s[2] / s[3]), "heldout_accept": float(s[4] / positions)}
        for name, s in sums.items()
    }


def recovery(ce: dict, kd: dict, online: dict, metric: str) -> float | None:
    gap = ce[metric] - online[metric]
    return (ce[metric] - kd[metric]) / gap if gap != 0 else None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    arms = [a for a in ARMS if f"{a}_s{results['seeds'][0]}" in runs]
    metrics = [("heldout_kl", "held-out KL(teacher || student), T=1"), ("heldout_ppl", "held-out perplexity"),
               ("heldout_top1", "top-1 agreement with the teacher")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    colors = {"ce": "0.55", "online": "tab:green", "topk64": "tab:blue", "topk64_renorm": "tab:red"}
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for x, arm in enumerate(arms):
            values = [runs[f"{arm}_s{s}"][metric] for s in results["seeds"] if f"{arm}_s{s}" in runs]
            ax.bar(x, values[0], color=colors.get(arm, "tab:cyan"), width=0.7)
            ax.annotate(f"{values[0]:.3g}", (x, values[0]), ha="center", va="bottom", fontsize=7)
            if len(values) > 1:
                ax.plot([x] * (len(values) - 1), values[1:], "k.", markersize=7, label=None)
        ax.axhline(results["init"][metric], color="0.3", ls=":", lw=1)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels([f"{a}\n{_bytes_label(results, a)}" for a in arms], rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        if metric == "heldout_ppl":
            ax.set_yscale("log")
        if metric != "heldout_top1":
            lo = min(runs[f"{a}_s{s}"][metric] for a in arms for s in results["seeds"] if f"{a}_s{s}" in runs)
            ax.set_ylim(bottom=lo * 0.9 if metric == "heldout_ppl" else 0)
    axes[0].text(0.02, 0.98, "bars: seed 0; dots: other seeds\ndotted: untrained student", va="top",
                 transform=axes[0].transAxes, fontsize=7)
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bytes_label(results: dict, arm: str) -> str:
    store, loss, _, _ = ARMS[arm]
    if loss == "online":
        return "teacher in loop"
    if loss == "ce":
        return "tokens only"
    return f"{results['stores'][store]['bytes_per_token']:.0f} B/token"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the full-size preset (default when CUDA is available)")
    p.add_argument("--cpu", action="store_true", help="the reduced CPU preset (default without CUDA)")
    p.add_argument("--out", required=True, help="results.json and quality.png go here")
    p.add_argument("--work", help="stores and runs (default: a temporary directory, deleted at the end)")
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--train-tokens", type=int, help="tokens captured from the train split (default: preset)")
    p.add_argument("--heldout-tokens", type=int, help="held-out tokens evaluated (default: preset)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--student", help="tiny, small, or a config/model path (default: preset)")
    p.add_argument("--seeds", help="comma-separated; the first trains every arm, the others the key arms")
    p.add_argument("--eval-batch", type=int)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.0,
                   help="weight of the hard-label CE in every KD arm, online included (the CE arm is CE only)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    p.add_argument("--no-share-forward", dest="share_forward", action="store_false")
    args = p.parse_args()

    device = resolve_device(args.device)
    preset = "gpu" if args.gpu or (device.type == "cuda" and not args.cpu) else "cpu"
    for key, value in PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.device = str(device)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {list(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs_to_do = [(a, seeds[0]) for a in arms] + [(a, s) for s in seeds[1:] for a in KEY_ARMS if a in arms]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with nullcontext(args.work) if args.work else tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        train_file, heldout_file = split_corpus(Path(args.corpus), args.heldout_fraction, work)
        teacher = load_teacher(args.teacher, device=device)
        vocab = teacher.tokenizer_info.vocab_size
        student = student_config(args.student, work) if args.student in STUDENTS else args.student
        common = {"bench": "quality", "preset": preset, "device": str(device), "threads": torch.get_num_threads()}

        stores = capture_stores(teacher, train_file, {n: STORES[n] for n in sorted({ARMS[a][0] for a in arms})},
                                args, work)
        for name, s in stores.items():
            print(json.dumps({**common, "store": name, **{k: v for k, v in s.items() if k != "url"},
                              "fp16_full_over_store": round(FP16_BYTES_PER_VALUE * vocab / s["bytes_per_token"], 1)}),
                  flush=True)

        runs = {}
        for arm, seed in runs_to_do:
            store, loss, renorm, _ = ARMS[arm]
            run = train_arm(stores[store]["url"], loss, renorm, seed, student, args, work / "runs" / f"{arm}_s{seed}",
                            alpha=args.alpha, temperature=args.temperature)
            runs[f"{arm}_s{seed}"] = {"arm": arm, "seed": seed, **run}
            print(json.dumps({**common, "trained": arm, "seed": seed,
                              "train_wall_s": round(runs[f"{arm}_s{seed}"]["train_wall_s"], 1)}), flush=True)

        # Held-out: every student and the teacher over the same windows.
        windows = heldout_windows(heldout_file, teacher.tokenizer, args.seq_len, args.heldout_tokens)
        any_store = open_store(next(iter(stores.values()))["url"])
        init = load_student(student, any_store.meta, seed=seeds[0]).model.to(device).eval()
        models = {"init": init}
        for key, run in runs.items():
            models[key] = AutoModelForCausalLM.from_pretrained(run["final"]).to(device).eval()
        eval_started = time.perf_counter()
        metrics = evaluate(teacher.model, models, windows, vocab, args.eval_batch, device)
        eval_s = time.perf_counter() - eval_started
        total_s = time.perf_counter() - started

    heldout_tokens = int(sum(len(w) for w in windows))
    fp16 = FP16_BYTES_PER_VALUE * vocab
    for key, run in runs.items():
        store_name, loss, _, what = ARMS[run["arm"]]
        bpt = stores[store_name]["bytes_per_token"] if loss == "kd" else None
        run.update(metrics[key], what=what, store=store_name if loss == "kd" else None, bytes_per_token=bpt,
                   fp16_full_over_store=fp16 / bpt if bpt else None)
        del run["final"]
        print(json.dumps({**common, "arm": run["arm"], "seed": run["seed"], "what": what,
                          "bytes_per_token": round(bpt, 1) if bpt else None,
                          **{k: round(run[k], 4) for k in ("heldout_ppl", "heldout_kl", "heldout_top1",
                                                           "heldout_accept")},
                          "train_wall_s": round(run["train_wall_s"], 1),
                          "train_tokens_per_s": round(run["train_tokens_per_s"], 1),
                          "final_train_loss": round(run["curve"][-1]["loss"], 4)}), flush=True)

    s0 = seeds[0]
    summary: dict = {**common, "summary": True, "seeds": seeds,
                     "train_tokens": next(iter(stores.values()))["tokens"], "heldout_tokens": heldout_tokens,
                     "budget_tokens": args.steps * args.batch_size * args.seq_len,
                     "teacher": metrics["teacher"], "init": metrics["init"], "eval_s": round(eval_s, 1),
                     "total_s": round(total_s, 1)}
    # Every other arm against CE and online, on the means over the seeds all three ran.
    for arm in sorted({a for a, _ in runs_to_do} - set(KEY_ARMS)):
        shared = [s for s in seeds if all(f"{a}_s{s}" in runs for a in ("ce", arm, "online"))]
        if not shared:
            continue
        for metric in ("heldout_kl", "heldout_ppl"):
            ce, kd, online = ({metric: float(np.mean([runs[f"{a}_s{s}"][metric] for s in shared]))}
                              for a in ("ce", arm, "online"))
            summary[f"recovery_{arm}_{metric}"] = recovery(ce, kd, online, metric)
    if all(f"{a}_s{s0}" in runs for a in KEY_ARMS):
        for metric in ("heldout_kl", "heldout_ppl", "heldout_top1", "heldout_accept"):
            per_seed = [recovery(runs[f"ce_s{s}"], runs[f"topk64_s{s}"], runs[f"online_s{s}"], metric)
                        for s in seeds if all(f"{a}_s{s}" in runs for a in KEY_ARMS)]
            summary[f"recovery_{metric}"] = per_seed[0]
            summary[f"recovery_{metric}_per_seed"] = per_seed
            means = {a: {metric: float(np.mean([runs[f"{a}_s{s}"][metric] for s in seeds if f"{a}_s{s}" in runs]))}
                     for a in KEY_ARMS}
            summary[f"recovery_{metric}_seed_mean"] = recovery(means["ce"], means["topk64"], means["online"], metric)
        for a in KEY_ARMS:
            for metric in ("heldout_kl", "heldout_ppl", "heldout_top1", "heldout_accept"):
                values = [runs[f"{a}_s{s}"][metric] for s in seeds if f"{a}_s{s}" in runs]
                summary[f"spread_{a}_{metric}"] = max(values) - min(values)
        bpt = stores["topk64"]["bytes_per_token"]
        summary.update(topk64_bytes_per_token=bpt, fp16_full_bytes_per_token=fp16, fp16_full_over_topk64=fp16 / bpt,
                       target_recovery_met=bool(summary["recovery_heldout_kl"] >= 0.9
                                                and summary["recovery_heldout_ppl"] >= 0.9),
                       target_bytes_met=bool(bpt <= fp16 / 500))
    print(json.dumps(summary), flush=True)

    title = (f"{preset} preset: {summary['train_tokens']} train tokens, {args.steps} steps x {args.batch_size} x "
             f"{args.seq_len}, lr {args.lr:g}, T={args.temperature:g}, alpha={args.alpha:g}; "
             f"held-out {heldout_tokens} tokens")
    results = {"args": vars(args), "title": title, "stores": stores, "runs": runs, "seeds": seeds,
               "init": metrics["init"], "teacher": metrics["teacher"], "summary": summary}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "quality.png")


if __name__ == "__main__":
    main()
