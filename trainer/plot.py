"""`logitstore-train plot DIR`: the loss and eval curves of a run as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from logitstore.errors import LogitStoreError

_TRAIN_KEYS = ("loss", "kd_loss", "ce_loss")
_EVAL_KEYS = ("eval_ppl", "eval_store_ppl", "eval_kl", "eval_teacher_xent", "eval_top1")


def read_metrics(run: Path) -> list[dict]:
    """The records of `run/metrics.jsonl`, in order."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise LogitStoreError(f"{run}: no metrics.jsonl; pass the --out directory of a logitstore-train run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw training losses (left) and every eval metric (one panel each); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    run = Path(run)
    records = read_metrics(run)
    evals = [k for k in _EVAL_KEYS if any(k in r for r in records)]
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(5 * (1 + len(evals)), 3.6), squeeze=False)
    ax = axes[0][0]
    for key in _TRAIN_KEYS:
        points = [(r["step"], r[key]) for r in records if key in r and r[key] == r[key]]  # skip NaN
        if points:
            ax.plot(*zip(*points, strict=True), label=key)
    ax.set(xlabel="step", title="training loss")
    ax.legend()
    for ax, key in zip(axes[0][1:], evals, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points, strict=True), marker="o")
        ax.set(xlabel="step", title=key)
    fig.tight_layout()
    path = Path(out) if out else run / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
