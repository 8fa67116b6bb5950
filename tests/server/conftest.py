"""Server test fixtures: database URLs (SQLite, and a real PostgreSQL this test run starts),
an app through its real lifespan, a corpus slice, and a local reference capture.

The PostgreSQL server is a throwaway: `initdb` into a temporary directory, `pg_ctl start`
on a free port with its unix socket in that directory, run as the `postgres` user (the
server refuses to run as root). Tests parametrized over `db_url` skip the PostgreSQL case,
with the reason, where no PostgreSQL binaries are installed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

ADMIN_KEY = "admin-secret"
CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare.txt"
# Small enough that the tiny teacher captures it in about a second, cut into several segments.
# A top-k store (the default is sampled, counts only: test_api.py's test_a_bare_request_captures_the_default_store).
CAPTURE = {"mode": "topk", "k": 8, "temperatures": [1.0, 2.0], "max_len": 64, "max_tokens": 640, "unit_tokens": 128}


def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "initdb").exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PgServer:
    socket_dir: Path
    port: int

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)")
    # Not under pytest's tmp dir: that is private to root, and the server runs as another user.
    # Short, too: the unix socket's path must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="logitstore-pg-"))
    user = "postgres" if _has_user("postgres") else "nobody"
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(root, user)
        run_as = ["runuser", "-u", user, "--"]
    data, port = root / "data", free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off"
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        yield PgServer(root, port)
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("pg_server").create_database()


@pytest.fixture
def make_settings(tmp_path: Path, db_url: str, tiny_teacher_dir: Path) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        values = {
            "data_dir": tmp_path / "data",
            "database_url": db_url,
            "admin_key": ADMIN_KEY,
            "teachers": {"tiny": str(tiny_teacher_dir)},
            "embedded_worker": False,
            "heartbeat_s": 0.2,
            "poll_s": 0.1,
        }
        return Settings(**{**values, **overrides})

    return make


class Api:
    """A TestClient with helpers for the usual first steps (teams, keys, uploads)."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client, self.settings = client, settings

    @staticmethod
    def auth(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def team(self, name: str) -> str:
        """Create a team; returns a fresh key of it."""
        r = self.client.post("/v1/teams", json={"name": name}, headers=self.auth(ADMIN_KEY))
        assert r.status_code == 201, r.text
        r = self.client.post(f"/v1/teams/{name}/keys", headers=self.auth(ADMIN_KEY))
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def upload(self, key: str, data: bytes, filename: str = "corpus.txt", **params):
        return self.client.post("/v1/corpora", params={"filename": filename, **params}, content=data,
                                headers=self.auth(key))

    def capture(self, key: str, corpus_id: str, **overrides):
        body = {"corpus_id": corpus_id, "teacher": "tiny", **CAPTURE, **overrides}
        return self.client.post("/v1/captures", json=body, headers=self.auth(key))


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[Api]:
    settings = make_settings()
    with TestClient(create_app(settings)) as client:
        yield Api(client, settings)


@pytest.fixture(scope="session")
def corpus_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~40 paragraphs of tinyshakespeare as a .txt corpus."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    paragraphs = CORPUS.read_text().split("\n\n")[:40]
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


@pytest.fixture(scope="session")
def reference_store(tiny_teacher_dir: Path, corpus_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local capture of `corpus_slice` with the `CAPTURE` settings, uninterrupted, one segment."""
    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec

    out = tmp_path_factory.mktemp("reference") / "store"
    spec = CaptureSpec(mode=CAPTURE["mode"], k=CAPTURE["k"], temperatures=CAPTURE["temperatures"],
                       max_len=CAPTURE["max_len"], max_tokens=CAPTURE["max_tokens"])
    capture(load_teacher(str(tiny_teacher_dir)), [corpus_slice], str(out), spec)
    return out
