"""StoreMeta: validation on write and on read, and the differences a resume refuses."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError
from store_helpers import make_meta

from logitstore.errors import FormatVersionError, MetadataError, NotAStoreError
from logitstore.schema import ATTRIBUTE_KEY, FORMAT_VERSION, CaptureSettings, StoreMeta, meta_differences


def capture_kwargs(**overrides) -> dict:
    base = make_meta(num_segments=1).capture.model_dump()
    base.update(overrides)
    return base


def test_meta_roundtrip_through_attrs() -> None:
    meta = make_meta(num_segments=3, temperatures=(2.0, 1.0, 0.5))
    attrs = meta.to_attrs()
    assert set(attrs) == {ATTRIBUTE_KEY}
    assert attrs[ATTRIBUTE_KEY]["format_version"] == FORMAT_VERSION
    again = StoreMeta.from_attrs(copy.deepcopy(attrs), "somewhere")
    assert again == meta
    # counts_only and head are written only when set, so readers from before them read this store.
    assert not {"counts_only", "head"} & attrs[ATTRIBUTE_KEY]["capture"].keys()
    counts_only = capture_kwargs(mode="sampled", draws=9, seed=1, temperatures=(1.0,), counts_only=True)
    settings = CaptureSettings(**counts_only)
    assert settings.model_dump()["counts_only"] is True
    assert CaptureSettings.model_validate(settings.model_dump()) == settings
    assert again.capture.temperatures == (2.0, 1.0, 0.5)
    assert meta_differences(meta, again) == []


@pytest.mark.parametrize(
    ("temperatures", "match"),
    [
        ((2.0, 4.0), "temperature 1.0 must be captured"),
        ((1.0, 0.0), "positive"),
        ((1.0, -2.0), "positive"),
        ((1.0, 2.0, 2.0), "distinct"),
        ((1.0, 1.0), "distinct"),
        ((), "at least 1"),
    ],
)
def test_temperatures_validated(temperatures: tuple, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        CaptureSettings(**capture_kwargs(temperatures=temperatures))


def test_temperature_one_as_int_accepted() -> None:
    settings = CaptureSettings(**capture_kwargs(temperatures=(1, 3)))
    assert settings.temperatures == (1.0, 3.0)


@pytest.mark.parametrize(
    "overrides",
    [{"k": 0}, {"k": 5000}, {"max_len": 0}, {"chunk_tokens": 0}, {"packing": "ragged"}, {"mode": "sampled"},
     {"counts_only": True, "temperatures": (1.0,)},  # topk mode
     {"counts_only": True, "mode": "sampled", "draws": 50, "seed": 0, "temperatures": (1.0, 2.0)},
     {"head": 4},  # topk mode
     {"head": 16, "mode": "sampled", "draws": 50, "seed": 0}],  # no slot left for the draws (k=16)
)
def test_capture_fields_validated(overrides: dict) -> None:
    with pytest.raises(ValidationError):
        CaptureSettings(**capture_kwargs(**overrides))


def test_extra_fields_forbidden() -> None:
    with pytest.raises(ValidationError, match="extra"):
        CaptureSettings(**capture_kwargs(surprise=1))
    raw = make_meta(num_segments=1).model_dump(mode="json")
    raw["teacher"]["license"] = "mit"
    with pytest.raises(ValidationError, match="extra"):
        StoreMeta.model_validate(raw)


def test_frozen() -> None:
    meta = make_meta(num_segments=1)
    with pytest.raises(ValidationError, match="frozen"):
        meta.num_segments = 2  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        meta.capture.k = 2  # type: ignore[misc]


@pytest.mark.parametrize("attrs", [{}, {"other": 1}, {ATTRIBUTE_KEY: "v1"}, {ATTRIBUTE_KEY: None}])
def test_from_attrs_not_a_store(attrs: dict) -> None:
    with pytest.raises(NotAStoreError, match=r"^/data/x: .*not a logitstore store"):
        StoreMeta.from_attrs(attrs, "/data/x")


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_from_attrs_unknown_version(version: object) -> None:
    raw = make_meta(num_segments=1).model_dump(mode="json")
    if version is None:
        del raw["format_version"]
    else:
        raw["format_version"] = version
    with pytest.raises(FormatVersionError) as info:
        StoreMeta.from_attrs({ATTRIBUTE_KEY: raw}, "/data/x")
    msg = str(info.value)
    assert repr(version) in msg
    assert f"reads versions 1, {FORMAT_VERSION}" in msg
    assert "/data/x" in msg


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["capture"].update(k=-3), "k"),
        (lambda r: r["capture"].update(temperatures=[2.0]), "temperature 1.0"),
        (lambda r: r.pop("teacher"), "teacher"),
        (lambda r: r["tokenizer"].pop("fingerprint"), "fingerprint"),
        (lambda r: r.update(num_segments="many"), "num_segments"),
        (lambda r: r.update(bonus=True), "bonus"),
    ],
)
def test_from_attrs_bad_fields(mutate, field: str) -> None:
    raw = make_meta(num_segments=1).model_dump(mode="json")
    mutate(raw)
    with pytest.raises(MetadataError, match="invalid store metadata") as info:
        StoreMeta.from_attrs({ATTRIBUTE_KEY: raw}, "/data/x")
    assert field in str(info.value)
    assert str(info.value).startswith("/data/x: ")


def test_meta_differences_names_fields() -> None:
    a = make_meta(num_segments=4, k=16)
    b = make_meta(num_segments=4, k=32, temperatures=(1.0, 2.0))
    diffs = meta_differences(a, b)
    assert any(d.startswith("capture.k: 16 != 32") for d in diffs)
    assert any(d.startswith("capture.temperatures: ") for d in diffs)
    assert len(diffs) == 2


def test_meta_differences_ignores_when_and_by_what() -> None:
    a = make_meta(num_segments=4)
    b = a.model_copy(update={"created_at": "2030-01-01T00:00:00+00:00", "producer": "logitstore 9.9"})
    assert meta_differences(a, b) == []
    c = a.model_copy(update={"num_segments": 5})
    assert meta_differences(a, c) == ["num_segments: 4 != 5"]
    d = a.model_copy(update={"teacher": a.teacher.model_copy(update={"weights_sha256": "f" * 64})})
    (diff,) = meta_differences(a, d)
    assert diff.startswith("teacher.weights_sha256: ")
