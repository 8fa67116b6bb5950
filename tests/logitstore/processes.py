"""Killing a real `logitstore` process mid-run, for the resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def sigkill_after_commits(args: list[str], out: Path, commits: int, timeout_s: float = 120) -> int:
    """Start the command `args` writing the store `out`, SIGKILL it once `commits` commit records
    exist (0: once the store exists); returns how many were committed when the kill landed."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list((out / "commits").glob("*.json"))) if (out / "commits").is_dir() else 0
            if (out / "zarr.json").exists() and done >= commits:
                break
            time.sleep(0.002)
        assert proc.poll() is None, f"the run ended before the kill point: {proc.stderr.read()!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return len(list((out / "commits").glob("*.json"))) if (out / "commits").is_dir() else 0
