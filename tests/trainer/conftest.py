"""Trainer fixtures: tiny captured stores.

Kernel tests run on CPU under the Triton interpreter (set in tests/conftest.py).
"""

import dataclasses
from pathlib import Path

import pytest
import torch

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def peaked_teacher_dir(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The tiny random teacher with its (tied) embedding scaled by 25: confident predictions.

    At the default init a random model is nearly uniform over the 49152 tokens, so a student
    that learns nothing is already close to it; this teacher is worth distilling.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25.0)
    out = tmp_path_factory.mktemp("peaked_teacher")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_store_factory(peaked_teacher_dir, tmp_path_factory):
    """Capture (once per settings) the peaked tiny teacher over tinyshakespeare; returns the store path.

    Arguments are CaptureSpec or CaptureTuning fields, e.g. `tiny_store_factory(max_tokens=2000, packing="document")`,
    and `corpus` (a text file; default the start of tinyshakespeare).
    Defaults: top-k with k=8, temperatures (1, 2), max_len 64, 4000 tokens, 1000-token units (several segments).
    """
    from logitstore.capture.engine import capture
    from logitstore.capture.teacher import load_teacher
    from logitstore.spec import CaptureSpec, CaptureTuning

    TUNING_FIELDS = {f.name for f in dataclasses.fields(CaptureTuning)}

    teacher = load_teacher(str(peaked_teacher_dir), device="cpu")
    built: dict[tuple, str] = {}

    def build(corpus: Path = CORPUS, **overrides) -> str:
        settings = {"mode": "topk", "k": 8, "temperatures": (1.0, 2.0), "max_len": 64, "max_tokens": 4000,
                    "unit_tokens": 1000}
        settings.update(overrides)
        key = (str(corpus), *sorted(settings.items()))
        if key not in built:
            out = tmp_path_factory.mktemp("tiny_store") / "store"
            tuning = {name: settings.pop(name) for name in list(settings) if name in TUNING_FIELDS}
            capture(teacher, [corpus], str(out), CaptureSpec(**settings), tuning=CaptureTuning(**tuning))
            built[key] = str(out)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_store(tiny_store_factory) -> str:
    """A packed top-k store of the peaked tiny teacher: 4000 tokens, k=8, T=1,2, sequences of 64, 4 segments."""
    return tiny_store_factory()


@pytest.fixture(scope="session")
def heldout_text(tmp_path_factory) -> Path:
    """The last 200 paragraphs of tinyshakespeare (training stores use its start)."""
    paragraphs = CORPUS.read_text().split("\n\n")
    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text("\n\n".join(paragraphs[-200:]))
    return path


@pytest.fixture(scope="session")
def heldout_store(tiny_store_factory, heldout_text) -> str:
    """The peaked tiny teacher's store of the held-out text (1500 tokens)."""
    return tiny_store_factory(corpus=heldout_text, max_tokens=1500)


@pytest.fixture(scope="session")
def chat_corpus(tmp_path_factory) -> Path:
    """Chat rows made from tinyshakespeare: the user gives a paragraph's first line, the assistant
    answers with the rest (multi-turn every third row, prompt / completion rows every fifth)."""
    import json

    rows = []
    paragraphs = [p.split("\n") for p in CORPUS.read_text().split("\n\n")[:150] if p.count("\n") >= 2]
    for i, lines in enumerate(paragraphs):
        first, rest = lines[0], "\n".join(lines[1:])
        if i % 5 == 0:
            rows.append({"prompt": f"Continue: {first}", "completion": rest})
            continue
        messages = [{"role": "user", "content": f"Continue: {first}"}, {"role": "assistant", "content": rest}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "Who speaks?"}, {"role": "assistant", "content": lines[0]}]
        rows.append({"messages": messages})
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
