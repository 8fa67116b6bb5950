"""A store inside Hugging Face `Trainer`: a dataset, a collator and `KDTrainer`.

An existing Trainer script distills from a store with a few added lines:

    from trainer.hf import KDTrainer, StoreExamples, collate

    train_dataset = StoreExamples("stores/shakespeare", seq_len=1024, batch_size=8)   # = per_device_train_batch_size
    trainer = KDTrainer(model=student, args=args, train_dataset=train_dataset, data_collator=collate,
                        temperature=2.0, divergence="fkl", alpha=0.1)
    trainer.train()

The examples come in the order of `logitstore-train`'s loader (trainer/data.py): each global
batch's rows, lane by lane. Trainer's Accelerate gives process r of W the r-th `batch_size`
slice of every W * batch_size examples (`IterableDatasetShard`, or the main process
dispatching), which is exactly the rows rank r gets from `logitstore-train` with the same
seed, sequence length and batch size; so the dataset itself is not split by rank. It is
endless (epoch after epoch): give `TrainingArguments(max_steps=...)`, and keep
`dataloader_num_workers=0` (the store is read and decoded in bulk by the dataset itself).

`KDTrainer.compute_loss` runs the model through whatever wrapper Trainer put around it (DDP,
FSDP, DeepSpeed), keeping only the final hidden states (`trainer.train.final_hidden_states`:
a hook on the decoder; the logits of no position are computed), and applies the fused KD loss from hidden states of
trainer/losses to them and the output projection, as `logitstore-train` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import transformers
from accelerate import PartialState
from torch.utils.data import IterableDataset

from logitstore.capture.document_attention import check_document_attention
from logitstore.schema import StoreMeta
from trainer.data import StoreDataset
from trainer.losses.config import LossConfig
from trainer.losses.targets import StoreTarget
from trainer.train import final_hidden_states, kd_loss_from_hidden_states, model_inputs

__all__ = ["KDTrainer", "StoreExamples", "collate"]


class StoreExamples(IterableDataset):
    """A store's blocks as single examples, in `logitstore-train`'s order (see the module docstring).

    Each example is a dict of tensors for one block of `seq_len` tokens: `input_ids`, `labels`
    (next tokens, -100 where none), the teacher's `topk_ids` / `topk_logp` / `lse` (and
    `counts`, `position_ids` for the stores that have them), `mask`. `batch_size` is the
    per-device batch size; `world_size` the number of training processes (default: Accelerate's,
    which is what Trainer splits the examples over), read when iteration starts.
    """

    def __init__(
        self, url: str, *, seq_len: int, batch_size: int, seed: int = 0, world_size: int | None = None,
        token: str | None = None, storage_options: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.url, self.seq_len, self.batch_size, self.seed = str(url), seq_len, batch_size, seed
        self.world_size, self.token, self.storage_options = world_size, token, storage_options
        self._meta: StoreMeta | None = None

    @property
    def meta(self) -> StoreMeta:
        if self._meta is None:
            self._meta = self._global_batches(1).meta
        return self._meta

    def _global_batches(self, world: int) -> StoreDataset:
        # One process with W x B rows sees what W ranks with B rows each see, lane by lane (data.py).
        return StoreDataset(self.url, seq_len=self.seq_len, batch_size=self.batch_size * world, seed=self.seed,
                            token=self.token, storage_options=self.storage_options, rank=0, world_size=1)  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        world = self.world_size or PartialState().num_processes
        for batch in self._global_batches(world):
            for row in range(len(batch["input_ids"])):
                yield {name: t[row] for name, t in batch.items()}


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples of `StoreExamples` into a batch of `logitstore-train`'s layout."""
    return {name: torch.stack([e[name] for e in examples]) for name in examples[0]}


class KDTrainer(transformers.Trainer):
    """`transformers.Trainer` whose loss is the fused KD loss against the store's teacher.

    Arguments besides Trainer's: the loss settings of `LossConfig` (temperature, divergence,
    alpha, beta); the store is `train_dataset`'s (a `StoreExamples`). alpha > 0 mixes in the
    hard-label cross-entropy on the batch's `labels`.
    """

    def __init__(
        self, *args: Any, temperature: float = 1.0, divergence: str = "fkl", alpha: float = 0.0, beta: float = 0.5,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        if not isinstance(self.train_dataset, StoreExamples):
            raise TypeError("KDTrainer trains from a store: pass train_dataset=StoreExamples(url, ...)")
        # The teacher's columns are not arguments of the model's forward: Trainer must not drop them.
        self.args.remove_unused_columns = False
        meta = self.train_dataset.meta
        self.loss_config = LossConfig(temperature=temperature, divergence=divergence, alpha=alpha, beta=beta)
        self.store_target = StoreTarget.of(meta, temperature, self.train_dataset.url)
        self.vocab = meta.tokenizer.vocab_size
        if meta.capture.packing == "packed-documents":
            check_document_attention(self.model, "student")

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        unwrapped = self.accelerator.unwrap_model(model)
        device = unwrapped.get_input_embeddings().weight.device
        hidden = final_hidden_states(model, unwrapped, **model_inputs(inputs, device))
        labels = inputs["labels"].to(device).reshape(-1) if self.loss_config.alpha > 0 else None
        loss, kd, ce = kd_loss_from_hidden_states(hidden, unwrapped, self.store_target(inputs, device),
                                                  self.loss_config, self.vocab, labels=labels)  # fmt: skip
        return (loss, {"kd": kd, "ce": ce}) if return_outputs else loss
