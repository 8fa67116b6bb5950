"""The teachers a server offers, and a cheap fingerprint of each for capture de-duplication.

The store records the exact weights fingerprint (taken over the loaded tensors), but that
needs the model loaded; the API decides "is this capture already done?" without loading
anything, from a sha256 over the teacher's files (names, sizes, bytes). Files are hashed
once per process and re-hashed only when their size or mtime changes.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from logitstore.errors import TeacherError

_cache: dict[tuple, str] = {}
_lock = threading.Lock()


class UnknownTeacherError(TeacherError):
    """A capture asked for a teacher this server does not offer."""


def teacher_source(teachers: dict[str, str], name: str) -> str:
    """The source (directory, .gguf, hub id or alias) of the offered teacher `name`."""
    if name not in teachers:
        raise UnknownTeacherError(f"unknown teacher {name!r}; this server offers: {', '.join(sorted(teachers))}")
    return teachers[name]


def teacher_fingerprint(source: str) -> str:
    """sha256 over the files of the teacher at `source`; for a hub id, over the id and the
    commit its default branch resolves to now (a new upload under the same name is another
    teacher, and must not be answered with the old one's stores)."""
    from logitstore.hf import resolve_teacher_source

    src = resolve_teacher_source(source)
    if src.kind == "hub":
        return hashlib.sha256(f"hub:{src.path_or_id}@{hub_revision(src.path_or_id)}".encode()).hexdigest()
    root = Path(src.location)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    with _lock:
        if stats in _cache:
            return _cache[stats]
    h = hashlib.sha256()
    for p in files:
        name = (p.name if p == root else str(p.relative_to(root))).encode()
        h.update(len(name).to_bytes(8, "little") + name + p.stat().st_size.to_bytes(8, "little"))
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _cache[stats] = digest
    return digest


def hub_revision(repo_id: str) -> str:
    """The commit sha that `repo_id`'s default branch resolves to: asked of the hub, or, when it
    cannot be reached (offline, HF_HUB_OFFLINE=1), read from the local Hugging Face cache."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return HfApi().model_info(repo_id).sha
    except Exception as e:  # unreachable, offline mode, refused: whatever the HTTP client raised
        hub_error = e
    try:  # the snapshot folder of the cached revision is named by its commit sha
        return Path(snapshot_download(repo_id, local_files_only=True)).name
    except LocalEntryNotFoundError:
        raise TeacherError(
            f"{repo_id}: cannot resolve its revision: the hub did not answer ({type(hub_error).__name__}) and "
            "it is not in the local Hugging Face cache; download it once, or serve a local directory"
        ) from None
