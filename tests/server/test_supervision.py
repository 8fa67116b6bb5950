"""The embedded worker's life: the server restarts it when it dies and reports it in /healthz and
/metrics; it stops when its server dies, even by SIGKILL, instead of living on beside the next one."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.server.conftest import ADMIN_KEY, Api, free_port
from tests.server.test_e2e import ROOT, running


def _running(pid: int) -> bool:
    """Whether process `pid` still runs; an exited child of a dead server is a zombie until it is reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Wait for process `pid` to exit; kill it and fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while _running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"process {pid} still runs {timeout_s} s after its parent died")
        time.sleep(0.05)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_killed_embedded_worker_is_restarted(
    make_settings: Callable[..., Settings], corpus_slice: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.app")
    with TestClient(create_app(make_settings(embedded_worker=True))) as client:
        health = client.get("/healthz")
        first = health.json()["workers"]["embedded"]
        assert health.status_code == 200 and health.json()["ok"] is True
        assert first["alive"] and first["restarts"] == 0, first
        assert "logitstore_embedded_worker_alive 1.0" in client.get("/metrics").text

        os.kill(first["pid"], signal.SIGKILL)
        deadline, seen_dead = time.monotonic() + 30, False
        while (health := client.get("/healthz")).json()["workers"]["embedded"]["restarts"] == 0:
            if not health.json()["workers"]["embedded"]["alive"]:  # restarted after a 1 s back-off
                seen_dead = True
                assert health.status_code == 503 and health.json()["ok"] is False, health.json()
            assert time.monotonic() < deadline, "the embedded worker was not restarted"
            time.sleep(0.05)
        assert seen_dead
        now = health.json()["workers"]["embedded"]
        assert health.status_code == 200 and now["alive"] and now["pid"] != first["pid"], now
        metrics = client.get("/metrics").text
        assert "logitstore_embedded_worker_alive 1.0" in metrics
        assert "logitstore_embedded_worker_restarts_total 1.0" in metrics
        assert f"embedded worker process {first['pid']} died (killed by SIGKILL)" in caplog.text

        # The restarted worker runs jobs.
        api = Api(client, client.app.state.settings)
        key = api.team("alpha")
        job = api.capture(key, api.upload(key, corpus_slice.read_bytes()).json()["id"]).json()
        deadline = time.monotonic() + 120
        while (done := client.get(f"/v1/jobs/{job['id']}", headers=api.auth(key)).json())["state"] in ("queued",
                                                                                                      "running"):
            assert time.monotonic() < deadline, done
            time.sleep(0.1)
        assert done["state"] == "succeeded", done


def test_without_an_embedded_worker_healthz_lists_none(api: Api) -> None:
    health = api.client.get("/healthz")
    assert health.status_code == 200 and health.json()["workers"] == {} and health.json()["ok"] is True
    assert "logitstore_embedded_worker" not in api.client.get("/metrics").text


def test_the_embedded_worker_exits_when_its_server_is_killed(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    port = free_port()
    args = ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--teacher", f"tiny={tiny_teacher_dir}"]
    with running(args, {"LOGITSTORE_ADMIN_KEY": ADMIN_KEY}, tmp_path / "server.log") as server:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    worker_pid = client.get("/healthz").json()["workers"]["embedded"]["pid"]
                    break
                except httpx.TransportError:
                    assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                    time.sleep(0.2)
        worker = rf"worker {re.escape(socket.gethostname())}-{worker_pid}-\w+"
        while not re.search(rf"{worker} polling", (tmp_path / "server.log").read_text()):  # set up, and idle
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        _wait_gone(worker_pid, timeout_s=10)
    if sys.platform.startswith("linux"):  # the kernel told it at once (PR_SET_PDEATHSIG), as SIGTERM does
        assert re.search(rf"{worker} stopping \(signal {signal.SIGTERM:d}\)", (tmp_path / "server.log").read_text())


def test_a_worker_watching_its_parent_stops_when_it_dies() -> None:
    """The portable fallback alone (no prctl): a thread sees the process handed to another parent."""
    child = ("import os, threading; from server.worker import _watch_parent; stop = threading.Event(); "
             "print('watching', flush=True); _watch_parent(os.getppid(), stop, 0.1); assert stop.is_set()")
    parent = ("import subprocess, sys, time; "
              f"child = subprocess.Popen([sys.executable, '-c', {child!r}]); print(child.pid, flush=True); "
              "time.sleep(10)")
    with subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        child_pid = int(proc.stdout.readline())
        assert proc.stdout.readline() == "watching\n"
        time.sleep(0.3)
        assert _running(child_pid)  # its parent lives
        proc.kill()
    _wait_gone(child_pid, timeout_s=5)


def _capture_ranks_of(pid: int) -> list[int]:
    """The spawned capture ranks among process `pid`'s children (not multiprocessing's resource tracker)."""
    ranks = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if ppid == pid and "spawn_main" in cmdline and "resource_tracker" not in cmdline:
            ranks.append(int(stat.parent.name))
    return ranks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_killed_workers_capture_ranks_die_with_it(api: Api, corpus_slice: Path, tiny_teacher_dir: Path,
                                                    tmp_path: Path) -> None:  # fmt: skip
    """A worker with gpus_per_job 2 killed outright: its rank processes must not go on writing the
    store while another worker resumes the job (PR_SET_PDEATHSIG, or the ranks' parent check)."""
    key = api.team("alpha")
    corpus = api.upload(key, corpus_slice.read_bytes()).json()["id"]
    api.capture(key, corpus)
    args = ["worker", "--data-dir", str(api.settings.data_dir), "--database-url", api.settings.db_url,
            "--teacher", f"tiny={tiny_teacher_dir}", "--gpus-per-job", "2"]  # fmt: skip
    with running(args, {}, tmp_path / "worker.log") as worker:
        deadline = time.monotonic() + 60
        while len(ranks := _capture_ranks_of(worker.pid)) < 2:
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        for pid in ranks:
            _wait_gone(pid, timeout_s=10)
