"""The README's by-hand flow, run as a user would paste it: server, team, key, upload, capture,
wait, train over HTTP, plot, share. Only the port changes (8000 may be taken on the CI box)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def by_hand_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The same flow by hand"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_flow_runs_as_pasted(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = by_hand_block().replace("8000", str(port))
    # The flow starts with `make venv`: bring .venv up to date here, in the checkout, so that the
    # scratch directory's `make venv` finds nothing to do (it would install the scratch copy).
    subprocess.run(["make", "-s", "venv"], cwd=ROOT, check=True, capture_output=True, timeout=1800)
    # A scratch copy of the repository root: the flow writes data/ and runs/ where it runs.
    for name in ("Makefile", "pyproject.toml", ".venv", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGITSTORE_")}
    # -e: any failing command fails the test; the trap stops the server if the flow does not get to.
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", f"trap 'kill $(jobs -p) 2>/dev/null' EXIT\n{script}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    assert "pip install" not in run.stdout  # `make venv` had nothing to do
    assert (tmp_path / "runs" / "kd" / "final").is_dir() and (tmp_path / "runs" / "kd" / "curves.png").is_file()
    assert run.stdout.rstrip().endswith('["vision"]')  # the grant's answer: the teams the store is shared with
