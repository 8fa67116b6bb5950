"""A capture request's body and a job row's `settings`: the CaptureSpec plus two tuning knobs.

The request is the spec's fields (same defaults, rules and error locations: a cross-field
problem points at `["body", field]`) plus the corpus, the teacher, and how the work is cut.
The job row stores `spec.model_dump()` with `unit_tokens` and `batch_tokens` beside it; the
worker rebuilds both with `job_capture`. Rows written before the spec existed load too: they
hold the same names, plus a `text_field` that now belongs to the corpus.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from logitstore.spec import CaptureSpec, CaptureTuning

TUNING_FIELDS = ("unit_tokens", "batch_tokens")


class CaptureRequest(CaptureSpec):
    corpus_id: str = Field(min_length=1, max_length=64)
    teacher: str = Field("smollm2-135m", min_length=1, max_length=128, description="a name from GET /v1/teachers")
    unit_tokens: int = Field(
        CaptureTuning.unit_tokens, ge=1, le=1 << 30,
        description="tokens per work unit (= segment, = resume step); not part of the dedup key",
    )  # fmt: skip
    batch_tokens: int = Field(
        CaptureTuning.batch_tokens, ge=1, le=1 << 24, description="padded tokens per teacher forward (at least max_len)"
    )

    def spec(self) -> CaptureSpec:
        return CaptureSpec.model_validate({name: getattr(self, name) for name in CaptureSpec.model_fields})

    def job_settings(self) -> dict[str, Any]:
        """What the job row stores (batch_tokens raised to max_len, as the engine would)."""
        return {
            **self.spec().model_dump(mode="json"),
            "unit_tokens": self.unit_tokens,
            "batch_tokens": max(self.batch_tokens, self.max_len),
        }


def job_capture(settings: dict[str, Any]) -> tuple[CaptureSpec, CaptureTuning, str | None]:
    """A job row's settings as (spec, tuning, text_field of a row from before corpora kept theirs).
    Raises SpecError (the job then fails with its message) for a row the spec's rules refuse."""
    fields = {name: value for name, value in settings.items() if name in CaptureSpec.model_fields}
    # A row is a whole dump: a key absent from it is one an older server did not write, with that
    # server's meaning (counts_only false; mode topk), never today's request defaults.
    spec = CaptureSpec.parse({"mode": "topk", "counts_only": False, **fields})
    tuning = CaptureTuning(**{name: settings[name] for name in TUNING_FIELDS if name in settings})
    return spec, tuning, settings.get("text_field")
