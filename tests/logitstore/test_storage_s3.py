"""The store layer on S3, against a real S3 server (moto's, `s3_server` in tests/conftest.py):
commit records that two racing writers cannot both create, a capture straight into `s3://`
that equals a local one, a resume after a writer died mid-capture (uncommitted segments
garbage-collected), `describe` and `remove_tree`."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from logitstore import layout, storage
from logitstore.capture.engine import capture
from logitstore.capture.teacher import load_teacher
from logitstore.reader import describe, open_store
from logitstore.spec import CaptureSpec, CaptureTuning
from logitstore.verify import verify
from logitstore.writer import StoreWriter

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare.txt"
SPEC = CaptureSpec(mode="topk", k=8, temperatures=(1.0, 2.0), max_len=64, max_tokens=512)
TUNING = CaptureTuning(unit_tokens=64)


@pytest.fixture
def bucket(s3_server: dict[str, Any]) -> str:
    """A fresh, empty bucket; returns its s3:// URL."""
    import s3fs

    name = f"t{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_server).mkdir(name)
    return f"s3://{name}"


def test_create_key_on_s3_has_one_winner(s3_server: dict[str, Any], bucket: str) -> None:
    kv = storage.open_kv(f"{bucket}/store", read_only=False, storage_options=s3_server)
    won: list[int] = []
    start = threading.Barrier(8)

    def commit(i: int) -> None:
        start.wait()
        if storage.create_key(kv, "commits/000001.json", f"writer {i}".encode()):
            won.append(i)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert storage.read_key(kv, "commits/000001.json") == f"writer {won[0]}".encode()
    assert not storage.create_key(kv, "commits/000001.json", b"late")


@pytest.mark.slow  # ~30 s on 2 shared cores: two captures, several hundred requests to moto
def test_capture_into_s3_equals_local_and_resumes(
    s3_server: dict[str, Any], bucket: str, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    local = capture(teacher, [CORPUS], str(tmp_path / "local"), SPEC, tuning=TUNING)
    url = f"{bucket}/prefix/store"
    remote = capture(teacher, [CORPUS], url, SPEC, tuning=TUNING, storage_options=s3_server)
    planned = remote.meta.num_segments
    assert remote.complete and planned >= 6
    digest = verify(str(tmp_path / "local")).digest
    assert verify(url, storage_options=s3_server).digest == digest
    info = describe(url, storage_options=s3_server)
    assert info["tokens"] == local.num_tokens and info["disk_bytes"] > 0

    # What a writer SIGKILLed while writing segment 4 leaves behind: commits 0-2, segment 3 written
    # in full but not committed, segment 4 half-written, nothing of the later ones, no index.
    kv = storage.open_kv(url, read_only=False, storage_options=s3_server)
    for key in (layout.INDEX_KEY, layout.MANIFEST_KEY, *(layout.commit_key(i) for i in range(3, planned))):
        storage.delete_key(kv, key)
    for i in range(5, planned):
        storage.delete_prefix(kv, layout.segment_prefix(i))
    storage.delete_prefix(kv, f"{layout.segment_prefix(4)}/topk_logp")
    killed = open_store(url, storage_options=s3_server)
    assert not killed.complete and [r.segment for r in killed.segments] == [0, 1, 2]
    assert verify(url, storage_options=s3_server).ok  # what is visible after a kill is valid

    writer = StoreWriter.resume(url, killed.meta, storage_options=s3_server)
    assert writer.collect_garbage() == [3, 4]
    assert [n for n in storage.list_dir(kv, "segments") if n.isdigit()] == ["000000", "000001", "000002"]
    resumed = capture(teacher, [CORPUS], url, SPEC, tuning=TUNING, resume=True, storage_options=s3_server)
    assert resumed.complete and verify(url, storage_options=s3_server).digest == digest

    storage.remove_tree(url, s3_server)
    assert storage.list_dir(storage.open_kv(url, read_only=True, storage_options=s3_server), "") == []
    storage.remove_tree(url, s3_server)  # nothing left to delete is not an error
