"""`logitstore.hf` names and fingerprints models without torch: the server resolves a teacher,
and the trainer's CLI answers, without loading it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_resolving_a_teacher_does_not_import_torch():
    script = (
        "import sys\n"
        "from logitstore.hf import SMOLLM2_ALIAS, resolve_teacher_source\n"
        "assert resolve_teacher_source(SMOLLM2_ALIAS).kind == 'gguf'\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
