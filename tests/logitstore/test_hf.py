"""`logitstore.hf` names and fingerprints models without torch: the server resolves a teacher,
and the trainer's CLI answers, without loading it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from logitstore.hf import SMOLLM2_ALIAS, context_length, teacher_context_length

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


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 2048}, 2048),
        ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}, 8192),
        ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 16384),
        # llama3 / yarn with the original length given: max_position_embeddings is already extended.
        ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                               "original_max_position_embeddings": 8192}}, 131072),
        ({"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 8192}}, 32768),
        ({}, None),
    ],
)
def test_context_length_reads_positions_and_rope_scaling(config, expected):
    assert context_length(config) == expected


def test_teacher_context_length_without_loading_the_weights(tiny_teacher_dir):
    # The tiny test teacher says 512 in its config.json; the shipped GGUF says 8192 in its metadata.
    assert teacher_context_length(str(tiny_teacher_dir)) == 512
    assert teacher_context_length(SMOLLM2_ALIAS) == 8192
