"""Distill from a logitstore store inside an ordinary Hugging Face Trainer script.

    python examples/hf_trainer.py --store stores/shakespeare --student examples/student-llama-tiny.json \\
        --out runs/hf --max-steps 200
    accelerate launch examples/hf_trainer.py ...      # or torchrun: DDP / FSDP / DeepSpeed as Trainer does

Everything but the lines marked `# logitstore` is what a Trainer script already has: the
dataset, collator and Trainer class come from `trainer.hf` instead of a tokenized text
dataset and `Trainer`.
"""

from __future__ import annotations

import argparse

import torch
from transformers import TrainingArguments

from logitstore import open_store
from trainer.hf import KDTrainer, StoreExamples, collate  # logitstore
from trainer.student import load_student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="store path or URL (local, s3://, http(s)://)")
    ap.add_argument("--student", required=True, help="HF model dir / hub id, or a config .json for a fresh student")
    ap.add_argument("--out", required=True, help="where the trained student is saved (from_pretrained loads it)")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8, help="per device")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="one of the store's captured temperatures (the default store keeps T = 1 only)")
    ap.add_argument("--alpha", type=float, default=0.0, help="weight of the hard-label cross-entropy")
    args = ap.parse_args()

    # use_cpu without CUDA: that is what makes Trainer run several CPU processes (torchrun) as DDP.
    training = TrainingArguments(output_dir=args.out, max_steps=args.max_steps, learning_rate=args.lr,
                                 per_device_train_batch_size=args.batch_size, logging_steps=10, report_to=[],
                                 save_strategy="no", dataloader_num_workers=0,
                                 use_cpu=not torch.cuda.is_available())  # fmt: skip
    student = load_student(args.student, open_store(args.store).meta)
    train_dataset = StoreExamples(args.store, seq_len=args.seq_len, batch_size=args.batch_size)  # logitstore
    trainer = KDTrainer(model=student.model, args=training, train_dataset=train_dataset, data_collator=collate,
                        temperature=args.temperature, alpha=args.alpha)  # logitstore  # fmt: skip
    trainer.train()
    trainer.save_model(args.out)
    student.tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
