"""`CaptureSpec`: what a capture stores, the one definition of every user-facing setting;
`CaptureTuning`: how the engine cuts and encodes that work.

The CLI builds it from its flags, the HTTP API from the request body, the job row stores
its `model_dump()`, the worker rebuilds it with `model_validate`, and the engine derives
the store's metadata from it (`stored()`). Defaults, descriptions and the cross-field rules
live here only. Torch-free, so the server validates a request without loading a teacher.

Errors name fields (`head: ...`); the CLI phrases them as flags and the API as the body's
field locations. The on-disk metadata keeps its names (docs/format.md): there `k` is the
stored slot width, which is `slots` here (a sampled capture with a head stores
`head + min(k, draws)` slots).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from logitstore.codecs import LogProbCodec
from logitstore.errors import LogitStoreError
from logitstore.schema import CaptureSettings, GenerationSettings

MAX_SLOTS = 4096  # the trainer's kernel and the stores' id tables are sized for at most this many ids per token
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0  # log p / T stays finite in fp32 for every stored log-prob

# The settings each mode reads; the others must stay at their defaults (a value the capture
# would ignore is refused, not silently dropped).
_MODE_FIELDS = {
    "topk": (),
    "adaptive": ("coverage",),
    "sampled": ("draws", "seed", "head", "counts_only"),
}
_MODE_SPECIFIC = ("coverage", "draws", "seed", "head", "counts_only")


class SpecError(LogitStoreError):
    """Capture settings that break a rule. `problems` holds (field, message) pairs; `str()`
    reads `field: message; ...`, and the CLI and the API re-phrase the field for their users."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{name}: {msg}" if name else msg for name, msg in problems))

    @classmethod
    def from_validation(cls, error: ValidationError) -> SpecError:
        return cls([(".".join(map(str, e["loc"])), e["msg"]) for e in error.errors()])


def _unset_follows_the_mode(schema: dict[str, Any]) -> None:
    """counts_only's JSON schema: true, false or null, and no fixed default (unset follows the
    mode and the temperatures: CaptureSpec._counts_only_by_default), so that a client generated
    from the OpenAPI schema does not send false where it means the default store."""
    schema.pop("default", None)
    schema.pop("type", None)
    schema["anyOf"] = [{"type": "boolean"}, {"type": "null"}]


class CaptureSpec(BaseModel):
    """What to capture: the teacher's soft labels per token, and which tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Literal["topk", "adaptive", "sampled"] = Field(
        "sampled",
        description="topk: the k likeliest ids; adaptive: the fewest ids (at most k) whose T=1 mass reaches "
        "`coverage`; sampled: the distinct ids of `draws` seeded draws from the teacher (at most k), with counts",
    )
    k: int = Field(64, ge=1, le=MAX_SLOTS, description="ids stored per token; the cap in adaptive and sampled modes")
    coverage: float = Field(0.99, gt=0, le=1, description="adaptive mode: T=1 probability mass to reach")
    draws: int = Field(64, ge=1, le=255, description="sampled mode: draws per token (counts are stored in 8 bits)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="sampled mode: seed of the draws")
    head: int = Field(
        0, ge=0, lt=MAX_SLOTS,
        description="sampled mode: the top `head` ids kept exactly, the draws taken from the rest of the distribution",
    )  # fmt: skip
    counts_only: bool = Field(
        False,
        description="sampled mode with temperatures [1]: the drawn ids and counts without log-probs (about half "
        "the bytes, the same training gradient); a head keeps its ids' log-probs. Unset (or null): true exactly "
        "when the mode is sampled and the temperatures are [1], as in the default store",
        json_schema_extra=_unset_follows_the_mode,
    )
    temperatures: tuple[float, ...] = Field(
        (1.0,), min_length=1, max_length=16,
        description=f"temperatures whose full-vocabulary log-normalizer is stored, in "
        f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]; must include 1",
    )  # fmt: skip
    max_len: int = Field(1024, ge=1, le=131_072, description="longest sequence the teacher sees, in tokens")
    packing: Literal["packed", "document", "packed-documents"] = Field(
        "packed",
        description="packed: documents concatenated and cut every max_len tokens; document: every document "
        "starts a new sequence (long ones are split); packed-documents: whole documents share a sequence "
        "while they fit, and attention restarts at every document (no cross-document context, no padding)",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="stop after this many corpus tokens (default: the whole corpus)"
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant",
        description="chat rows: soft labels at the positions that predict the assistant messages (assistant) "
        "or at every position (all); plain text rows keep every position",
    )
    generate: GenerationSettings | None = Field(
        None,
        description="generation capture: the teacher samples `n` completions per prompt and the soft labels along "
        "them are stored (the prompts' positions keep none)",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="the teacher's compute dtype; auto: bfloat16 on CUDA, float32 on CPU. The store records "
        "the one used (teacher.dtype)",
    )

    @model_validator(mode="before")
    @classmethod
    def _counts_only_by_default(cls, data: Any) -> Any:
        # The default store is counts-only (issue 22, docs/results.md): unset, counts_only follows
        # whether the store can be, so `--temperatures 1,2,4` alone keeps log-probs, not an error.
        if isinstance(data, Mapping) and data.get("counts_only") is None:
            fields = cls.model_fields
            mode = data.get("mode", fields["mode"].default)
            temperatures = data.get("temperatures", fields["temperatures"].default)
            try:
                at_one = [float(t) for t in temperatures] == [1.0]
            except (TypeError, ValueError):  # not numbers: the field's own validation says so
                at_one = False
            data = {**data, "counts_only": mode == "sampled" and at_one}
        return data

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, temps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE) for t in temps):
            raise _problem(f"each must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {list(temps)}")
        if len(set(temps)) != len(temps):
            raise _problem(f"must be distinct, got {list(temps)}")
        if 1.0 not in temps:
            raise _problem("must include 1 (stored log-probs are decoded at T=1)")
        return tuple(sorted(temps))

    @model_validator(mode="after")
    def _cross_field_rules(self) -> CaptureSpec:
        problems: list[tuple[str, str]] = []
        defaults = type(self).model_fields
        for name in _MODE_SPECIFIC:
            if name not in _MODE_FIELDS[self.mode] and getattr(self, name) != defaults[name].default:
                owner = next(mode for mode, names in _MODE_FIELDS.items() if name in names)
                problems.append((name, f"applies to mode {owner!r} only (mode is {self.mode!r})"))
        if self.mode == "sampled" and self.counts_only and self.temperatures != (1.0,):
            problems.append(("counts_only", "needs temperatures [1]: without log-probs the T=1 draws cannot be "
                             "re-weighted to another temperature"))
        if self.generate is not None:
            # One sample per sequence, its prompt masked out: the corpus-only settings do not apply.
            for name in ("packing", "train_on", "max_tokens"):
                if getattr(self, name) != defaults[name].default:
                    problems.append((name, "does not apply to a generation capture (one sample per sequence, "
                                     "soft labels on the completion)"))
            if self.generate.max_new_tokens >= self.max_len:
                problems.append(("max_len", f"{self.max_len} leaves no room for a prompt before "
                                 f"max_new_tokens={self.generate.max_new_tokens}"))
        if self.slots > MAX_SLOTS:
            problems.append(("head", f"head + min(k, draws) = {self.slots} slots; at most {MAX_SLOTS}"))
        if problems:
            raise _validation_error(problems, self)
        return self

    @model_serializer(mode="wrap")
    def _without_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Settings the mode ignores (always at their defaults, see above) are left out, and so are
        # head, train_on and dtype at their defaults: job rows and dedup keys written before these
        # fields existed read the same. counts_only stays in every sampled spec: unset it would
        # follow the temperatures (a row from before it was written without false: `job_capture`).
        data = handler(self)
        for name in _MODE_SPECIFIC:
            if name not in _MODE_FIELDS[self.mode] or (name == "head" and not data[name]):
                data.pop(name)
        for name in ("train_on", "generate", "dtype"):
            if data[name] == type(self).model_fields[name].default:
                data.pop(name)
        return data

    @property
    def slots(self) -> int:
        """Ids stored per token: k, or head + min(k, draws) in sampled mode (more draws cannot be distinct)."""
        return self.head + min(self.k, self.draws) if self.mode == "sampled" else self.k

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> CaptureSpec:
        """`model_validate` that raises SpecError (a LogitStoreError) instead of pydantic's error."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise SpecError.from_validation(e) from None

    def check_teacher(
        self, *, logits_width: int | None = None, context_length: int | None = None, dtype: str | None = None
    ) -> None:
        """The rules that need the teacher: no more slots than it has ids, no sequence longer
        than its context (past its trained positions its soft labels are silently wrong), and
        the dtype asked for. None skips a check (the context length is read before the weights load)."""
        problems = []
        if dtype is not None and self.dtype not in ("auto", dtype):
            problems.append(("dtype", f"{self.dtype} asked for, but the teacher was loaded in {dtype}"))
        if logits_width is not None and self.slots > logits_width:
            name = "head" if self.head else "k"
            problems.append((name, f"{self.slots} slots per token exceed the teacher's logits width {logits_width}"))
        if context_length is not None and self.max_len > context_length:
            problems.append(("max_len", f"{self.max_len} tokens exceed the teacher's context length "
                             f"{context_length}; its soft labels past that are not trustworthy"))
        if problems:
            raise SpecError(problems)

    def stored(self, *, logp_codec: dict[str, Any], chunk_tokens: int, chat: bool = False) -> CaptureSettings:
        """The store's capture metadata: the on-disk names, with `k` = the slot width; `train_on`
        only when the corpus had chat rows (`chat`), the only ones it applies to."""
        sampled = self.mode == "sampled"
        generated = self.generate is not None
        return CaptureSettings(
            mode=self.mode,
            k=self.slots,
            coverage=self.coverage if self.mode == "adaptive" else None,
            draws=self.draws if sampled else None,
            seed=self.seed if sampled else None,
            head=self.head,
            counts_only=self.counts_only,
            temperatures=self.temperatures,
            max_len=self.max_len,
            packing="document" if generated else self.packing,
            logp_codec=logp_codec,
            chunk_tokens=chunk_tokens,
            train_on="completion" if generated else self.train_on if chat else None,
            generate=self.generate,
        )


@dataclass(frozen=True)
class CaptureTuning:
    """How the engine cuts and encodes the work; what is captured is the CaptureSpec
    (logitstore/spec.py). Nothing here changes a stored value except `batch_tokens`, whose
    padding can move a teacher's logits by float rounding."""

    unit_tokens: int = 262_144  # tokens per work unit = per segment (one shard per array) = resume step
    chunk_tokens: int = 4096  # rows per Zarr chunk inside a shard
    batch_tokens: int = 8192  # tokens (padded) per teacher forward; raised to max_len when smaller
    # Logit rows materialized at once: one fp32 [row_chunk, V] block plus the reduction's ~3 buffers
    # (of as many rows on CUDA, of CPU_REDUCE_ROWS on CPU), well under the bare forward's
    # [batch_tokens, V] logits (measured: benchmarks/capture.py).
    row_chunk: int = 512
    # One mantissa bit less from 4 nats on: -16% bytes for topk_logp, KL still < 1e-4 (codecs.py).
    logp_codec: LogProbCodec = field(default_factory=lambda: LogProbCodec(tail_mantissa_bits=6))

    def __post_init__(self) -> None:
        for name in ("unit_tokens", "chunk_tokens", "batch_tokens", "row_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"CaptureTuning.{name} must be >= 1, got {getattr(self, name)}")


def _validation_error(problems: list[tuple[str, str]], spec: CaptureSpec) -> ValidationError:
    # A ValidationError raised in a validator keeps its own locations, so each cross-field
    # problem points at its field (in the API: ["body", field]) instead of at the whole model.
    details = [
        InitErrorDetails(type=_problem(msg), loc=(name,), input=getattr(spec, name))
        for name, msg in problems
    ]
    return ValidationError.from_exception_data(type(spec).__name__, details)


def _problem(msg: str) -> PydanticCustomError:
    return PydanticCustomError("capture_spec", msg)  # pydantic would prefix a ValueError's message with "Value error, "
