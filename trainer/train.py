"""The training loop: a store's soft labels → a student, with checkpoints, resume, eval and DDP.

One step = `grad_accum` micro-batches of `batch_size` blocks of `seq_len` tokens on every
rank. The loss per micro-batch is

    loss = alpha * CE(student, next token) + (1 - alpha) * T^2 * D(teacher_T || student_T)

against the store's sparse target (`trainer.losses.targets`): the K+1 buckets of a top-k store, or the
unbiased estimator on a sampled store's draws, or plain CE with `loss="ce"` (the baseline every
KD run should beat). The teacher at the training temperature T is rebuilt on the device from
the stored T=1 log-probs and the full-vocabulary normalizers, so T is any temperature the store
captured. The loss runs from the student's final hidden states (`kd_loss_from_hidden`: the
fused kernel on CUDA, the torch reference on CPU, both in row chunks), so the batch's [N, V]
logits never exist; `materialize_logits` keeps the old path for comparison. For comparisons
(`benchmarks/quality.py`), the same loop runs the losses others use (`trainer.losses.baselines`):
top-k renormalized without the tail (`topk_renormalize`), and online KD with the teacher in the
loop over the full vocabulary (`loss="online"`, the store gives only the tokens).

Run with `torchrun --nproc-per-node G -m trainer ...` for DDP: each rank reads its own share
of the store (no overlap), gradients are averaged, rank 0 logs, evaluates and saves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from logitstore.capture.document_attention import check_document_attention
from logitstore.capture.teacher import load_teacher, resolve_device
from logitstore.errors import LogitStoreError
from logitstore.reader import Store, open_store
from logitstore.schema import StoreMeta
from trainer.checkpoint import (
    checkpoint_dir,
    checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from trainer.config import TrainConfig
from trainer.data import StoreDataset, best_of_n, make_loader
from trainer.evaluate import eval_store, eval_text
from trainer.losses.baselines import full_vocab_kl, renormalized_topk_kl
from trainer.losses.config import LossConfig
from trainer.losses.from_hidden import kd_loss_from_hidden
from trainer.losses.kd_loss import kd_loss
from trainer.losses.sparse_target import SparseTarget
from trainer.losses.targets import StoreTarget
from trainer.report import RunRecords
from trainer.student import load_student

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at a step boundary, after writing `checkpoint` for `--resume`."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"interrupted; checkpoint {checkpoint} written")
        self.checkpoint = checkpoint


class _Interrupt:
    """Ctrl-C (SIGINT) during the loop: finish the step, write a checkpoint, then stop.

    Stopping at a step boundary makes the checkpoint exact (whole optimizer steps, the data
    position and RNG states of that boundary), so `--resume` continues as if uninterrupted. A
    second Ctrl-C stops at once. The handler is installed only over Python's default one: not
    where the caller handles or ignores SIGINT (a background job), nor off the main thread.
    """

    def __init__(self) -> None:
        self.flag = False
        self.installed = False

    def install(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):  # fmt: skip
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.installed = False

    def _handle(self, signum: int, frame: object) -> None:
        self.flag = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # os.write, not logging or print: the handler may run in the middle of a write to stderr
        # (the progress bar), where a buffered write raises "reentrant call".
        os.write(2, b"\nlogitstore-train: interrupted: a checkpoint is written after this step "
                    b"(Ctrl-C again to stop at once)\n")

    def requested(self, world: int, device: torch.device) -> bool:
        """Whether to stop now. Under DDP (torchrun forwards SIGINT to every rank) the ranks may see
        the signal at different steps: they agree, so that all of them checkpoint and stop together."""
        if world == 1:
            return self.flag
        flag = torch.tensor(float(self.flag), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, *, progress: bool = True) -> Path:
    """Run (or resume) training; returns `OUT/final`, a directory `from_pretrained` loads."""
    cfg.check()
    # A --save-every past the end (the default 500 in a 200-step run) means a checkpoint at the
    # end only; record the value the run follows.
    cfg = replace(cfg, save_every=min(cfg.save_every, cfg.steps))
    rank, world, device = _setup_distributed(cfg.device)
    out = Path(cfg.out)
    try:
        return _train(cfg, cfg.loss_config(), out, rank, world, device, progress)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, loss_config: LossConfig, out: Path, rank: int, world: int, device: torch.device, progress: bool
) -> Path:
    found = checkpoints(out)
    # Before anything is loaded or written: a --resume with nothing to resume would start afresh
    # and truncate metrics.jsonl, and a run without --resume would mix with an earlier one.
    if cfg.resume and not found:
        raise LogitStoreError(f"--resume: {out} has no checkpoint to continue from; run without --resume to start")
    if found and not cfg.resume:
        raise LogitStoreError(f"{out} has checkpoints of an earlier run: pass --resume to continue it or a new --out")
    sequences = None
    if cfg.select == "best-of-n":
        sequences = best_of_n(open_store(cfg.store, token=cfg.token, storage_options=cfg.storage_options or None))
    datasets = [StoreDataset(
        url, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
        token=cfg.token, storage_options=cfg.storage_options or None, rank=rank, world_size=world,
        sequences=sequences,
    ) for url in (cfg.store, *cfg.extra_stores)]  # fmt: skip
    dataset = datasets[0]
    for url, other in zip(cfg.extra_stores, datasets[1:], strict=True):
        _check_same_blocks(dataset, cfg.store, other, url)
    meta = dataset.meta
    # Online KD computes the teacher at any temperature; the store's lse is not needed then.
    store_target = StoreTarget.of(meta, 1.0 if cfg.loss == "online" else cfg.temperature, cfg.store)
    more_targets = [StoreTarget.of(d.meta, cfg.temperature, url)
                    for url, d in zip(cfg.extra_stores, datasets[1:], strict=True)]  # fmt: skip
    for url, t in ((cfg.store, store_target), *zip(cfg.extra_stores, more_targets, strict=True)):
        if t.draws is not None and cfg.loss == "kd" and (cfg.divergence != "fkl" or cfg.topk_renormalize):
            raise LogitStoreError(f"{url} is a sampled-mode store: its draws estimate the forward KL only "
                                  "(--divergence fkl, without --topk-renormalize)")
    student = load_student(cfg.student, meta, tokenizer=cfg.tokenizer, seed=cfg.seed)
    model, vocab = student.model.to(device), student.vocab_size
    _check_positions(model, cfg.seq_len)
    teacher = _online_teacher(cfg, meta, device) if cfg.loss == "online" else None
    if meta.capture.packing == "packed-documents":  # each document must attend only to itself
        for role, m in (("student", model), ("online teacher", teacher)):
            if m is not None:
                check_document_attention(m, role)
    targets = Targets(vocab, store_target, device, teacher, more_targets, cfg.weights())
    if cfg.grad_checkpointing:  # before sharding: the checkpoint wrappers sit inside the FSDP units
        enable_grad_checkpointing(model)
    if cfg.fsdp:
        _fully_shard(model, device)

    optimizer = _optimizer(model, cfg, device)
    warmup = min(cfg.warmup_steps, cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, cfg.steps, cfg.min_lr_ratio)
    )
    # One loader per store, in lockstep: the stores' blocks are the same (checked above).
    loaders = [make_loader(d, num_workers=cfg.num_workers, pin_memory=device.type == "cuda") for d in datasets]
    loader = loaders[0]

    step = 0
    if cfg.resume and cfg.fsdp != (found[-1] / "sharded").is_dir():
        raise LogitStoreError(f"--resume: {found[-1]} was written {'without' if cfg.fsdp else 'with'} --fsdp; "
                              "resume it the same way")  # fmt: skip
    if cfg.resume and cfg.fsdp:
        state = load_sharded_checkpoint(found[-1], model, optimizer)
    elif cfg.resume:
        state = load_checkpoint(found[-1], model)
        optimizer.load_state_dict(state["optimizer"])
    if cfg.resume:
        scheduler.load_state_dict(state["scheduler"])
        for each in loaders:
            each.load_state_dict(state["data"][rank])
        step = state["step"]
        log.info("resumed from %s", found[-1])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "token": None}, indent=2) + "\n")
        _truncate_metrics(out / "metrics.jsonl", step)  # a fresh start (step 0) must not append to old records

    # From hidden states, DDP wraps the body (ids -> final hidden states): its forward must run
    # through DDP for the gradients to be averaged; lm_head's weight gets its gradient from the loss.
    from_hidden = cfg.loss == "kd" and not cfg.topk_renormalize and not cfg.materialize_logits
    body = HiddenStates(model) if from_hidden else model
    ddp = DistributedDataParallel(body) if world > 1 and not cfg.fsdp else None  # FSDP hooks the model itself
    eval_stores = _open_eval_store(cfg)
    metrics = RunRecords(out, cfg.report_to, step) if rank == 0 else None  # closed below
    bar = _progress_bar(cfg.steps, step, enabled=progress and rank == 0)
    batches = [iter(each) for each in loaders]
    window_tokens, window_start = 0, time.perf_counter()
    started_at = step
    interrupt = _Interrupt()
    try:
        interrupt.install()
        while step < cfg.steps:
            model.train()
            sums = torch.zeros(3, device=device)  # loss, kd, ce summed over micro-batches
            for micro in range(cfg.grad_accum):
                batch, *more = (next(each) for each in batches)
                sync = ddp is None or micro == cfg.grad_accum - 1
                with nullcontext() if sync else ddp.no_sync():
                    loss, kd, ce = _micro_step(model, ddp or body, batch, cfg, loss_config, targets, more,
                                               measure=(step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps)
                    (loss / cfg.grad_accum).backward()
                sums += torch.stack([loss.detach(), kd, ce]) / cfg.grad_accum
                window_tokens += int(batch["mask"].sum()) * world
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                if world > 1:
                    dist.all_reduce(sums)
                    sums /= world
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": sums[0].item(), "kd_loss": sums[1].item(), "ce_loss": sums[2].item(),
                          "lr": lr, "tokens_per_s": window_tokens / elapsed if elapsed > 0 else 0.0}
                window_tokens, window_start = 0, time.perf_counter()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                _write(metrics, record)
            stopping = interrupt.requested(world, device) and step < cfg.steps  # the last step ends anyway
            # The checkpoint before the evaluation: an evaluation that fails must not lose it.
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping:
                data_states = [None] * world
                if world > 1:
                    dist.all_gather_object(data_states, loader.state_dict())
                else:
                    data_states = [loader.state_dict()]
                state = {"scheduler": scheduler.state_dict(), "data": data_states,
                         "config": asdict(cfg) | {"token": None}}
                if cfg.fsdp:  # every rank writes its shards
                    save_sharded_checkpoint(out, step, model, optimizer, state)
                elif rank == 0:
                    save_checkpoint(out, step, model, {**state, "optimizer": optimizer.state_dict()})
            if stopping:
                raise TrainingInterrupted(checkpoint_dir(out, step))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                # A sharded model's forward is collective: every rank evaluates, rank 0 writes.
                if (rank == 0 or cfg.fsdp) and (cfg.eval_text or eval_stores):
                    _write(metrics, {"step": step, **_evaluate(model, student.tokenizer, vocab, cfg, eval_stores)})
                window_start = time.perf_counter()  # eval time is not training throughput
        interrupt.remove()  # from here on Ctrl-C stops at once
        # final/ before the last evaluation: an evaluation that fails must not lose the trained student.
        full_state = _full_state_dict(model) if cfg.fsdp else None  # gathered by every rank, kept by rank 0
        if rank == 0:
            model.save_pretrained(out / "final", state_dict=full_state)
            student.tokenizer.save_pretrained(out / "final")
        if (rank == 0 or cfg.fsdp) and started_at < cfg.steps and (cfg.eval_text or eval_stores):
            _write(metrics, {"step": step, **_evaluate(model, student.tokenizer, vocab, cfg, eval_stores)})
    finally:
        interrupt.remove()
        bar.close()
        if metrics is not None:
            metrics.close()
    return out / "final"


@dataclass
class Targets:
    """What turns a batch into the teacher's side of the loss."""

    vocab: int  # student output columns that are tokens (the store's vocab_size)
    store: StoreTarget  # a batch -> the sparse target at the training temperature
    device: torch.device
    teacher: torch.nn.Module | None = None  # loss "online": the teacher in the loop
    more: list[StoreTarget] = field(default_factory=list)  # the extra stores' teachers, in --store order
    weights: list[float] = field(default_factory=lambda: [1.0])  # each teacher's, the store's first


class HiddenStates(torch.nn.Module):
    """A causal LM run for its final hidden states (after the last norm), without logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return final_hidden_states(self.model, self.model, input_ids=input_ids, **kwargs)


def final_hidden_states(runner: torch.nn.Module, model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    """The decoder's last hidden states [B, L, H] of `model`, run through `runner` (the model, or
    the DDP / FSDP / DeepSpeed wrapper around it) with the logits of no position computed.

    Through the whole model, not its decoder alone: FSDP gathers the root's parameters (the
    embedding, the last norm, the head) in the root's forward, and wrappers hook their forward.
    A forward hook on the decoder catches its output."""
    captured: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        device = inputs["input_ids"].device
        runner(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        hook.remove()
    return captured[0]


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor | bool]:
    """The student's forward arguments for a store batch: no KV cache (training keeps nothing for
    later tokens). A packed-documents store adds position ids (and no attention mask), so that
    each document attends only to itself, as the teacher's did (logitstore/capture/document_attention.py)."""
    inputs: dict[str, torch.Tensor | bool] = {"input_ids": batch["input_ids"].to(device, non_blocking=True).long(),
                                              "use_cache": False}  # fmt: skip
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"].to(device, non_blocking=True).long()
    return inputs


def kd_loss_from_hidden_states(
    hidden: torch.Tensor, model: torch.nn.Module, target: SparseTarget, loss_config: LossConfig, vocab: int, *,
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, kd, ce) of the fused loss on the student's final hidden states [B, L, H] and its output
    projection's first `vocab` rows (padded rows are not tokens); on CUDA in bfloat16, what
    autocast would have run the head in."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight = model.get_output_embeddings().weight[:vocab]
    if hidden.is_cuda:
        hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    return kd_loss_from_hidden(hidden, weight.to(hidden.dtype), target, loss_config, labels=labels,
                               return_parts=True)  # fmt: skip


def _micro_step(
    model: torch.nn.Module, runner: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig,
    loss_config: LossConfig, targets: Targets, more: list[dict[str, torch.Tensor]], *, measure: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss to backpropagate, kd part, ce part) of one micro-batch. `runner` is what the forward
    goes through (the DDP wrapper, or the model / its body); `more` are the extra stores' batches
    of the same blocks. The part that is not in the loss is computed only when `measure` (a
    logging step); it is NaN otherwise. Nothing is read back to the host."""
    device = targets.device
    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device, non_blocking=True).reshape(-1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if cfg.loss == "kd" and not cfg.topk_renormalize:
        target = targets.store(batch, device)
        kw = dict(labels=labels if cfg.alpha > 0 or measure else None, return_parts=True)
        if cfg.materialize_logits:
            with autocast:
                logits = runner(**inputs).logits
            z = logits.reshape(-1, logits.shape[-1])[:, : targets.vocab]  # padded output columns are not tokens
            # inplace_grad: the kernel writes dL/dz into the logits buffer (nothing else needs the
            # logits for backward: the head's backward uses its input and weight).
            return kd_loss(z, target, loss_config, inplace_grad=z.is_cuda, **kw)
        with autocast:
            hidden = runner(**inputs)
        # Several teachers: sum_i w_i ((1 - alpha) T^2 D(p_i || q) + alpha CE) = (1 - alpha) sum_i w_i
        # T^2 D(p_i || q) + alpha CE, the weights summing to 1; the hidden states are computed once,
        # the head's GEMM once per teacher (each fused call walks the rows in chunks).
        parts = [kd_loss_from_hidden_states(hidden, model, t, loss_config, targets.vocab, labels=kw["labels"])
                 for t in (target, *(s(b, device) for s, b in zip(targets.more, more, strict=True)))]  # fmt: skip
        if len(parts) == 1:
            return parts[0]
        loss, kd = (sum(w * p[i] for w, p in zip(targets.weights, parts, strict=True)) for i in (0, 1))
        return loss, kd, parts[0][2]

    with autocast:
        logits = runner(**inputs).logits
    z = logits.reshape(-1, logits.shape[-1])[:, : targets.vocab]  # padded output columns are not tokens
    nan = torch.full((), float("nan"), device=device)
    if cfg.loss == "ce":
        ce = F.cross_entropy(z.float(), labels, ignore_index=-100)
        kd = _stored_kd(z.detach(), batch, cfg, loss_config, targets) if measure else nan
        return ce, kd, ce.detach()

    # The renormalized top-k and online KD: plain torch losses (baselines), CE mixed in here.
    kd = _torch_kd(z, inputs, batch, cfg, targets)
    if cfg.alpha > 0:
        ce = F.cross_entropy(z.float(), labels, ignore_index=-100)
        return (1 - cfg.alpha) * kd + cfg.alpha * ce, kd.detach(), ce.detach()
    ce = F.cross_entropy(z.detach().float(), labels, ignore_index=-100) if measure else nan
    return kd, kd.detach(), ce


def _torch_kd(z: torch.Tensor, inputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], cfg: TrainConfig,
              targets: Targets) -> torch.Tensor:
    device = targets.device
    mask = batch["mask"].to(device, non_blocking=True).reshape(-1)
    if cfg.loss == "online":
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            teacher_logits = targets.teacher(**inputs).logits
        teacher_z = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, : targets.vocab]
        return full_vocab_kl(z, teacher_z, mask, cfg.temperature)
    target = targets.store(batch, device)
    return renormalized_topk_kl(z, target.ids, target.logp, mask, cfg.temperature)


def _stored_kd(
    z: torch.Tensor, batch: dict[str, torch.Tensor], cfg: TrainConfig, loss_config: LossConfig, targets: Targets
) -> torch.Tensor:
    """The store's KD value for the student (for the log, when it is not the loss): the K+1-bucket
    divergence of a top-k store, the draws' estimate of a sampled one. The KD part alone (alpha 0)."""
    target = targets.store(batch, targets.device)
    with torch.no_grad():
        return kd_loss(z, target, replace(loss_config, alpha=0.0))


def _evaluate(model: torch.nn.Module, tokenizer, vocab: int, cfg: TrainConfig, eval_stores: Store | None) -> dict:
    model.eval()
    result: dict[str, float] = {}
    if cfg.eval_text:
        result |= eval_text(model, tokenizer, cfg.eval_text, vocab_size=vocab, seq_len=cfg.seq_len,
                            batch_size=cfg.batch_size, max_tokens=cfg.eval_tokens)
    if eval_stores is not None:
        result |= eval_store(model, eval_stores, vocab_size=vocab, seq_len=cfg.seq_len,
                             batch_size=cfg.batch_size, max_tokens=cfg.eval_tokens)
    return result


def _open_eval_store(cfg: TrainConfig) -> Store | None:
    if not cfg.eval_store:
        return None
    token = cfg.token if cfg.eval_store.startswith(("http://", "https://")) else None
    return open_store(cfg.eval_store, token=token, storage_options=cfg.storage_options or None)


def _online_teacher(cfg: TrainConfig, meta: StoreMeta, device: torch.device) -> torch.nn.Module:
    source = cfg.teacher or meta.teacher.source
    teacher = load_teacher(source, device=device)
    if teacher.tokenizer_info.fingerprint != meta.tokenizer.fingerprint:
        raise LogitStoreError(
            f"--teacher {source}: its tokenizer ({teacher.tokenizer_info.vocab_size} tokens, "
            f"{teacher.tokenizer_info.fingerprint[:12]}) is not the store's ({meta.tokenizer.vocab_size} tokens, "
            f"{meta.tokenizer.fingerprint[:12]})"
        )
    if teacher.info.weights_sha256 != meta.teacher.weights_sha256:
        log.warning("online teacher %s is not the store's teacher (weights differ)", source)
    return teacher.model


def _check_positions(model: torch.nn.Module, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise LogitStoreError(f"--seq-len {seq_len} exceeds the student's max_position_embeddings {limit}")


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms, biases) do not. Tied weights appear once."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _setup_distributed(device_spec: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_spec)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward (transformers' non-reentrant checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):  # its name in recent transformers
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise LogitStoreError(f"--grad-checkpointing: {type(model).__name__} does not support it")


def _check_same_blocks(dataset: StoreDataset, url: str, other: StoreDataset, other_url: str) -> None:
    """Another teacher's store must hold the same tokens, cut the same way: same tokenizer, corpus
    (the documents used), packing and max_len, hence the same sequences; and the same blocks in the
    same order, which also depends on how the capture cut work units and chunks. LogitStoreError
    naming the first difference."""
    a, b = dataset.meta, other.meta
    if a.capture.generate is not None or b.capture.generate is not None:
        raise LogitStoreError(f"--store {other_url}, --store {url}: a generated store's text is its teacher's own "
                              "samples, so another teacher's soft labels would be along other tokens; train on one "
                              "generated store at a time")  # fmt: skip
    for what, x, y in (("tokenizer fingerprint", a.tokenizer.fingerprint[:12], b.tokenizer.fingerprint[:12]),
                       ("corpus fingerprint", a.corpus.fingerprint[:12], b.corpus.fingerprint[:12]),
                       ("packing", a.capture.packing, b.capture.packing),
                       ("max_len", a.capture.max_len, b.capture.max_len)):  # fmt: skip
        if x != y:
            raise LogitStoreError(f"--store {other_url}: its {what} ({y}) is not that of --store {url} ({x}): "
                                  "several teachers' stores must hold the same corpus")  # fmt: skip
    if not (all(np.array_equal(x, y) for x, y in zip(dataset.blocks, other.blocks, strict=True))
            and np.array_equal(dataset.run_offsets, other.run_offsets)):  # fmt: skip
        raise LogitStoreError(f"--store {other_url}: its segments or chunks are cut unlike --store {url}'s (captured "
                              "with other --unit-tokens or chunk_tokens), so its blocks would be read in another "
                              "order; capture it with the same settings")  # fmt: skip


def _fully_shard(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP2: each decoder layer its own unit (gathered for its forward and backward only), then the
    root (embedding, last norm, head). On CUDA the gathered weights compute in bfloat16 and the
    gradients are reduced in float32; the sharded master weights stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()  # fmt: skip
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise LogitStoreError(f"--fsdp: {type(model).__name__}'s decoder has no `layers` to shard one by one")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An FSDP model's whole weights on rank 0's CPU (every rank must call it; the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after the checkpoint being resumed, so the file reads as one run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _write(records: RunRecords | None, record: dict) -> None:
    if records is not None:  # rank 0
        records.write(record)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", disable=not enabled)
