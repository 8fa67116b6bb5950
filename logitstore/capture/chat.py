"""Chat rows rendered with the teacher tokenizer's own chat template, and which tokens to train on.

A chat row is a list of messages ({"role": "system" | "user" | "assistant", "content": str}),
or a prompt / completion pair (a user message and the assistant's answer). The tokens are the
template's, exactly what the teacher sees at inference. The loss mask says which positions
carry soft labels, i.e. whose next token the student learns to predict: `train_on="assistant"`
(the default for chat rows) keeps the positions that predict the assistant messages' tokens,
their end-of-turn marker included and the role header that opens them excluded;
`train_on="all"` keeps every position.

Spans come from rendering growing prefixes of the conversation: the template must be
prefix-stable (rendering messages[:i + 1] starts with the rendering of messages[:i]), which
the chat templates of the common model families are; one that is not is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from logitstore.errors import CorpusError

__all__ = ["TrainOn", "chat_messages", "render_chat", "render_prompt"]

TrainOn = Literal["assistant", "all"]
ROLES = ("system", "user", "assistant")


def chat_messages(row: dict[str, Any], where: str, messages_field: str = "messages") -> list[dict[str, str]] | None:
    """The messages of a row with `messages_field` or `prompt` / `completion`; None for a row that is
    neither (plain text). CorpusError, naming `where`, for a malformed one."""
    if messages_field in row:
        messages = row[messages_field]
        if not isinstance(messages, list) or not messages:
            raise CorpusError(f"{where}: {messages_field!r} must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise CorpusError(f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                  f"\"content\": a string}}, got {m!r}"[:300])  # fmt: skip
        if messages[0]["role"] == "assistant":
            raise CorpusError(f"{where}: a conversation must open with a system or user message, not the assistant's")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion", "")
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise CorpusError(f"{where}: a prompt / completion row needs a prompt, and both as strings")
        # A prompt alone (a generation's prompts file) is a user message waiting for its answer.
        answer = [{"role": "assistant", "content": completion}] if "completion" in row else []
        return [{"role": "user", "content": prompt}, *answer]
    return None


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], train_on: TrainOn = "assistant",
                where: str = "a chat row") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(int32 token ids [n], bool loss mask [n]) of a conversation rendered with `tokenizer`'s chat
    template; mask[t] is True where the student learns to predict token t + 1. CorpusError naming
    `where` when it cannot be rendered."""
    ids = _render(tokenizer, messages, where)
    if train_on == "all":
        return np.asarray(ids, dtype=np.int32), np.ones(len(ids), dtype=bool)
    assistant = np.zeros(len(ids), dtype=bool)  # the tokens of the assistant turns
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        opened = _render(tokenizer, messages[:i], where, add_generation_prompt=True)  # ... + the assistant header
        through = _render(tokenizer, messages[: i + 1], where)
        if through[: len(opened)] != opened or ids[: len(through)] != through:
            raise CorpusError(f"{where}: the teacher's chat template is not prefix-stable (rendering a conversation "
                              "does not start with the rendering of its beginning), so the assistant tokens cannot "
                              "be found; use train_on='all' (--train-on all)")  # fmt: skip
        assistant[len(opened) : len(through)] = True
    mask = np.zeros(len(ids), dtype=bool)
    mask[:-1] = assistant[1:]
    return np.asarray(ids, dtype=np.int32), mask


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]], where: str) -> np.ndarray:
    """int32 tokens of a conversation to be answered: rendered with the chat template, then the
    header of an assistant reply (the template's generation prompt)."""
    if messages[-1]["role"] == "assistant":
        raise CorpusError(f"{where}: a prompt ends with the assistant's message; end it with the message to answer")
    return np.asarray(_render(tokenizer, messages, where, add_generation_prompt=True), dtype=np.int32)


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], where: str, *, add_generation_prompt: bool = False
            ) -> list[int]:  # fmt: skip
    if getattr(tokenizer, "chat_template", None) is None:
        raise CorpusError(f"{where}: the teacher's tokenizer has no chat template, so chat rows cannot be rendered")
    try:
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own raise_exception (jinja2.TemplateError) or transformers' checks
        raise CorpusError(f"{where}: the teacher's chat template refuses this conversation: {e}") from None
    return list(out["input_ids"] if hasattr(out, "keys") else out)
