"""A plain `pip install logitstore` (no extras), in a fresh virtual environment, reads stores
on a local disk, over HTTP and on S3, and verifies them, with no torch installed."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
from store_helpers import fast_segment, make_meta, write_store

from logitstore.verify import verify

ROOT = Path(__file__).resolve().parents[2]

# Run inside the fresh environment: read every store whole, verify it, and say whether torch
# could even be imported there.
READER = """
import importlib.util, json, sys
import logitstore
from logitstore.verify import verify
targets = json.loads(sys.argv[1])
out = {}
for name, (url, options) in targets.items():
    store = logitstore.open_store(url, storage_options=options)
    block = store.read(0, store.num_tokens)
    report = verify(url, storage_options=options)
    out[name] = {"ok": report.ok, "digest": report.digest, "tokens": store.num_tokens,
                 "ids_sum": int(block.topk_ids.astype("int64").sum())}
out["torch_importable"] = importlib.util.find_spec("torch") is not None
out["torch_imported"] = "torch" in sys.modules
print(json.dumps(out))
"""


@pytest.mark.slow
def test_plain_install_reads_local_http_and_s3_stores_without_torch(tmp_path: Path, s3_server: dict[str, Any]):
    segments = [fast_segment(0, 300, k=16), fast_segment(1, 200, k=16)]
    local = write_store(tmp_path / "store", make_meta(num_segments=2, k=16), segments, finalize=True)
    want = verify(local)
    ids_sum = sum(int(s.topk_ids.astype("int64").sum()) for s in segments)

    # The same files on S3 (moto), and over plain HTTP from the same server: S3 serves GET with
    # Range to anonymous readers of public objects, which is all an http(s):// store needs.
    bucket = f"install-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3", **s3_server, s3_additional_kwargs={"ACL": "public-read"})
    fs.mkdir(bucket)
    fs.put(local, f"{bucket}/store", recursive=True)
    targets = {
        "local": (local, None),
        "s3": (f"s3://{bucket}/store", s3_server),
        "http": (f"{s3_server['endpoint_url']}/{bucket}/store", None),
    }

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    # Run from an empty directory, so that the checkout's packages cannot shadow the installed ones.
    read = subprocess.run([str(python), "-c", READER, json.dumps(targets)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert read.returncode == 0, read.stderr[-3000:]
    got = json.loads(read.stdout)
    assert not got["torch_importable"] and not got["torch_imported"]
    for name in targets:
        assert got[name] == {"ok": True, "digest": want.digest, "tokens": 500, "ids_sum": ids_sum}, name

    cli = subprocess.run([str(venv / "bin" / "logitstore"), "verify", local], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert cli.returncode == 0 and want.digest in cli.stdout, cli.stderr
