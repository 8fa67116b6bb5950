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
    """sha256 over the files of the teacher at `source` (a hub id hashes as its name)."""
    from logitstore.capture.teacher import resolve_teacher_source  # imports torch: only when a capture is asked

    src = resolve_teacher_source(source)
    if src.kind == "hub":
        return hashlib.sha256(f"hub:{src.path_or_id}".encode()).hexdigest()
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
