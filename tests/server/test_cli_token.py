"""`logitstore info/verify --token` against a store served by a real `logitstore-server serve`
(uvicorn on a loopback port, the tiny teacher captures the store)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from logitstore.cli import main
from tests.server.conftest import CAPTURE
from tests.server.test_e2e import auth, make_team, serve, upload, wait_for


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, corpus_slice: Path
           ) -> Iterator[tuple[str, str]]:
    """(zarr URL, API key) of a finished store on a running server."""
    with serve(tmp_path_factory.mktemp("served"), [f"tiny={tiny_teacher_dir}"]) as client:
        key = make_team(client, "alpha")
        r = client.post("/v1/captures", json={"corpus_id": upload(client, key, corpus_slice), "teacher": "tiny",
                                              **CAPTURE}, headers=auth(key))
        assert r.status_code == 201, r.text
        job = wait_for(client, key, r.json()["id"])
        assert job["state"] == "succeeded", job
        yield f"{str(client.base_url).rstrip('/')}/v1/stores/{job['store_id']}/zarr", key


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_and_verify_with_token(served: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    url, key = served
    rc, out, err = cli(capsys, "info", url, "--token", key, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["tokens"] == CAPTURE["max_tokens"] and info["complete"]
    assert "disk_bytes" not in info  # a served store cannot be listed

    rc, out, err = cli(capsys, "verify", url, "--token", key, "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] and report["complete"] and report["status"] == "ok", report
    assert report["tokens"] == CAPTURE["max_tokens"] and report["digest"]
    assert report["notes"] == []  # finalized by this version: manifest.parquet's sha256 is checked


@pytest.mark.parametrize("command", ["info", "verify"])
@pytest.mark.parametrize("token", [None, "wrong-key"])
def test_without_a_valid_token_one_line(served: tuple[str, str], capsys: pytest.CaptureFixture[str], command: str,
                                        token: str | None) -> None:
    url, _ = served
    rc, _, err = cli(capsys, command, url, *(["--token", token] if token else []))
    assert rc == 1
    assert err.startswith("error: ") and "access refused (401)" in err and "--token" in err
    assert err.count("\n") == 1 and "Traceback" not in err

