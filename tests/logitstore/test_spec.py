"""CaptureSpec: the one definition of the capture settings, its rules, and what it stores."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from logitstore.cli import _parser
from logitstore.schema import CaptureSettings
from logitstore.spec import MAX_SLOTS, CaptureSpec, CaptureTuning, SpecError


@pytest.mark.parametrize(
    ("given", "field", "message"),
    [
        ({"temperatures": [1, 1]}, "temperatures", "must be distinct"),
        ({"temperatures": [1, 1e-300]}, "temperatures", "each must be in [0.01, 100]"),
        ({"temperatures": [1, float("inf")]}, "temperatures.1", "finite number"),
        ({"temperatures": [2, 4]}, "temperatures", "must include 1"),
        ({"temperatures": []}, "temperatures", "at least 1 item"),
        ({"k": 0}, "k", "greater than or equal to 1"),
        ({"k": MAX_SLOTS + 1}, "k", "less than or equal to 4096"),
        ({"coverage": float("nan"), "mode": "adaptive"}, "coverage", "finite number"),
        ({"draws": 256, "mode": "sampled"}, "draws", "less than or equal to 255"),
        ({"head": 4}, "head", "applies to mode 'sampled' only (mode is 'topk')"),
        ({"coverage": 0.5}, "coverage", "applies to mode 'adaptive' only"),
        ({"mode": "adaptive", "draws": 10}, "draws", "applies to mode 'sampled' only"),
        ({"counts_only": True}, "counts_only", "applies to mode 'sampled' only"),
        ({"mode": "sampled", "counts_only": True}, "counts_only", "needs temperatures [1]"),
        ({"mode": "sampled", "head": 4090, "k": 64}, "head", "4140 slots; at most 4096"),
        ({"packing": "interleaved"}, "packing", "'packed', 'document' or 'packed-documents'"),
        ({"text_field": "body"}, "text_field", "Extra inputs are not permitted"),
    ],
)
def test_each_rule_names_its_field(given, field, message):
    with pytest.raises(SpecError) as e:
        CaptureSpec.parse(given)
    assert [name for name, _ in e.value.problems] == [field]
    assert message in e.value.problems[0][1] and str(e.value).startswith(f"{field}: ")
    # The same problem through pydantic points at the field too (the API's ["body", field]).
    with pytest.raises(ValidationError) as ve:
        CaptureSpec.model_validate(given)
    assert ".".join(map(str, ve.value.errors()[0]["loc"])) == field


def test_a_setting_the_mode_ignores_may_stay_at_its_default():
    spec = CaptureSpec.parse({"mode": "topk", "coverage": 0.99, "draws": 50, "seed": 0, "head": 0})
    assert spec == CaptureSpec()


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"mode": "adaptive", "coverage": 0.8, "k": 32},
        {"mode": "sampled", "draws": 20, "seed": 7, "k": 16},
        {"mode": "sampled", "head": 8, "k": 50, "temperatures": [4, 1]},
        {"mode": "sampled", "counts_only": True, "temperatures": [1], "max_tokens": 100, "packing": "document"},
        {"mode": "sampled", "head": 1, "draws": 16, "k": 17, "counts_only": True, "temperatures": [1]},
        {"dtype": "bfloat16"},
    ],
)
def test_dump_is_canonical_and_round_trips(given):
    spec = CaptureSpec.parse(given)
    dumped = spec.model_dump(mode="json")
    assert CaptureSpec.parse(dumped) == spec
    assert dumped["temperatures"] == sorted(dumped["temperatures"])
    # Only what the mode reads is written, and head / counts_only only when set (older job rows had neither).
    unused = {"topk": {"coverage", "draws", "seed", "head", "counts_only"}, "adaptive": {"draws", "seed", "head",
              "counts_only"}, "sampled": {"coverage"}}[spec.mode]
    assert not unused & dumped.keys()
    assert ("head" in dumped) == bool(spec.head) and ("counts_only" in dumped) == spec.counts_only
    assert ("dtype" in dumped) == (spec.dtype != "auto")


@pytest.mark.parametrize(
    ("given", "slots"),
    [({"k": 16}, 16), ({"mode": "adaptive", "k": 16}, 16), ({"mode": "sampled", "k": 64, "draws": 20}, 20),
     ({"mode": "sampled", "k": 50, "draws": 50, "head": 8}, 58)],
)
def test_stored_metadata_keeps_the_format_names_with_k_the_slot_width(given, slots):
    spec = CaptureSpec.parse(given)
    tuning = CaptureTuning()
    stored = spec.stored(logp_codec=tuning.logp_codec.to_dict(), chunk_tokens=tuning.chunk_tokens)
    assert isinstance(stored, CaptureSettings) and stored.k == spec.slots == slots
    assert (stored.mode, stored.head, stored.temperatures, stored.max_len) == (
        spec.mode, spec.head, spec.temperatures, spec.max_len)
    assert (stored.coverage is not None) == (spec.mode == "adaptive")
    assert (stored.draws, stored.seed) == ((spec.draws, spec.seed) if spec.mode == "sampled" else (None, None))


def test_the_teacher_bounds_the_slots_and_the_sequence_length():
    CaptureSpec(k=100, max_len=512).check_teacher(logits_width=100, context_length=512)
    with pytest.raises(SpecError, match="k: 101 slots per token exceed the teacher's logits width 100"):
        CaptureSpec(k=101).check_teacher(logits_width=100)
    with pytest.raises(SpecError, match="head: 30 slots"):
        CaptureSpec(mode="sampled", head=10, k=20).check_teacher(logits_width=25)
    with pytest.raises(SpecError) as e:
        CaptureSpec(max_len=513).check_teacher(context_length=512)
    assert e.value.problems == [("max_len", "513 tokens exceed the teacher's context length 512; its soft labels "
                                 "past that are not trustworthy")]
    CaptureSpec(max_len=10**5).check_teacher(logits_width=64)  # an unknown context length is not checked
    CaptureSpec().check_teacher(dtype="bfloat16")  # auto takes whatever the teacher was loaded in
    with pytest.raises(SpecError, match="dtype: float32 asked for, but the teacher was loaded in bfloat16"):
        CaptureSpec(dtype="float32").check_teacher(dtype="bfloat16")


def test_every_spec_field_is_a_capture_flag_with_the_spec_default():
    """`generate` excepted: its fields are `logitstore generate`'s own flags (below)."""
    capture = _parser()._subparsers._group_actions[0].choices["capture"]
    actions = {a.dest: a for a in capture._actions}
    for name, info in CaptureSpec.model_fields.items():
        if name == "generate":
            assert name not in actions
            continue
        assert name in actions, f"no --{name.replace('_', '-')} flag"
        assert actions[name].default == info.default
        assert info.description and info.description.split()[0] in actions[name].help


def test_every_generation_field_is_a_generate_flag_with_its_default():
    from logitstore.schema import GenerationSettings

    generate = _parser()._subparsers._group_actions[0].choices["generate"]
    actions = {a.dest: a for a in generate._actions}
    for name, info in GenerationSettings.model_fields.items():
        assert actions[f"gen_{name}"].default == info.default
    # The sampled mode's draws keep a flag of their own beside the sampling's --seed.
    assert actions["seed"].option_strings == ["--draws-seed"] and actions["gen_seed"].option_strings == ["--seed"]
    for name in ("packing", "train_on", "max_tokens"):  # one sample per sequence: they do not apply
        assert name not in actions


@pytest.mark.parametrize("name", ["unit_tokens", "chunk_tokens", "batch_tokens", "row_chunk"])
def test_tuning_refuses_non_positive_sizes(name):
    with pytest.raises(ValueError, match=f"CaptureTuning.{name} must be >= 1"):
        CaptureTuning(**{name: 0})
