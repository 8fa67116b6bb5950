"""The student: any Hugging Face causal LM, checked against the store before training.

`--student` is one of:
- a config (a `config.json` file, or a directory with only a config): fresh weights, seeded;
- a model directory with weights, a `.gguf` file, or a hub id: pretrained weights.

The tokenizer comes from the student's directory when it has one, else from `--tokenizer`,
else from the store's teacher source (the usual case: a small fresh student that shares the
teacher's tokenizer). Whatever its origin, it must fingerprint like the store's tokenizer:
a student that reads token ids differently would learn from soft labels of other tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from logitstore.errors import LogitStoreError, TeacherError
from logitstore.hf import chat_template_sha256, resolve_teacher_source, tokenizer_fingerprint
from logitstore.schema import StoreMeta

log = logging.getLogger(__name__)


class StudentError(LogitStoreError):
    """The student cannot be loaded, or does not fit the store."""


@dataclass
class Student:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int  # columns of the logits that are real tokens (the store's vocabulary)
    fresh: bool  # built from a config (True) or loaded with pretrained weights (False)


def load_student(spec: str, meta: StoreMeta, *, tokenizer: str | None = None, seed: int = 0) -> Student:
    """Load or build the student named by `spec` and check it against the store's tokenizer."""
    config_file = _config_only(spec)
    try:
        if config_file is not None:
            config = AutoConfig.from_pretrained(str(config_file))
            # fork_rng: the initial weights depend on `seed` only, not on what ran before.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config)
        else:
            src = resolve_teacher_source(spec)
            kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
            model = AutoModelForCausalLM.from_pretrained(src.path_or_id, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, TeacherError) as e:
        raise StudentError(f"--student {spec}: cannot load it: {_first_line(e)}") from None

    tok = _load_tokenizer(tokenizer or _tokenizer_beside(spec, config_file) or meta.teacher.source, meta)
    vocab_size = check_student(model, tok, meta)
    return Student(model=model, tokenizer=tok, vocab_size=vocab_size, fresh=config_file is not None)


def check_student(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, meta: StoreMeta) -> int:
    """Refuse a student whose tokenizer or output width does not fit the store; return the vocab size.

    The student's logits may be wider than the vocabulary (widths padded to a multiple of 64 or
    128 are common); the trainer uses the first `vocab_size` columns, the real tokens.
    """
    want = meta.tokenizer
    got_fp = tokenizer_fingerprint(tokenizer)
    if got_fp != want.fingerprint:
        raise StudentError(
            f"the student's tokenizer differs from the store's: {len(tokenizer)} tokens, fingerprint "
            f"{got_fp[:12]}… vs the store's {want.name!r}, {want.vocab_size} tokens, fingerprint "
            f"{want.fingerprint[:12]}…; the soft labels are indexed by the teacher's token ids, so the student "
            f"must use the teacher's tokenizer (pass it with --tokenizer)"
        )
    got = chat_template_sha256(tokenizer) if want.chat_template_sha256 is not None else None
    if want.chat_template_sha256 is not None and got != want.chat_template_sha256:
        raise StudentError(
            f"the student's chat template differs from the one the store's chat rows were rendered with "
            f"({'none' if got is None else got[:12] + '…'} vs {want.chat_template_sha256[:12]}…): the student would "
            f"be trained on conversations laid out differently from how it will be prompted; pass the teacher's "
            f"tokenizer with --tokenizer"
        )
    head = model.get_output_embeddings()
    width = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
    if width < want.vocab_size:
        raise StudentError(
            f"the student's output layer scores {width} tokens but the store's vocabulary has {want.vocab_size}; "
            f"set vocab_size >= {want.vocab_size} in the student's config"
        )
    return want.vocab_size


def _config_only(spec: str) -> Path | None:
    """The config file when `spec` names a config (a .json file, or a directory without weights)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError as e:
            raise StudentError(f"--student {spec}: not valid JSON: {e}") from None
        return path
    if path.is_dir() and (path / "config.json").is_file():
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        return None if has_weights else path / "config.json"
    return None


def _tokenizer_beside(spec: str, config_file: Path | None) -> str | None:
    """The student's own directory, when it holds a tokenizer."""
    path = Path(spec).expanduser()
    folder = config_file.parent if config_file is not None else path if path.is_dir() else None
    if folder is not None and any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return str(folder)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(path)
    return None


def _load_tokenizer(spec: str, meta: StoreMeta) -> PreTrainedTokenizerBase:
    try:
        if Path(spec).expanduser().is_dir():  # a tokenizer directory needs no model config
            return AutoTokenizer.from_pretrained(str(Path(spec).expanduser()))
        src = resolve_teacher_source(spec)
        kwargs: dict[str, Any] = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        return AutoTokenizer.from_pretrained(src.path_or_id, **kwargs)
    except (OSError, ValueError, TeacherError) as e:
        raise StudentError(
            f"cannot load the tokenizer from {spec}: {_first_line(e)}; pass the teacher's tokenizer "
            f"({meta.tokenizer.name!r}) with --tokenizer (a model directory, .gguf file or hub id)"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
