"""The store's self-description: one validated object under the root group's attributes.

Everything a reader needs to interpret the arrays (teacher, tokenizer, capture settings,
corpus, how many work units were planned) lives here, so a store found on a disk years
later still says what it is. Validated on write and on read.
"""

from __future__ import annotations

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

from logitstore.errors import FormatVersionError, MetadataError, NotAStoreError

FORMAT_VERSION = 2  # what this version writes; docs/format.md
READABLE_FORMAT_VERSIONS = (1, 2)
ATTRIBUTE_KEY = "logitstore"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherInfo(_Frozen):
    """The model whose soft labels the store holds."""

    name: str
    source: str = Field(description="hub id, local directory or GGUF file it was loaded from")
    weights_sha256: str = Field(description="sha256 over the weight tensors (names, dtypes, shapes, bytes)")
    dtype: str = Field(description="dtype the forward pass ran in, e.g. float32 or bfloat16")


class TokenizerInfo(_Frozen):
    """The tokenizer; a student must share it (same fingerprint) to train from the store."""

    name: str
    fingerprint: str = Field(description="sha256 of the canonical vocab, merges and special tokens")
    vocab_size: int = Field(gt=0, description="tokens the tokenizer can produce")
    logits_width: int = Field(gt=0, description="the teacher's output width; may be padded beyond vocab_size")
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    chat_template_sha256: str | None = Field(
        default=None,
        description="sha256 of the chat template the corpus's chat rows were rendered with; only in stores "
        "with chat rows, whose students must render chats the same way",
    )

    @model_serializer(mode="wrap")
    def _template_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)  # written only when set: older readers read every store without chat rows
        if self.chat_template_sha256 is None:
            data.pop("chat_template_sha256", None)
        return data


class GenerationSettings(_Frozen):
    """How a generated store's completions were sampled from the teacher (docs/capture.md,
    generation); the same object is the capture spec's `generate`."""

    n: int = Field(4, ge=1, le=256, description="samples per prompt")
    max_new_tokens: int = Field(256, ge=1, le=131_072, description="longest completion, in tokens")
    temperature: float = Field(0.8, gt=0, le=100, description="sampling temperature (not a stored one)")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: the fewest likeliest ids reaching top_p")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the sampling; each sample's draws depend on its "
                      "prompt, sample index and step only")


class CaptureSettings(_Frozen):
    """How the soft labels were taken and encoded."""

    mode: Literal["topk", "adaptive", "sampled"] = Field(
        default="topk",
        description="topk: the k most likely ids; adaptive: per token the fewest ids (at most k) whose "
        "T=1 mass reaches `coverage`; sampled: the distinct ids of `draws` seeded draws (at most k), with counts",
    )
    k: int = Field(gt=0, le=4096, description="slots per token (the cap in adaptive and sampled modes)")
    coverage: float | None = Field(default=None, gt=0, le=1, description="adaptive mode only")
    draws: int | None = Field(default=None, gt=0, le=255, description="sampled mode only: draws per token")
    seed: int | None = Field(default=None, ge=0, description="sampled mode only: seed of the draws")
    head: int = Field(
        default=0,
        ge=0,
        description="sampled mode only: the first `head` slots hold the teacher's top-`head` ids (exact, no "
        "counts) and the draws come from the rest of the distribution, the tail",
    )
    counts_only: bool = Field(
        default=False,
        description="sampled mode at T=1 only: the drawn ids and counts without their log-probs; each token's "
        "drawn slots are then in id_table order, not the teacher's rank order. A head keeps its ids' log-probs "
        "(topk_logp holds those alone): they weight the head and give the tail's mass",
    )
    temperatures: tuple[float, ...] = Field(
        min_length=1, description="temperatures whose full-vocabulary lse is stored"
    )
    max_len: int = Field(gt=0, description="longest sequence the teacher saw, in tokens")
    packing: Literal["packed", "document", "packed-documents"] = Field(
        description="packed: documents concatenated and cut every max_len tokens; "
        "document: every document starts a new sequence (long ones are split); "
        "packed-documents: whole documents share a sequence while they fit, each attending only to itself "
        "(positions restart at every piece of the manifest)"
    )
    logp_codec: dict[str, Any] = Field(description="the LogProbCodec's to_dict()")
    chunk_tokens: int = Field(gt=0, description="tokens per Zarr chunk (inner chunk of a shard)")
    train_on: Literal["assistant", "all", "completion"] | None = Field(
        default=None,
        description="stores with chat rows only: which of their positions have soft labels (assistant: those "
        "predicting an assistant token; completion, a generated store: those predicting a generated token); a "
        "position without them stores no slots (row_len 0) and lse 0",
    )
    generate: GenerationSettings | None = Field(
        default=None, description="a generated store: the teacher wrote the completions (one per sequence)"
    )

    @field_validator("temperatures")
    @classmethod
    def _positive_distinct(cls, temps: tuple[float, ...]) -> tuple[float, ...]:
        if any(t <= 0 for t in temps):
            raise ValueError(f"temperatures must be positive, got {list(temps)}")
        if len(set(temps)) != len(temps):
            raise ValueError(f"temperatures must be distinct, got {list(temps)}")
        if 1.0 not in temps:
            raise ValueError("temperature 1.0 must be captured: stored log-probs are decoded at T=1")
        return temps

    @model_serializer(mode="wrap")
    def _new_fields_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only when set: readers from before these fields existed read every other store.
        data = handler(self)
        if not self.counts_only:
            data.pop("counts_only", None)
        if not self.head:
            data.pop("head", None)
        for name in ("train_on", "generate"):
            if getattr(self, name) is None:
                data.pop(name, None)
        return data

    @model_validator(mode="after")
    def _mode_fields(self) -> CaptureSettings:
        needed = {"topk": set(), "adaptive": {"coverage"}, "sampled": {"draws", "seed"}}[self.mode]
        for name in ("coverage", "draws", "seed"):
            given = getattr(self, name) is not None
            if given != (name in needed):
                raise ValueError(f"{name} is {'required' if not given else 'not allowed'} in mode {self.mode!r}")
        if self.counts_only and (self.mode != "sampled" or self.temperatures != (1.0,)):
            # Without log-probs the T=1 draws cannot be re-weighted to another temperature.
            raise ValueError("counts_only needs mode 'sampled' and temperatures (1.0,)")
        if self.head and (self.mode != "sampled" or self.head >= self.k):
            raise ValueError(f"head {self.head} needs mode 'sampled' and fewer than k={self.k} slots")
        return self

    @property
    def logp_slots(self) -> int | None:
        """How many of each token's first stored slots have a log-prob in the store: all of them
        (None), the head's alone (a counts_only store with a head), or none (0)."""
        if not self.counts_only:
            return None
        return self.head


class CorpusInfo(_Frozen):
    """What the teacher read."""

    fingerprint: str = Field(description="sha256 over the documents' texts, in order")
    sources: tuple[str, ...]
    documents: int = Field(ge=0)
    tokens: int = Field(ge=0, description="tokens planned for capture (after --max-tokens)")
    sequences: int = Field(ge=0)


class StoreMeta(_Frozen):
    """The root attributes of a store."""

    format_version: int = FORMAT_VERSION
    producer: str
    created_at: str
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    capture: CaptureSettings
    corpus: CorpusInfo
    num_segments: int = Field(ge=0, description="work units planned; segment i commits as commits/i")

    def to_attrs(self) -> dict[str, Any]:
        return {ATTRIBUTE_KEY: self.model_dump(mode="json")}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str) -> StoreMeta:
        """Validate a root group's attributes; `where` names the store in error messages."""
        raw = attrs.get(ATTRIBUTE_KEY)
        if not isinstance(raw, dict):
            raise NotAStoreError(f"{where}: the root group has no '{ATTRIBUTE_KEY}' attributes; not a logitstore store")
        version = raw.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            readable = ", ".join(map(str, READABLE_FORMAT_VERSIONS))
            raise FormatVersionError(
                f"{where}: store format_version {version!r} is not supported by this reader "
                f"(it reads versions {readable}); upgrade logitstore or re-capture the store"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise MetadataError(f"{where}: invalid store metadata: {problems}") from None


def meta_differences(old: StoreMeta, new: StoreMeta) -> list[str]:
    """Human-readable differences between two stores' settings (ignoring when/by what they were made)."""
    ignore = {"created_at", "producer"}
    a = _flatten({k: v for k, v in old.model_dump(mode="json").items() if k not in ignore})
    b = _flatten({k: v for k, v in new.model_dump(mode="json").items() if k not in ignore})
    keys = sorted(a.keys() | b.keys())
    return [f"{key}: {a.get(key)!r} != {b.get(key)!r}" for key in keys if a.get(key) != b.get(key)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
