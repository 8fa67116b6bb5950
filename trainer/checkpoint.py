"""Training checkpoints: written atomically, found again by `--resume`.

`OUT/checkpoints/step_00000100/` holds
- `model.safetensors`: the student's weights (shared tensors such as a tied head stored once);
- `trainer_state.pt`: optimizer, LR schedule, the data loader of every rank, RNG states, step.

Under FSDP (`--fsdp`) the weights and the optimizer state are sharded: every rank writes its
shards of both with torch.distributed.checkpoint into `sharded/` instead (the same layout
loads on another number of ranks), and `trainer_state.pt` holds the rest.

A checkpoint is written under a temporary name, fsync'd, then renamed: a run killed while
saving leaves a `*.partial` directory that is ignored and removed, never a half checkpoint
that `--resume` would load.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from logitstore.storage import fsync_path

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically; keep only the newest `keep` checkpoints."""
    final = checkpoint_dir(out, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{final.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({**trainer_state, "step": step, "rng": _rng_state()}, tmp / "trainer_state.pt")
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    if final.exists():  # re-saving a step (a resumed run that saves again at the same step)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    for partial in root.glob("*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    return final


def save_sharded_checkpoint(
    out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:  # fmt: skip
    """`save_checkpoint` for an FSDP model: every rank calls it; the same atomic rename by rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_dir(out, step)
    tmp = final.parent / f"{final.name}.partial"  # one name for every rank: they write into it together
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "sharded"))
    dist.barrier()  # every shard is written
    if dist.get_rank() == 0:
        torch.save({**trainer_state, "step": step, "rng": _rng_state()}, tmp / "trainer_state.pt")
        for f in [*(tmp / "sharded").iterdir(), tmp / "sharded", tmp / "trainer_state.pt"]:
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(final.parent)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()  # nobody goes on (or stops) before the checkpoint exists
    return final


def load_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`load_checkpoint` for an FSDP model: its shards and the optimizer's are read into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / "sharded"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
    _set_rng_state(trainer_state.pop("rng"))
    return trainer_state


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where checkpoint `step` of the run in `out` lies."""
    return out / "checkpoints" / f"step_{step:08d}"


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the weights into `model`, restore the RNG states, and return the trainer state."""
    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    _set_rng_state(state.pop("rng"))
    return state


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
