"""Loading the frozen teacher, and the fingerprint of its weights.

A teacher is named by one string, resolved by `logitstore.hf.resolve_teacher_source` (a
model directory, a ``.gguf`` file, the ``smollm2-135m`` alias or a hub id). The fingerprints
of the weights and of the tokenizer (`logitstore.hf.tokenizer_fingerprint`) are what a store
records so that a student can later prove it shares the tokenizer, and a resumed capture can
prove it runs the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from logitstore.errors import TeacherError
from logitstore.hf import SMOLLM2_ALIAS, TeacherSource, resolve_teacher_source, tokenizer_fingerprint
from logitstore.schema import TeacherInfo, TokenizerInfo

logger = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A loaded, frozen teacher: eval mode, no gradients, on its device.

    `tp` > 1: the model is sharded over that many processes (transformers' tensor parallelism,
    one torch.distributed group of all of them), which run every forward together.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: TeacherInfo
    tokenizer_info: TokenizerInfo
    tp: int = 1


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; anything else is checked to be usable."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise TeacherError(f"unknown device {device!r}: {e}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TeacherError(f"device {str(dev)!r} asked for, but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def load_teacher(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    tp: int = 1,
    device_map: str | None = None,
    max_memory: dict[str | int, str] | None = None,
    offload_folder: str | None = None,
) -> Teacher:
    """Load a frozen teacher and its tokenizer, and fingerprint both.

    `dtype` (a torch dtype or its name; None or "auto": bfloat16 on CUDA, float32 on CPU) is what
    the forward pass runs in. The weights fingerprint is taken
    over the tensors as loaded, i.e. in the dtype the forward pass runs in.

    `tp` > 1 shards the model over the processes of the initialized torch.distributed group,
    which must number exactly `tp` (torchrun), with the model's own tensor-parallel plan
    (`tp_plan="auto"`); every process calls this. The fingerprint is that of the whole model.

    `device_map` ("auto", "balanced", "sequential": accelerate's placement) spreads the layers
    over the visible GPUs instead, each up to its `max_memory` ({0: "70GiB", "cpu": "200GiB"}),
    then the CPU (offloaded: weights in CPU memory, computed on a GPU layer by layer), then
    `offload_folder` on disk when given; `device` only sets the
    default dtype then. Offloaded weights are fingerprinted as well, read back one module at a
    time.
    """
    src = resolve_teacher_source(name_or_path)
    dev = resolve_device(device)
    if dtype is None or dtype == "auto":
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {}
    if src.gguf_file is not None:
        kwargs["gguf_file"] = src.gguf_file
    if tp > 1:
        if device_map is not None:
            raise TeacherError("tensor parallelism (tp) and device_map are two ways to split a teacher; give one")
        kwargs["distributed_config"] = _tensor_parallel_config(tp)
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path_or_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src.path_or_id, dtype=dtype, **kwargs)
    except Exception as e:  # anything from a corrupt or foreign file: report it as a teacher problem
        raise _load_error(src, e) from e
    if tp == 1 and device_map is None:  # else the shards are already where they run
        model.to(dev)
    elif tp > 1 and not _is_sharded(model):
        raise TeacherError(
            f"{src.location}: {type(model).__name__} has no tensor-parallel plan in this transformers version, so "
            f"--tp {tp} would run {tp} whole copies; use --device-map auto to spread it over the GPUs instead"
        )
    model.eval()
    model.requires_grad_(False)

    logits_width = _logits_width(model)
    vocab_size = len(tokenizer)
    if vocab_size > logits_width:
        raise TeacherError(
            f"{src.location}: the tokenizer has {vocab_size} tokens but the model scores only {logits_width}; "
            "the tokenizer does not belong to this model"
        )
    info = TeacherInfo(
        name=src.name,
        source=src.location,
        weights_sha256=weights_fingerprint(model),
        dtype=str(dtype).removeprefix("torch."),
    )
    tokenizer_info = TokenizerInfo(
        name=src.name,
        fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=vocab_size,
        logits_width=logits_width,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
    )
    logger.info(
        "loaded teacher %s (%s) on %s in %s, vocab %d, logits width %d, in %.1f s",
        src.name,
        src.kind,
        dev,
        info.dtype,
        vocab_size,
        logits_width,
        time.perf_counter() - started,
    )
    return Teacher(model=model, tokenizer=tokenizer, info=info, tokenizer_info=tokenizer_info, tp=tp)


def _onloaded(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The value of offloaded tensor `name`, read back to the CPU by its module's accelerate hook."""
    from accelerate.utils import align_module_device

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    with align_module_device(module, "cpu"):
        return getattr(module, leaf).detach().clone()


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _tensor_parallel_config(tp: int) -> Any:
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != tp:
        raise TeacherError(
            f"tensor parallelism over {tp} processes needs exactly {tp} in the process group, got {world}; "
            f"run it as `logitstore capture --tp {tp}` (which starts them under torchrun)"
        )
    return DistributedConfig(tp_plan="auto")


def _load_error(src: TeacherSource, e: Exception) -> TeacherError:
    if src.kind == "hub" and isinstance(e, OSError):
        return TeacherError(
            f"could not fetch the hub model {src.path_or_id!r} ({e.__class__.__name__}: {_first_line(e)}); "
            f"if the hub is unreachable, pass a local model directory, a .gguf file, or {SMOLLM2_ALIAS!r}"
        )
    if isinstance(e, ImportError):
        return TeacherError(f"{src.location}: a package needed to load it is missing: {e}")
    return TeacherError(f"{src.location}: cannot load the teacher: {e.__class__.__name__}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _logits_width(model: torch.nn.Module) -> int:
    """Rows of the output projection: the width of the logits, which may exceed the vocab."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict: per tensor, in name order, its name, dtype, shape and bytes.

    Tied tensors (e.g. the LM head sharing the embedding) appear in the state dict under two
    names with one storage; only the first name in sorted order is hashed, so that tying does
    not double the work. Every field is length-prefixed so no two layouts hash alike.
    """
    from torch.distributed.tensor import DTensor

    h = hashlib.sha256()
    seen: set[tuple] = set()
    state = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
    for name in sorted(state):
        t = state[name]
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_meta:  # offloaded by accelerate: no storage to compare, but tied weights are one object
            key = ("offloaded", id(t))
        else:
            key = (local.data_ptr(), t.dtype, tuple(t.shape), tuple(local.stride()))
        if local.is_meta or local.data_ptr() != 0:
            if key in seen:
                continue
            seen.add(key)
        # Hashed whole, so that a split teacher has the fingerprint of the unsplit one: a
        # tensor-parallel shard is gathered (every process gathers the same tensors in the same
        # order), an offloaded weight is read back.
        if isinstance(t, DTensor):
            t = t.full_tensor()
        elif t.is_meta:
            t = _onloaded(model, name)
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        h.update(len(data).to_bytes(8, "little"))
        h.update(memoryview(data))
    return h.hexdigest()
