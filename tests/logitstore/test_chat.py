"""Chat rows through the SmolLM2 tokenizer's own chat template: the tokens are the template's, and
the assistant mask covers exactly the assistant messages (content and end-of-turn)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from logitstore.capture.chat import chat_messages, render_chat
from logitstore.capture.engine import capture
from logitstore.capture.teacher import load_teacher
from logitstore.errors import CorpusError
from logitstore.reader import describe
from logitstore.spec import CaptureSpec
from logitstore.verify import verify

CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Sum 2+2"},
    {"role": "assistant", "content": "4"},
]


def test_the_tokens_are_the_templates_and_the_mask_covers_the_assistant_turns(smollm2_tokenizer):
    ids, mask = render_chat(smollm2_tokenizer, CONVERSATION)
    expected = smollm2_tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    assert ids.tolist() == expected and ids.dtype == np.int32
    # The tokens the masked-in positions predict, decoded: the assistant messages with their end-of-turn marker.
    predicted = np.flatnonzero(mask) + 1
    runs = np.split(predicted, np.flatnonzero(np.diff(predicted) > 1) + 1)
    texts = [smollm2_tokenizer.decode(ids[r]) for r in runs]
    assert texts == ["Hello! How can I help?<|im_end|>\n", "4<|im_end|>\n"]
    assert render_chat(smollm2_tokenizer, CONVERSATION, "all")[1].all()


def test_rows_of_messages_or_prompt_and_completion():
    assert chat_messages({"messages": CONVERSATION}, "f:1") == CONVERSATION
    assert chat_messages({"prompt": "Q", "completion": "A"}, "f:1") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert chat_messages({"prompt": "Q"}, "f:1") == [{"role": "user", "content": "Q"}]  # a prompt to answer
    assert chat_messages({"text": "plain"}, "f:1") is None
    for row, message in (({"messages": []}, "non-empty list"), ({"messages": [{"role": "bot", "content": "x"}]},
                         "messages\\[0\\] must be"), ({"completion": "A"}, "needs a prompt")):  # fmt: skip
        with pytest.raises(CorpusError, match=f"f:2: .*{message}"):
            chat_messages(row, "f:2")


def _chat_corpus(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "system", "content": "You are terse."}, *CONVERSATION]},
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"messages": [{"role": "user", "content": "Count to three."},
                      {"role": "assistant", "content": "One, two, three."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("packing", ["packed", "document"])
def test_a_chat_store_keeps_soft_labels_exactly_where_an_assistant_token_is_predicted(tiny_teacher_dir, tmp_path,
                                                                                      packing):
    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    corpus = _chat_corpus(tmp_path / "chat.jsonl")
    spec = dict(mode="topk", k=8, max_len=48, packing=packing, temperatures=(1.0, 2.0))
    chat = capture(teacher, [corpus], str(tmp_path / "assistant"), CaptureSpec(**spec))
    every = capture(teacher, [corpus], str(tmp_path / "all"), CaptureSpec(**spec, train_on="all"))

    assert chat.meta.capture.train_on == "assistant" and every.meta.capture.train_on == "all"
    template = hashlib.sha256(teacher.tokenizer.chat_template.encode()).hexdigest()
    assert chat.meta.tokenizer.chat_template_sha256 == template
    a, b = chat.read(0, chat.num_tokens), every.read(0, every.num_tokens)
    assert np.array_equal(a.input_ids, b.input_ids) and b.loss_mask.all()
    # The masked-in positions predict the assistant turns, and nothing else (an independent decode).
    predicted = np.flatnonzero(a.loss_mask) + 1
    runs = np.split(predicted, np.flatnonzero(np.diff(predicted) > 1) + 1)
    assert [teacher.tokenizer.decode(a.input_ids[r]) for r in runs] == [
        "Hello! How can I help?<|im_end|>\n", "4<|im_end|>\n", "Blue.<|im_end|>\n", "One, two, three.<|im_end|>\n"]
    # There the soft labels are the all-positions store's; elsewhere none are kept.
    m = a.loss_mask
    assert np.array_equal(a.topk_ids[m], b.topk_ids[m]) and np.array_equal(a.topk_logp[m], b.topk_logp[m])
    np.testing.assert_array_equal(a.lse[m], b.lse[m])
    assert (a.topk_ids[~m] == -1).all() and np.isneginf(a.topk_logp[~m]).all() and (a.lse[~m] == 0).all()
    assert verify(chat.url).ok
    assert describe(chat.url)["disk_bytes"] < describe(every.url)["disk_bytes"]


def test_plain_text_stores_are_written_as_before(tiny_teacher_dir, tmp_path):
    """No chat row: no train_on, no chat template in the metadata (readers from before chat rows read it)."""
    teacher = load_teacher(str(tiny_teacher_dir), device="cpu")
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "Just some text."}) + "\n")
    store = capture(teacher, [tmp_path / "plain.jsonl"], str(tmp_path / "s"), CaptureSpec(mode="topk", k=4, max_len=16))
    attrs = store.meta.model_dump(mode="json")
    assert "train_on" not in attrs["capture"] and "chat_template_sha256" not in attrs["tokenizer"]
    assert store.read(0, store.num_tokens).loss_mask is None


def test_parquet_chat_rows_and_which_field_wins(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from logitstore.capture.corpus import read_documents

    pq.write_table(pa.table({"messages": [CONVERSATION]}), tmp_path / "m.parquet")
    pq.write_table(pa.table({"prompt": ["Q1", "Q2"], "completion": ["A1", "A2"]}), tmp_path / "pc.parquet")
    pq.write_table(pa.table({"prompt": ["Q"]}), tmp_path / "p.parquet")
    docs = list(read_documents([tmp_path / "m.parquet", tmp_path / "pc.parquet", tmp_path / "p.parquet"]))
    assert [list(d.messages) for d in docs] == [
        CONVERSATION,
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
        [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "Q"}],
    ]
    assert docs[1].source.endswith("pc.parquet:row 0") and docs[2].source.endswith("pc.parquet:row 1")
    # A row with its text beside its messages reads as text, in both formats (as before chat rows).
    (tmp_path / "both.jsonl").write_text(json.dumps({"text": "rendered", "messages": CONVERSATION}) + "\n")
    pq.write_table(pa.table({"text": ["rendered"], "messages": [CONVERSATION]}), tmp_path / "both.parquet")
    both = list(read_documents([tmp_path / "both.jsonl", tmp_path / "both.parquet"]))
    assert [(d.text, d.messages) for d in both] == [("rendered", None)] * 2


def test_conversations_a_template_cannot_render_are_refused_by_row(smollm2_tokenizer, tmp_path):
    import copy

    with pytest.raises(CorpusError, match="f:3: a conversation must open with a system or user message"):
        chat_messages({"messages": [{"role": "assistant", "content": "Hi"}]}, "f:3")
    strict = copy.deepcopy(smollm2_tokenizer)
    strict.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(CorpusError, match="f:4: the teacher's chat template refuses this conversation: System role"):
        render_chat(strict, CONVERSATION, where="f:4")
    strict.chat_template = None
    with pytest.raises(CorpusError, match="f:5: the teacher's tokenizer has no chat template"):
        render_chat(strict, CONVERSATION, where="f:5")
