"""CaptureSpec: the one definition of the capture settings, its rules, and what it stores."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from logitstore.cli import _parser
from logitstore.errors import LogitStoreError
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
        ({"mode": "topk", "head": 4}, "head", "applies to mode 'sampled' only (mode is 'topk')"),
        ({"coverage": 0.5}, "coverage", "applies to mode 'adaptive' only"),
        ({"mode": "adaptive", "draws": 10}, "draws", "applies to mode 'sampled' only"),
        ({"mode": "topk", "counts_only": True}, "counts_only", "applies to mode 'sampled' only"),
        ({"mode": "sampled", "counts_only": True, "temperatures": [1, 2, 4]}, "counts_only", "needs temperatures [1]"),
        ({"mode": "sampled", "head": 4090, "k": 64, "draws": 50}, "head", "4140 slots; at most 4096"),
        ({"head": 4090}, "head", "4154 slots; at most 4096"),  # the default draws: 64
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
    spec = CaptureSpec.parse({"mode": "topk", "coverage": 0.99, "draws": 64, "seed": 0, "head": 0,
                              "counts_only": False})
    assert spec == CaptureSpec(mode="topk")
    assert CaptureSpec.parse({"mode": "sampled", "coverage": 0.99}) == CaptureSpec()


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
    # Only what the mode reads is written, head only when set (older job rows had none), and counts_only
    # in every sampled spec (unset, it would follow the temperatures; job_capture reads a row without it as false).
    unused = {"topk": {"coverage", "draws", "seed", "head", "counts_only"}, "adaptive": {"draws", "seed", "head",
              "counts_only"}, "sampled": {"coverage"}}[spec.mode]
    assert not unused & dumped.keys()
    assert ("head" in dumped) == bool(spec.head) and ("counts_only" in dumped) == (spec.mode == "sampled")
    if spec.mode == "sampled":
        assert dumped["counts_only"] is spec.counts_only
    assert ("dtype" in dumped) == (spec.dtype != "auto")


@pytest.mark.parametrize(
    ("given", "slots"),
    [({"mode": "topk", "k": 16}, 16), ({"mode": "adaptive", "k": 16}, 16), ({"k": 64}, 64), ({"k": 16}, 16),
     ({"mode": "sampled", "k": 64, "draws": 20}, 20),
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
    assert stored.counts_only is spec.counts_only is (spec.mode == "sampled")  # unset, at the default T=[1]


def test_the_teacher_bounds_the_slots_and_the_sequence_length():
    CaptureSpec(mode="topk", k=100, max_len=512).check_teacher(logits_width=100, context_length=512)
    with pytest.raises(SpecError, match="k: 101 slots per token exceed the teacher's logits width 100"):
        CaptureSpec(mode="topk", k=101).check_teacher(logits_width=100)
    CaptureSpec(k=101).check_teacher(logits_width=64)  # sampled: min(k, draws=64) slots
    with pytest.raises(SpecError, match="k: 64 slots per token exceed the teacher's logits width 63"):
        CaptureSpec().check_teacher(logits_width=63)
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
        if info.annotation is bool:  # --x / --no-x, unset by default: the spec decides (counts_only: by the mode)
            assert isinstance(actions[name], argparse.BooleanOptionalAction) and actions[name].default is None
            assert actions[name].option_strings == [f"--{name.replace('_', '-')}", f"--no-{name.replace('_', '-')}"]
        else:
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


def test_the_default_spec_is_sampled_counts_only_at_t1():
    """The default store (issue 22): 64 draws of at most 64 ids at T=1, counts without log-probs."""
    spec = CaptureSpec()
    assert (spec.mode, spec.draws, spec.k, spec.seed, spec.head) == ("sampled", 64, 64, 0, 0)
    assert spec.temperatures == (1.0,) and spec.counts_only is True and spec.slots == 64
    assert CaptureSpec.parse({}) == spec == CaptureSpec.parse({"counts_only": None})
    assert spec.model_dump(mode="json")["counts_only"] is True


@pytest.mark.parametrize(
    ("given", "counts_only"),
    [
        ({"temperatures": [1, 2, 4]}, False),  # log-probs are needed to re-weight the draws: no error
        ({"temperatures": [1.0]}, True),
        ({"temperatures": [1]}, True),
        ({"mode": "sampled", "draws": 20, "head": 4}, True),  # a head keeps its log-probs either way
        ({"mode": "sampled", "temperatures": [2, 1], "counts_only": None}, False),
        ({"mode": "topk"}, False),
        ({"mode": "adaptive"}, False),
        ({"counts_only": False}, False),
        ({"counts_only": True}, True),
    ],
)
def test_counts_only_unset_follows_the_mode_and_the_temperatures(given, counts_only):
    spec = CaptureSpec.parse(given)
    assert spec.counts_only is counts_only
    assert CaptureSpec.model_validate(given) == spec == CaptureSpec(**given)


def test_a_topk_spec_dumps_no_counts_only():
    spec = CaptureSpec.parse({"mode": "topk"})
    assert spec.counts_only is False and spec.temperatures == (1.0,)
    dumped = spec.model_dump(mode="json")
    assert "counts_only" not in dumped and dumped["mode"] == "topk"
    assert CaptureSpec.parse(dumped) == spec


def test_counts_only_asked_for_with_other_temperatures_is_still_refused():
    with pytest.raises(SpecError) as e:
        CaptureSpec.parse({"counts_only": True, "temperatures": [1, 2]})
    assert [name for name, _ in e.value.problems] == ["counts_only"]
    assert "needs temperatures [1]" in str(e.value)


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"counts_only": False},  # T=[1] with its log-probs (--no-counts-only): the dump must keep the false
        {"temperatures": [1, 2, 4]},
        {"draws": 9, "seed": 3, "head": 2, "k": 11},
        {"draws": 9, "head": 2, "k": 11, "counts_only": False},
    ],
)
def test_a_sampled_dump_round_trips_with_its_counts_only(given):
    spec = CaptureSpec.parse(given)
    dumped = spec.model_dump(mode="json")
    assert dumped["mode"] == "sampled" and dumped["counts_only"] is spec.counts_only
    assert CaptureSpec.parse(dumped) == spec
    assert CaptureSpec.model_validate_json(spec.model_dump_json()) == spec


def test_no_counts_only_flag_gives_a_sampled_t1_spec_with_logprobs():
    from logitstore.cli import _spec_from_flags

    capture = _parser()._subparsers._group_actions[0].choices["capture"]
    base = ["--teacher", "t", "--corpus", "c.txt", "--out", "o"]
    default = _spec_from_flags(capture.parse_args(base))
    assert default == CaptureSpec() and default.counts_only
    with_logp = _spec_from_flags(capture.parse_args([*base, "--no-counts-only"]))
    assert (with_logp.mode, with_logp.temperatures, with_logp.counts_only) == ("sampled", (1.0,), False)
    assert CaptureSpec.parse(with_logp.model_dump(mode="json")) == with_logp
    three = _spec_from_flags(capture.parse_args([*base, "--temperatures", "1,2,4"]))
    assert (three.mode, three.temperatures, three.counts_only) == ("sampled", (1.0, 2.0, 4.0), False)
    topk = _spec_from_flags(capture.parse_args([*base, "--mode", "topk"]))
    assert (topk.mode, topk.counts_only) == ("topk", False)
    with pytest.raises(LogitStoreError, match="--counts-only: needs temperatures"):
        _spec_from_flags(capture.parse_args([*base, "--counts-only", "--temperatures", "1,2"]))


def test_capture_help_shows_the_default_store():
    capture = _parser()._subparsers._group_actions[0].choices["capture"]
    text = " ".join(capture.format_help().split())  # argparse wraps lines where the width says
    for flag, default in (("--mode", "sampled"), ("--draws", "64"), ("--k", "64"), ("--temperatures", "1")):
        action = next(a for a in capture._actions if flag in a.option_strings)
        assert f"(default: {default})" in " ".join(action.help.split()), flag
    assert "(default: 1,2,4)" not in text and "(default: 50)" not in text and "(default: topk)" not in text
    assert "[--counts-only | --no-counts-only]" in text


def test_the_schema_gives_counts_only_no_fixed_default():
    """Its default follows the mode and the temperatures: a client generated from the OpenAPI schema
    must not read a fixed false (and send it, getting log-probs instead of the default store)."""
    field = CaptureSpec.model_json_schema()["properties"]["counts_only"]
    assert "default" not in field and {"type": "null"} in field["anyOf"]
    assert CaptureSpec.model_validate_json('{"counts_only": null}').counts_only is True
