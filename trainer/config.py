"""`TrainConfig`: every setting of a training run, and its checks.

Torch-free, so that `logitstore-train --help` (which builds its flags from these fields) and a
bad flag are answered without importing torch; the checks run before the store or the
student is loaded.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from logitstore.errors import CorpusError, LogitStoreError
from trainer.losses.config import LossConfig
from trainer.report import REPORT_TO

# The flag of each LossConfig field that TrainConfig sets, for its error messages.
_LOSS_FLAGS = {"temperature": "--temperature", "divergence": "--divergence", "alpha": "--alpha",
               "backend": "--loss-backend"}  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as `OUT/config.json` and in every checkpoint."""

    store: str
    student: str
    out: str
    tokenizer: str | None = None  # default: the student's own, else the store's teacher's
    token: str | None = None  # API key, for a store served by logitstore-server
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (S3 endpoint, ...)
    loss: Literal["kd", "ce", "online"] = "kd"
    topk_renormalize: bool = False  # kd: drop the tail and renormalize over the top-k (DistillKit's way)
    teacher: str | None = None  # online: the teacher (default: the store's); must share its tokenizer
    temperature: float = 1.0
    divergence: str = "fkl"
    alpha: float = 0.0  # weight of the hard-label CE in "kd" mode
    materialize_logits: bool = False  # kd: the loss on [N, V] logits instead of from hidden states
    loss_backend: str = "auto"  # kd: auto (the Triton kernel on CUDA, torch on CPU), triton or torch
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    grad_accum: int = 1
    fsdp: bool = False  # FSDP2: parameters, gradients and optimizer state sharded over the ranks
    grad_checkpointing: bool = False  # recompute each decoder layer's activations in the backward
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    eval_text: str | None = None
    eval_store: str | None = None
    eval_tokens: int = 65_536
    save_every: int = 500  # 0: checkpoint at the end only
    num_workers: int = 0
    device: str = "auto"
    resume: bool = False
    # Where records go besides metrics.jsonl (HF Trainer's report_to): "none" or "tensorboard".
    report_to: list[str] = field(default_factory=lambda: ["none"])
    # More teachers: stores of the same corpus (`--store A --store B`); the KD term is
    # sum_i w_i T^2 D(p_i || q) with `store_weights` w (one per store, `store` first; default equal).
    extra_stores: list[str] = field(default_factory=list)
    store_weights: list[float] = field(default_factory=list)
    # A generated store's sequences to train on: "all", or "best-of-n", per prompt the sample the
    # teacher finds likeliest (rejection sampling with the teacher as the scorer).
    select: Literal["all", "best-of-n"] = "all"

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # report_to="tensorboard", as HF Trainer accepts it
            self.report_to = [self.report_to]

    def weights(self) -> list[float]:
        """The weight of each store's teacher, `store` first."""
        n = 1 + len(self.extra_stores)
        return list(self.store_weights) or [1.0 / n] * n

    def loss_config(self) -> LossConfig:
        """The KD loss's settings (raises ValueError naming the LossConfig field when one is invalid)."""
        return LossConfig(
            temperature=self.temperature, divergence=self.divergence, alpha=self.alpha, backend=self.loss_backend
        )

    def check(self) -> None:
        if self.loss not in ("kd", "ce", "online"):
            raise LogitStoreError(f"--loss must be 'kd', 'ce' or 'online', got {self.loss!r}")
        try:
            self.loss_config()
        except ValueError as e:  # it names the LossConfig field; the user gave the flag or --config key
            message = str(e)
            for name, flag in _LOSS_FLAGS.items():
                message = message.replace(f"LossConfig.{name} ", f"{flag} ")
            raise LogitStoreError(message) from None
        if self.topk_renormalize and self.loss != "kd":
            raise LogitStoreError("--topk-renormalize applies to --loss kd only")
        if (self.topk_renormalize or self.loss == "online") and self.divergence != "fkl":
            raise LogitStoreError(
                "--topk-renormalize and --loss online compute the forward KL only: use --divergence fkl"
            )
        if self.materialize_logits and (self.loss != "kd" or self.topk_renormalize):
            raise LogitStoreError("--materialize-logits applies to --loss kd (the store's own signal) only")
        if self.teacher and self.loss != "online":
            raise LogitStoreError("--teacher is the online teacher: it needs --loss online")
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise LogitStoreError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LogitStoreError(f"--lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "eval_every", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise LogitStoreError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.token and not self.store.startswith(("http://", "https://")):
            raise LogitStoreError(
                f"--token is the API key of a store served by logitstore-server (http(s)://...); "
                f"--store {self.store} is not one: drop --token"
            )
        _check_report_to(self.report_to)
        if self.extra_stores and (self.loss != "kd" or self.topk_renormalize or self.materialize_logits):
            raise LogitStoreError("several --store train the KD loss from hidden states only: --loss kd, without "
                                  "--topk-renormalize or --materialize-logits")  # fmt: skip
        n = 1 + len(self.extra_stores)
        weights = self.store_weights
        if weights and (len(weights) != n or not all(w > 0 for w in weights) or abs(sum(weights) - 1) > 1e-6):
            raise LogitStoreError(f"--store-weights must be {n} positive numbers, one per --store, summing to 1; "
                                  f"got {','.join(f'{w:g}' for w in weights)}")  # fmt: skip
        if self.select not in ("all", "best-of-n"):
            raise LogitStoreError(f"--select must be 'all' or 'best-of-n', got {self.select!r}")
        if self.eval_text:
            _check_eval_text(self.eval_text)


def _check_report_to(report_to: list[str]) -> None:
    """Known destinations, "none" alone, and the packages they need installed."""
    unknown = [value for value in report_to if value not in REPORT_TO]
    if unknown or not report_to:
        got = ", ".join(map(repr, unknown)) or "nothing"
        raise LogitStoreError(f"--report-to must be one or more of {', '.join(REPORT_TO)}, got {got}")
    if "none" in report_to and len(set(report_to)) > 1:
        raise LogitStoreError(f"--report-to none goes alone, got {' '.join(report_to)}")
    # Found, not imported: checked before the run starts instead of failing after the student loaded.
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise LogitStoreError("--report-to tensorboard needs the tensorboard package: pip install 'logitstore[train]'")


def _check_eval_text(path: str) -> None:
    """Read the --eval-text file up to its first document, so that a missing, unreadable, empty
    or wrongly suffixed file fails before training instead of at the first evaluation."""
    from logitstore.capture.corpus import read_documents  # imports numpy: not for --help

    documents = read_documents([path])
    try:
        next(documents)
    except CorpusError as e:
        raise LogitStoreError(f"--eval-text: {e}") from None
    except OSError as e:  # permission denied, an I/O error
        raise LogitStoreError(f"--eval-text: {path}: cannot read it: {e.strerror or e}") from None
    finally:
        documents.close()
