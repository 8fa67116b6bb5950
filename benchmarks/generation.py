"""Is generation capture worth it (issue 20)? KD on raw text against SFT and KD on the teacher's own
samples, judged on held-out prompts, plus `logitstore generate`'s throughput against HF `generate`.

    python benchmarks/generation.py --threads 1 --out results/generation       # CPU preset (no CUDA)
    python benchmarks/generation.py --gpu --out results/generation             # full preset (default with CUDA)

Measured: `python benchmarks/generation.py --threads 1 --out /tmp/genbench --work /tmp/genbench/work`
(the CPU preset) took 31.7 min of wall time on the shared 2-core box, another benchmark on the other
core: throughput 2.0 min, the three stores 12.9 min (train generation 6.8, held-out 1.3, text capture
4.8), training the four arms 12.4 min, evaluation 3.8 min (summary total_s 1897).

Steps, all in one process, one teacher object (SmolLM2-135M-Instruct by default):
1. Throughput: `logitstore generate` of the first `--throughput-prompts` train prompts (n=1, the
   same temperature, top-p and max_new_tokens), timed as the whole call (reading the prompts,
   sampling with the top-k reduction, writing and finalizing the store), against HF
   `model.generate` alone (do_sample, the same temperature, top-p, top_k=0, max_new_tokens and end
   tokens) on the same prompt tokens, left-padded in one batch of the same size (logitstore runs at
   batch_tokens = prompts x seq_len, so it holds them in one batch too; the CPU preset's 32 fit the
   default 8192 anyway). Tokens = generated tokens up to and including the end token. One warm-up of
   each first (4 prompts, 8 tokens), then `--throughput-repeats` rounds alternating the order
   (round 0: HF first). The ratio is logitstore / HF tokens/s of the medians over the rounds
   (target >= 0.9).
2. Stores: a top-k (k=`--k`, T=1 normalizer) `generate` store of the train prompts (`--n` samples
   each), one of the held-out prompts (`--heldout-n` samples, another seed), and a top-k `capture`
   of the first `--text-tokens` tokens of tinyshakespeare in sequences of `--seq-len`.
3. Train every arm with the same student config, fresh from the same seed, with the same steps,
   batch, sequence length, lr and schedule: kd_text (KD on the raw-text store), sft_gen (the
   generated store, alpha=1: CE on the completion tokens only), kd_gen (the generated store,
   alpha=0), and optionally kd_gen_a05 (alpha=0.5) and kd_gen_best (alpha=0, `--select best-of-n`).
   A generated sequence fits one training block (prompt + max_new_tokens <= seq_len), right-padded.
   "Loss tokens" are the positions with a loss the run saw (the loader's mask summed over its
   batches, repeats across epochs included), and "unique" those of the store (the sequences trained on).
4. Held-out prompts (topics absent from the train prompts), for the untrained student, every arm
   and the teacher:
   - KL along the teacher's samples: the exact full-vocabulary KL(teacher || student) at T=1,
     averaged over the positions that predict a completion token (the held-out store's loss mask),
     both models run over the whole sequence without a cache.
   - Exposure bias: each student samples `--student-samples` completions per held-out prompt
     (the same temperature, top-p and max_new_tokens, with a KV cache; the uniforms come from one
     generator seeded by `--seed`, so every student draws with the same random numbers), and the
     teacher scores them: its mean log-likelihood per completion token at T=1 (all completion
     tokens pooled; higher is better). The teacher's own held-out samples are the reference.
One JSON line per measurement, then a summary line; `--out` gets results.json (with one decoded
sample per model for the first held-out prompts).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from logitstore import open_store
from logitstore.capture.engine import capture
from logitstore.capture.generate import Prompt, generate, read_prompts, sample_token
from logitstore.capture.teacher import Teacher, load_teacher, resolve_device
from logitstore.reader import Store
from logitstore.schema import GenerationSettings
from logitstore.spec import CaptureSpec, CaptureTuning
from trainer.data import StoreDataset, best_of_n, make_loader
from trainer.student import load_student
from trainer.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
STUDENT = str(ROOT / "examples" / "student-llama-tiny.json")

# arm -> (store, alpha, select, what it is)
ARMS = {
    "kd_text": ("text", 0.0, "all", "top-k KD on raw text (tinyshakespeare)"),
    "sft_gen": ("gen", 1.0, "all", "SFT on the teacher's samples (CE on completion tokens)"),
    "kd_gen": ("gen", 0.0, "all", "top-k KD along the teacher's samples"),
    "kd_gen_a05": ("gen", 0.5, "all", "top-k KD + 0.5 CE along the teacher's samples"),
    "kd_gen_best": ("gen", 0.0, "best-of-n", "top-k KD along the best of n samples per prompt"),
}

# Sized for the shared 2-core CPU box (one core; ~35 min) and for one GPU.
PRESETS = {
    "cpu": dict(train_prompts=256, heldout_prompts=48, n=2, heldout_n=2, student_samples=1, max_new_tokens=64,
                text_tokens=65_536, steps=120, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=8,
                throughput_prompts=32, throughput_repeats=2, eval_batch=8, arms="kd_text,sft_gen,kd_gen,kd_gen_a05"),
    "gpu": dict(train_prompts=None, heldout_prompts=None, n=8, heldout_n=4, student_samples=4, max_new_tokens=128,
                text_tokens=None, steps=1000, batch_size=16, seq_len=256, lr=1e-3, warmup_steps=50,
                throughput_prompts=256, throughput_repeats=3, eval_batch=32, arms=",".join(ARMS)),
}


def take_rows(src: Path, count: int | None, dst: Path) -> Path:
    """The first `count` non-empty rows (all when None) of a JSON Lines file, copied to `dst`."""
    rows = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    if count is not None and count > len(rows):
        raise SystemExit(f"{src} has {len(rows)} rows, {count} asked for")
    dst.write_text("".join(r + "\n" for r in rows[:count]), encoding="utf-8")
    return dst


def end_ids(teacher: Teacher) -> list[int]:
    """What ends a completion, as `logitstore generate` decides it: the tokenizer's EOS and the
    generation config's."""
    ends = {teacher.tokenizer.eos_token_id}
    found = getattr(getattr(teacher.model, "generation_config", None), "eos_token_id", None)
    ends.update(found if isinstance(found, list) else [found])
    ends.discard(None)
    return sorted(ends)


def completion_length(tokens: np.ndarray, ends: list[int]) -> int:
    """Tokens up to and including the first end token (all of them when none)."""
    hit = np.flatnonzero(np.isin(tokens, ends))
    return int(hit[0]) + 1 if len(hit) else len(tokens)


def gen_spec(args, n: int, seed: int) -> CaptureSpec:
    settings = GenerationSettings(n=n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=seed)  # fmt: skip
    return CaptureSpec(mode="topk", k=args.k, temperatures=(1.0,), max_len=args.seq_len, generate=settings)


def left_padded(prompts: list[np.ndarray], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p) :] = torch.from_numpy(p.astype(np.int64))
        mask[r, longest - len(p) :] = 1
    return ids, mask


def time_logitstore(teacher: Teacher, prompts_file: Path, url: str, args, rows: int) -> dict:
    # batch_tokens: the `rows` prompts in one batch, as HF gets them (each fits seq_len with its completion).
    tuning = CaptureTuning(batch_tokens=max(CaptureTuning.batch_tokens, rows * args.seq_len))
    started = time.perf_counter()
    store = generate(teacher, [prompts_file], url, gen_spec(args, 1, args.seed), tuning=tuning)
    wall = time.perf_counter() - started
    samples = store.samples()
    tokens = int(samples.column("completion_tokens").to_numpy().sum())
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "rows": samples.num_rows, "longest": int(samples.column("completion_tokens").to_numpy().max())}


@torch.inference_mode()
def time_hf(teacher: Teacher, prompts: list[Prompt], args, device: torch.device, max_new_tokens: int) -> dict:
    ends = end_ids(teacher)
    pad = teacher.tokenizer.pad_token_id if teacher.tokenizer.pad_token_id is not None else ends[0]
    config = GenerationConfig(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                              max_new_tokens=max_new_tokens, eos_token_id=ends, pad_token_id=pad,
                              bos_token_id=teacher.tokenizer.bos_token_id)  # fmt: skip
    started = time.perf_counter()
    ids, mask = left_padded([p.ids for p in prompts], pad)
    out = teacher.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    new = out[:, ids.shape[1] :].cpu().numpy()
    tokens = sum(completion_length(row, ends) for row in new)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "rows": len(prompts),
            "longest": int(new.shape[1])}


def throughput(teacher: Teacher, train_file: Path, args, work: Path, device: torch.device, common: dict) -> dict:
    """logitstore generate against HF generate on the same prompts (the module docstring, step 1)."""
    tp_file = take_rows(train_file, args.throughput_prompts, work / "prompts-throughput.jsonl")
    warm_file = take_rows(train_file, 4, work / "prompts-warmup.jsonl")
    prompts = read_prompts([tp_file], teacher.tokenizer, max_prompt_tokens=args.seq_len - args.max_new_tokens)
    warm = read_prompts([warm_file], teacher.tokenizer, max_prompt_tokens=args.seq_len - args.max_new_tokens)
    short = argparse.Namespace(**{**vars(args), "max_new_tokens": 8})
    time_logitstore(teacher, warm_file, str(work / "tp" / "warm"), short, len(warm))
    time_hf(teacher, warm, args, device, 8)
    runs: dict[str, list[dict]] = {"hf": [], "logitstore": []}
    for r in range(args.throughput_repeats):
        for who in ("hf", "logitstore") if r % 2 == 0 else ("logitstore", "hf"):
            torch.manual_seed(args.seed + r)
            if who == "hf":
                result = time_hf(teacher, prompts, args, device, args.max_new_tokens)
            else:
                result = time_logitstore(teacher, tp_file, str(work / "tp" / f"r{r}"), args, len(prompts))
            runs[who].append(result)
            print(json.dumps({**common, "throughput": who, "round": r, **{k: round(v, 3) if isinstance(v, float)
                              else v for k, v in result.items()}}), flush=True)  # fmt: skip
    med = {who: statistics.median(x["tokens_per_s"] for x in rs) for who, rs in runs.items()}
    return {"runs": runs, "prompts": len(prompts), "first": "hf (round 0), alternating",
            "logitstore_tokens_per_s": med["logitstore"], "hf_tokens_per_s": med["hf"],
            "ratio": med["logitstore"] / med["hf"]}


def loss_tokens(url: str, select: str, args) -> dict:
    """Positions with a loss the run sees (its loader's mask over `steps` batches) and the store's."""
    store = open_store(url)
    sequences = best_of_n(store) if select == "best-of-n" else None
    dataset = StoreDataset(url, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, sequences=sequences)
    seen = 0
    for _, batch in zip(range(args.steps), make_loader(dataset), strict=False):
        seen += int(batch["mask"].sum())
    kept = np.arange(store.num_sequences) if sequences is None else sequences
    unique = 0
    for i in kept.tolist():
        block = store.sequence(int(i))
        unique += int(block.loss_mask.sum()) if block.loss_mask is not None else len(block)
    return {"loss_tokens_seen": seen, "loss_tokens_unique": unique, "sequences": len(kept),
            "epochs": args.steps * args.batch_size / dataset.blocks_per_epoch}


def train_arm(url: str, alpha: float, select: str, args, out: Path) -> dict:
    cfg = TrainConfig(store=url, student=args.student, out=str(out), loss="kd", alpha=alpha, select=select,
                      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup_steps=args.warmup_steps, seed=args.seed, log_every=max(1, args.steps // 10),
                      save_every=0, device=args.device)  # fmt: skip
    started = time.perf_counter()
    final = train(cfg, progress=False)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    return {"final": str(final), "train_wall_s": wall,
            "curve": [{k: r[k] for k in ("step", "loss", "kd_loss", "ce_loss")} for r in steps]}


def _batches(n: int, size: int):
    for a in range(0, n, size):
        yield range(a, min(n, a + size))


def _right_padded(seqs: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), longest), dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.from_numpy(s.astype(np.int64))
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _logp_at(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, vocab: int,
             device: torch.device) -> torch.Tensor:  # fmt: skip
    """fp32 log-softmax of `model`'s logits at the positions `rows` (bool [B, L]) only: the decoder
    over the whole batch, the output projection at those rows."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        z = model.get_output_embeddings()(hidden[rows])
    return z[:, :vocab].float().log_softmax(-1)


@torch.inference_mode()
def kl_along_teacher_samples(teacher: torch.nn.Module, students: dict[str, torch.nn.Module], store: Store,
                             vocab: int, batch: int, device: torch.device) -> tuple[dict, dict]:  # fmt: skip
    """Exact KL(teacher || student) at T=1 over the positions that predict a completion token of the
    held-out store's samples (per model), and the teacher's log-likelihood of its own samples."""
    sums = {name: 0.0 for name in students}
    positions, teacher_ll = 0, 0.0
    for chunk in _batches(store.num_sequences, batch):
        blocks = [store.sequence(i) for i in chunk]
        ids, mask = _right_padded([b.input_ids for b in blocks], device)
        rows = torch.zeros(ids.shape, dtype=torch.bool)
        for r, b in enumerate(blocks):
            rows[r, : len(b)] = torch.from_numpy(b.loss_mask)
        rows = rows.to(device)
        targets = ids[:, 1:][rows[:, :-1]]  # the completion tokens, in the same order as the rows
        t_logp = _logp_at(teacher, ids, mask, rows, vocab, device)
        teacher_ll += t_logp.gather(1, targets[:, None]).double().sum().item()
        positions += int(rows.sum())
        p = t_logp.exp()
        for name, model in students.items():
            s_logp = _logp_at(model, ids, mask, rows, vocab, device)
            sums[name] += (p * (t_logp - s_logp)).sum().double().item()
    return ({name: s / positions for name, s in sums.items()},
            {"teacher_logprob_per_token": teacher_ll / positions, "completion_tokens": positions})


@torch.inference_mode()
def sample_completions(model: torch.nn.Module, prompts: list[np.ndarray], uniforms: torch.Tensor, ends: list[int],
                       args, vocab: int, device: torch.device, batch: int = 64) -> list[np.ndarray]:  # fmt: skip
    """One completion per row of `prompts` from `model` with a KV cache, row r's step s drawn with
    `uniforms[r, s]` by `sample_token` (temperature, top-p); each ends at an end token, included."""
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    end = torch.tensor(ends, device=device)
    out: list[np.ndarray] = []
    for chunk in _batches(len(prompts), batch):
        ids, mask = left_padded([prompts[r] for r in chunk], ends[0])
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        u = uniforms[chunk.start : chunk.stop].to(device)
        res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        nxt = positions[:, -1:] + 1
        tokens, alive = [], torch.ones(len(chunk), dtype=torch.bool, device=device)
        for step in range(args.max_new_tokens):
            token = sample_token(res.logits[:, -1, :vocab].float(), args.temperature, args.top_p, u[:, step])
            tokens.append(token)
            alive &= ~torch.isin(token, end)
            if not alive.any():
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            res = model(input_ids=token[:, None], attention_mask=mask, position_ids=nxt, use_cache=True,
                        logits_to_keep=1, **{cache_name: getattr(res, cache_name)})  # fmt: skip
            nxt = nxt + 1
        sampled = torch.stack(tokens, dim=1).cpu().numpy()
        out.extend(row[: completion_length(row, ends)].astype(np.int32) for row in sampled)
    return out


@torch.inference_mode()
def teacher_loglik(teacher: torch.nn.Module, prompts: list[np.ndarray], completions: list[np.ndarray], vocab: int,
                   batch: int, device: torch.device) -> float:  # fmt: skip
    """The teacher's log-likelihood at T=1 per completion token, all completions pooled."""
    total, count = 0.0, 0
    for chunk in _batches(len(prompts), batch):
        seqs = [np.concatenate([prompts[r], completions[r]]) for r in chunk]
        ids, mask = _right_padded(seqs, device)
        rows = torch.zeros(ids.shape, dtype=torch.bool)
        for j, r in enumerate(chunk):  # position t predicts token t + 1
            rows[j, len(prompts[r]) - 1 : len(seqs[j]) - 1] = True
        rows = rows.to(device)
        logp = _logp_at(teacher, ids, mask, rows, vocab, device)
        targets = ids[:, 1:][rows[:, :-1]]
        total += logp.gather(1, targets[:, None]).double().sum().item()
        count += int(rows.sum())
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the full-size preset (default when CUDA is available)")
    p.add_argument("--cpu", action="store_true", help="the reduced CPU preset (default without CUDA)")
    p.add_argument("--out", required=True, help="results.json goes here")
    p.add_argument("--work", help="stores and runs (default: a temporary directory, deleted at the end)")
    p.add_argument("--teacher", default="smollm2-135m")
    p.add_argument("--student", default=STUDENT, help="student config or model path")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--prompts", default=str(DATA / "prompts.jsonl"))
    p.add_argument("--heldout", default=str(DATA / "prompts-heldout.jsonl"))
    p.add_argument("--corpus", default=str(DATA / "tinyshakespeare.txt"), help="the raw text of the kd_text arm")
    p.add_argument("--train-prompts", type=int, help="first rows of --prompts used (default: preset; gpu: all)")
    p.add_argument("--heldout-prompts", type=int, help="first rows of --heldout used (default: preset; gpu: all)")
    p.add_argument("--n", type=int, help="teacher samples per train prompt")
    p.add_argument("--heldout-n", type=int, help="teacher samples per held-out prompt (the KL's sequences)")
    p.add_argument("--student-samples", type=int, help="student samples per held-out prompt")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--text-tokens", type=int, help="corpus tokens of the kd_text store (default: preset; "
                   "gpu: steps x batch x seq_len)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--seed", type=int, default=0, help="the student's init and data order, the train samples' "
                   "seed (held-out: seed + 1), the student samples' uniforms")
    p.add_argument("--throughput-prompts", type=int)
    p.add_argument("--throughput-repeats", type=int)
    p.add_argument("--eval-batch", type=int)
    p.add_argument("--arms", help=f"subset of {','.join(ARMS)} (default: preset)")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preset = "gpu" if args.gpu or (device.type == "cuda" and not args.cpu) else "cpu"
    for key, value in PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.text_tokens is None:
        args.text_tokens = args.steps * args.batch_size * args.seq_len
    args.device = str(device)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {list(ARMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"bench": "generation", "preset": preset, "device": str(device), "threads": torch.get_num_threads()}

    with nullcontext(args.work) if args.work else tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        teacher = load_teacher(args.teacher, device=device)
        vocab = teacher.tokenizer_info.vocab_size
        train_file = take_rows(Path(args.prompts), args.train_prompts, work / "prompts-train.jsonl")
        heldout_file = take_rows(Path(args.heldout), args.heldout_prompts, work / "prompts-heldout.jsonl")
        phases: dict[str, float] = {}

        t0 = time.perf_counter()
        speed = throughput(teacher, train_file, args, work, device, common)
        phases["throughput_s"] = time.perf_counter() - t0
        print(json.dumps({**common, "throughput_ratio": round(speed["ratio"], 3),
                          "logitstore_tokens_per_s": round(speed["logitstore_tokens_per_s"], 1),
                          "hf_tokens_per_s": round(speed["hf_tokens_per_s"], 1)}), flush=True)

        stores: dict[str, dict] = {}
        needs = {ARMS[a][0] for a in arms}
        jobs = [("gen", lambda url: generate(teacher, [train_file], url, gen_spec(args, args.n, args.seed))),
                ("heldout", lambda url: generate(teacher, [heldout_file], url,
                                                 gen_spec(args, args.heldout_n, args.seed + 1)))]
        if "text" in needs:
            spec = CaptureSpec(mode="topk", k=args.k, temperatures=(1.0,), max_len=args.seq_len,
                               max_tokens=args.text_tokens)
            jobs.append(("text", lambda url: capture(teacher, [args.corpus], url, spec)))
        for name, job in jobs:
            url = str(work / "stores" / name)
            t0 = time.perf_counter()
            store = job(url)
            wall = time.perf_counter() - t0
            info = {"url": url, "tokens": store.num_tokens, "sequences": store.num_sequences, "wall_s": wall}
            if store.meta.capture.generate is not None:
                s = store.samples()
                c = s.column("completion_tokens").to_numpy()
                info.update(completion_tokens=int(c.sum()), generated_tokens_per_s=float(c.sum() / wall),
                            eos_fraction=float(np.mean(s.column("finish_reason").to_numpy(zero_copy_only=False)
                                                       == "eos")),
                            mean_completion_tokens=float(c.mean()))  # fmt: skip
            stores[name] = info
            print(json.dumps({**common, "store": name, **{k: round(v, 3) if isinstance(v, float) else v
                                                          for k, v in info.items() if k != "url"}}), flush=True)
        longest = max(store_len for store_len in open_store(stores["gen"]["url"]).sequence_lengths().tolist())
        if longest > args.seq_len:  # cannot happen: max_len = seq_len
            raise SystemExit(f"a generated sequence of {longest} tokens is longer than --seq-len {args.seq_len}")

        runs: dict[str, dict] = {}
        for arm in arms:
            store_name, alpha, select, what = ARMS[arm]
            url = stores[store_name]["url"]
            run = train_arm(url, alpha, select, args, work / "runs" / arm)
            run.update(loss_tokens(url, select, args), arm=arm, what=what, alpha=alpha, select=select,
                       store=store_name)
            runs[arm] = run
            print(json.dumps({**common, "trained": arm, "train_wall_s": round(run["train_wall_s"], 1),
                              "loss_tokens_seen": run["loss_tokens_seen"],
                              "loss_tokens_unique": run["loss_tokens_unique"], "epochs": round(run["epochs"], 2),
                              "final_train_loss": round(run["curve"][-1]["loss"], 4)}), flush=True)

        # Held-out: every student (the untrained one first) and the teacher.
        t0 = time.perf_counter()
        heldout = open_store(stores["heldout"]["url"])
        init = load_student(args.student, heldout.meta, seed=args.seed).model.to(device).eval()
        models = {"init": init}
        for arm, run in runs.items():
            models[arm] = AutoModelForCausalLM.from_pretrained(run["final"]).to(device).eval()
        kl, teacher_ref = kl_along_teacher_samples(teacher.model, models, heldout, vocab, args.eval_batch, device)
        phases["eval_kl_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ends = end_ids(teacher)
        prompts = read_prompts([heldout_file], teacher.tokenizer, max_prompt_tokens=args.seq_len - args.max_new_tokens)
        rows = [p.ids for p in prompts for _ in range(args.student_samples)]
        uniforms = torch.rand((len(rows), args.max_new_tokens), generator=torch.Generator().manual_seed(args.seed))
        exposure: dict[str, dict] = {}
        examples: dict[str, list[str]] = {}
        for name, model in models.items():
            completions = sample_completions(model, rows, uniforms, ends, args, vocab, device)
            lengths = np.array([len(c) for c in completions])
            exposure[name] = {
                "teacher_logprob_per_token": teacher_loglik(teacher.model, rows, completions, vocab, args.eval_batch,
                                                            device),
                "mean_completion_tokens": float(lengths.mean()),
                "eos_fraction": float(np.mean([len(c) > 0 and int(c[-1]) in ends for c in completions])),
            }  # fmt: skip
            examples[name] = [teacher.tokenizer.decode(c) for c in completions[: 3 * args.student_samples]]
        # The teacher's own held-out samples, scored the same way (the reference).
        samples = heldout.samples()
        prompt_tokens = dict(zip(samples.column("sequence").to_pylist(), samples.column("prompt_tokens").to_pylist(),
                                 strict=True))  # fmt: skip
        stored_ll = float(samples.column("teacher_logprob").to_numpy().sum()
                          / samples.column("completion_tokens").to_numpy().sum())
        t_rows, t_completions = [], []
        for i in range(heldout.num_sequences):
            ids = heldout.sequence(i).input_ids
            n_p = prompt_tokens[i]
            t_rows.append(ids[:n_p])
            t_completions.append(ids[n_p:])
        exposure["teacher"] = {
            "teacher_logprob_per_token": teacher_loglik(teacher.model, t_rows, t_completions, vocab, args.eval_batch,
                                                        device),
            "mean_completion_tokens": float(np.mean([len(c) for c in t_completions])),
            "eos_fraction": stores["heldout"]["eos_fraction"],
        }  # fmt: skip
        first = t_completions[: 3 * args.heldout_n : args.heldout_n]  # the first sample of the first prompts
        examples["teacher"] = [teacher.tokenizer.decode(c) for c in first]
        phases["eval_samples_s"] = time.perf_counter() - t0
        total_s = time.perf_counter() - started

    for name in models:
        line = {**common, "model": name, "heldout_kl": round(kl[name], 4),
                **{f"student_samples_{k}": round(v, 4) for k, v in exposure[name].items()}}
        if name in runs:
            run = runs[name]
            run.update(heldout_kl=kl[name], exposure=exposure[name])
            line.update(what=run["what"], loss_tokens_seen=run["loss_tokens_seen"],
                        loss_tokens_unique=run["loss_tokens_unique"], train_wall_s=round(run["train_wall_s"], 1))
        print(json.dumps(line), flush=True)
    print(json.dumps({**common, "model": "teacher", "heldout_kl": 0.0,
                      **{f"own_samples_{k}": round(v, 4) for k, v in exposure["teacher"].items()},
                      "kl_pass_logprob_per_token": round(teacher_ref["teacher_logprob_per_token"], 4),
                      "stored_logprob_per_token": round(stored_ll, 4)}), flush=True)

    summary = {
        **common, "summary": True, "seed": args.seed,
        "budget_tokens": args.steps * args.batch_size * args.seq_len,
        "heldout_completion_tokens": teacher_ref["completion_tokens"],
        "heldout_kl": {name: kl[name] for name in models},
        "teacher_logprob_per_token_of_samples": {name: e["teacher_logprob_per_token"] for name, e in exposure.items()},
        "loss_tokens_seen": {arm: r["loss_tokens_seen"] for arm, r in runs.items()},
        "loss_tokens_unique": {arm: r["loss_tokens_unique"] for arm, r in runs.items()},
        "throughput_ratio": speed["ratio"], "logitstore_tokens_per_s": speed["logitstore_tokens_per_s"],
        "hf_tokens_per_s": speed["hf_tokens_per_s"], "throughput_target_met": bool(speed["ratio"] >= 0.9),
        "store_s": {name: round(s["wall_s"], 1) for name, s in stores.items()},
        **{k: round(v, 1) for k, v in phases.items()}, "total_s": round(total_s, 1),
    }  # fmt: skip
    print(json.dumps(summary), flush=True)
    for run in runs.values():
        del run["final"]
    results = {"args": vars(args), "stores": {n: {k: v for k, v in s.items() if k != "url"} for n, s in stores.items()},
               "throughput": speed, "runs": runs, "heldout_kl": kl, "exposure": exposure, "examples": examples,
               "summary": summary}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
