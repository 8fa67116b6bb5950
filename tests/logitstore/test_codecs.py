"""LogProbCodec (minifloat log-probs) and build_id_table (per-segment id tables)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from logitstore.codecs import LogProbCodec, build_id_table
from logitstore.spec import CaptureTuning

# Every valid corner of the config space we care about: the default, coarse, fine, and
# the finest mantissas that still leave >= 1e4 nats of range.
CODECS = [
    LogProbCodec(),
    LogProbCodec(mantissa_bits=1, min_exponent=-126),
    LogProbCodec(mantissa_bits=4, min_exponent=-24),
    LogProbCodec(mantissa_bits=8, min_exponent=-24),
    LogProbCodec(mantissa_bits=10, min_exponent=-24),
    LogProbCodec(mantissa_bits=11, min_exponent=-16),
    LogProbCodec(mantissa_bits=12, min_exponent=0),
    # A coarser tail: the capture default, and extremes of where it starts and how coarse it is.
    LogProbCodec(tail_mantissa_bits=6),
    LogProbCodec(mantissa_bits=8, tail_mantissa_bits=3, tail_min_exponent=0),
    LogProbCodec(mantissa_bits=4, min_exponent=-24, tail_mantissa_bits=1, tail_min_exponent=-24),
    LogProbCodec(mantissa_bits=10, min_exponent=-24, tail_mantissa_bits=10, tail_min_exponent=5),
]
codec_ids = [f"m{c.mantissa_bits}e{c.min_exponent}t{c.tail_mantissa_bits}@{c.tail_min_exponent}" for c in CODECS]

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

f32_logp = st.floats(min_value=-200.0, max_value=0.0, width=32, allow_nan=False)
f64_logp = st.floats(min_value=-200.0, max_value=0.0, allow_nan=False)


def reference_bound(codec: LogProbCodec, logp: np.ndarray) -> np.ndarray:
    """The documented bound, computed independently of codec.max_abs_error: half a minifloat
    step, plus the float32 rounding a float64 input goes through first."""
    mag = np.abs(np.asarray(logp, dtype=np.float64))
    tiny = 2.0**codec.min_exponent
    bits = np.full(mag.shape, float(codec.mantissa_bits))
    if codec.tail_mantissa_bits is not None:
        bits[mag >= 2.0**codec.tail_min_exponent] = codec.tail_mantissa_bits
    return np.where(mag < tiny, tiny, mag * 2.0 ** -(bits + 1) + mag * 2.0**-24)


def roundtrip(codec: LogProbCodec, logp: np.ndarray) -> np.ndarray:
    codes = codec.encode(logp)
    assert codes.dtype == np.uint16
    assert codes.shape == np.shape(logp)
    out = codec.decode(codes)
    assert out.dtype == np.float32
    return out


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
@SETTINGS
@given(values=hnp.arrays(np.float32, st.integers(1, 64), elements=f32_logp))
def test_roundtrip_error_bound_float32(codec: LogProbCodec, values: np.ndarray) -> None:
    out = roundtrip(codec, values)
    err = np.abs(out.astype(np.float64) - values.astype(np.float64))
    assert np.all(out <= 0)
    assert np.all(np.isfinite(out))
    assert np.all(err <= codec.max_abs_error(values))
    np.testing.assert_array_equal(codec.max_abs_error(values), reference_bound(codec, values))


@pytest.mark.parametrize("codec", [CODECS[0], CODECS[3]], ids=["m7", "m8"])
@SETTINGS
@given(values=hnp.arrays(np.float64, st.integers(1, 64), elements=f64_logp))
def test_roundtrip_error_bound_float64_input(codec: LogProbCodec, values: np.ndarray) -> None:
    # float64 inputs go through float32 first; for mantissas well below float32's 23 bits
    # that extra rounding stays inside the documented bound.
    out = roundtrip(codec, values)
    err = np.abs(out.astype(np.float64) - values)
    assert np.all(err <= codec.max_abs_error(values))


def test_error_bound_float64_input_fine_mantissa() -> None:
    codec = LogProbCodec(mantissa_bits=12, min_exponent=0)
    # Just below a rounding midpoint: float32 rounds it onto the midpoint, the codec then rounds away.
    midpoint = 8.0 * (1 + 0.5 * 2.0**-codec.mantissa_bits)
    x = np.array([-(midpoint - 2.0**-22)])
    err = np.abs(codec.decode(codec.encode(x)).astype(np.float64) - x)
    assert np.all(err <= codec.max_abs_error(x))


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
def test_special_values(codec: LogProbCodec) -> None:
    tiny = 2.0**codec.min_exponent
    values = np.array([-np.inf, -0.0, 0.0, -tiny / 3, -tiny / 1e6, -1e-45, -tiny, -1.0, 1e-7], dtype=np.float32)
    codes = codec.encode(values)
    out = codec.decode(codes)
    # -inf (padding) round-trips exactly as the top code.
    assert codes[0] == codec.inf_code
    assert out[0] == -np.inf
    # Zero of either sign, tiny values and tiny positive noise decode within 2^min_exponent, finite, <= 0.
    rest = out[1:]
    assert np.all(np.isfinite(rest))
    assert np.all(rest <= 0)
    np.testing.assert_array_less(np.abs(rest.astype(np.float64) - np.minimum(values[1:], 0)), tiny * (1 + 1e-12))
    assert out[6] == pytest.approx(-tiny, rel=2.0 ** -(codec.mantissa_bits + 1))
    assert out[7] == pytest.approx(-1.0, rel=2.0 ** -(codec.mantissa_bits + 1))


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
def test_huge_float32_saturates_never_inf(codec: LogProbCodec) -> None:
    f32max = float(np.finfo(np.float32).max)
    mf = codec.max_finite
    values = np.array([-mf, -mf * 1.0001, -min(mf * 2, f32max), -f32max, -1e4], dtype=np.float32)
    codes = codec.encode(values)
    out = codec.decode(codes)
    assert np.all(codes < codec.inf_code)
    assert np.all(np.isfinite(out))
    assert codes[0] == codec.inf_code - 1
    assert np.all(codes[1:4] == codec.inf_code - 1)
    assert np.all(out[:4] == np.float32(-mf))
    assert abs(out[4] + 1e4) <= codec.max_abs_error(np.array([-1e4]))[0]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_huge_float64_saturates_never_inf() -> None:
    codec = LogProbCodec()
    codes = codec.encode(np.array([-1e39, -1e300], dtype=np.float64))
    assert np.all(codes == codec.inf_code - 1)
    assert np.all(np.isfinite(codec.decode(codes)))


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
def test_table_decode_equals_the_arithmetic_for_every_code(codec: LogProbCodec) -> None:
    codes = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)
    table, arithmetic = codec.decode(codes), codec.decode_arithmetic(codes)
    assert table.shape == arithmetic.shape == (256, 256) and table.dtype == np.float32
    np.testing.assert_array_equal(table.view(np.uint32), arithmetic.view(np.uint32))  # bit for bit, -inf too
    flat = table.reshape(-1)
    assert np.isneginf(flat[codec.inf_code :]).all() and np.isfinite(flat[: codec.inf_code]).all()
    np.testing.assert_array_equal(codec.decode(codes.astype(np.int32)), arithmetic)  # other dtypes: the arithmetic


def test_scalar_inputs() -> None:
    codec = LogProbCodec()
    code = codec.encode(np.float32(-1.0))
    assert np.shape(code) == ()
    assert codec.decode(code) == -1.0
    assert codec.max_abs_error(-1.0) == 2.0**-8 + 2.0**-24


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
@SETTINGS
@given(values=hnp.arrays(np.float32, st.integers(2, 64), elements=st.one_of(f32_logp, st.just(-np.inf))))
def test_monotone(codec: LogProbCodec, values: np.ndarray) -> None:
    order = np.argsort(-values.astype(np.float64), kind="stable")  # increasing -l
    codes = codec.encode(values)[order]
    assert np.all(np.diff(codes.astype(np.int64)) >= 0)
    decoded = codec.decode(codec.encode(values))[order]
    assert np.all(decoded[1:] <= decoded[:-1])  # (np.diff of two -inf would be NaN)


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
def test_monotone_dense_sweep(codec: LogProbCodec) -> None:
    neg = -np.concatenate([[0.0], np.geomspace(1e-30, 1e6, 20001)]).astype(np.float32)
    codes = codec.encode(neg).astype(np.int64)
    assert np.all(np.diff(codes) >= 0)
    assert codes[0] == 0


def test_sorted_rows_give_nondecreasing_codes() -> None:
    rng = np.random.default_rng(3)
    logp = -np.sort(rng.exponential(5.0, size=(100, 32)), axis=1).astype(np.float32)  # descending log-prob
    codes = LogProbCodec().encode(logp).astype(np.int64)
    assert np.all(np.diff(codes, axis=1) >= 0)


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
def test_nan_rejected(codec: LogProbCodec) -> None:
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([-1.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([[np.nan]]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mantissa_bits": 0}, "mantissa_bits"),
        ({"mantissa_bits": 13}, "mantissa_bits"),
        ({"mantissa_bits": -1}, "mantissa_bits"),
        ({"min_exponent": 1}, "min_exponent"),
        ({"min_exponent": -127}, "min_exponent"),
        ({"mantissa_bits": 11, "min_exponent": -24}, "too few exponents"),
        ({"mantissa_bits": 12, "min_exponent": -24}, "too few exponents"),
        ({"mantissa_bits": 9, "min_exponent": -126}, "too few exponents"),
        ({"tail_mantissa_bits": 8}, "tail_mantissa_bits"),
        ({"tail_mantissa_bits": 0}, "tail_mantissa_bits"),
        ({"tail_mantissa_bits": 6, "tail_min_exponent": -25}, "tail_min_exponent"),
        ({"tail_mantissa_bits": 6, "tail_min_exponent": 128}, "tail_min_exponent"),
    ],
)
def test_invalid_config_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LogProbCodec(**kwargs)


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
def test_max_finite_covers_float32_logprobs(codec: LogProbCodec) -> None:
    assert codec.max_finite >= 1e4
    assert codec.inf_code <= 0xFFFF


@pytest.mark.parametrize("codec", CODECS, ids=codec_ids)
def test_dict_roundtrip(codec: LogProbCodec) -> None:
    d = codec.to_dict()
    assert d["name"] == "neglogp-minifloat16"
    assert d["configuration"] == {"mantissa_bits": codec.mantissa_bits, "min_exponent": codec.min_exponent,
                                  "tail_mantissa_bits": codec.tail_mantissa_bits,
                                  "tail_min_exponent": codec.tail_min_exponent}
    again = LogProbCodec.from_dict(d)
    assert again == codec
    x = np.linspace(-50, 0, 101, dtype=np.float32)
    np.testing.assert_array_equal(again.encode(x), codec.encode(x))


def test_coarse_tail_is_the_coarser_codec_there_and_the_finer_one_elsewhere() -> None:
    codec = LogProbCodec(tail_mantissa_bits=6, tail_min_exponent=2)
    fine, coarse = LogProbCodec(mantissa_bits=7), LogProbCodec(mantissa_bits=6)
    x = -np.geomspace(1e-3, 60, 20_001).astype(np.float32)
    got = codec.decode(codec.encode(x))
    tail = -x >= 4
    np.testing.assert_array_equal(got[~tail], fine.decode(fine.encode(x[~tail])))
    np.testing.assert_array_equal(got[tail], coarse.decode(coarse.encode(x[tail])))
    # The same code space: the coarse codes are the fine codec's codes of the same values.
    np.testing.assert_array_equal(codec.encode(x), fine.encode(got))
    assert codec.decode(codec.encode(np.float32(-np.inf))) == -np.inf


def test_configuration_from_before_the_tail_option_is_uniform() -> None:
    old = LogProbCodec.from_dict({"name": LogProbCodec.name, "configuration": {"mantissa_bits": 7,
                                                                               "min_exponent": -24}})
    assert old == LogProbCodec(mantissa_bits=7, min_exponent=-24, tail_mantissa_bits=None)
    assert CaptureTuning().logp_codec == LogProbCodec(tail_mantissa_bits=6)  # what new captures write


def test_from_dict_refuses_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown log-prob codec 'fixed-step'"):
        LogProbCodec.from_dict({"name": "fixed-step", "configuration": {}})
    with pytest.raises(ValueError, match="unknown log-prob codec"):
        LogProbCodec.from_dict({"configuration": {"mantissa_bits": 7}})


def test_from_dict_validates_configuration() -> None:
    with pytest.raises(ValueError, match="mantissa_bits"):
        LogProbCodec.from_dict({"name": LogProbCodec.name, "configuration": {"mantissa_bits": 20}})
    with pytest.raises(TypeError):
        LogProbCodec.from_dict({"name": LogProbCodec.name, "configuration": {"step": 0.1}})


# ---------------------------------------------------------------------------------- id table


def check_id_table(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    table, indices = build_id_table(ids)
    assert table.dtype == np.int32
    assert indices.shape == ids.shape
    np.testing.assert_array_equal(table[indices], ids)
    distinct = np.unique(ids)
    np.testing.assert_array_equal(np.sort(table), distinct.astype(np.int32))
    expected_dtype = np.uint16 if len(distinct) <= 65536 else np.int32
    assert indices.dtype == expected_dtype
    # Most frequent first, ties by ascending id.
    counts = {int(v): int(c) for v, c in zip(*np.unique(ids, return_counts=True), strict=True)}
    keys = [(-counts[int(v)], int(v)) for v in table]
    assert keys == sorted(keys)
    return table, indices


id_values = st.one_of(st.just(-1), st.integers(0, 300), st.integers(65_000, 2**31 - 1))


@settings(max_examples=100, deadline=None)
@given(ids=hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12), elements=id_values))
def test_id_table_roundtrip(ids: np.ndarray) -> None:
    table, indices = check_id_table(ids)
    # Deterministic: a pure function of the ids, also through a different input dtype.
    table2, indices2 = build_id_table(ids.astype(np.int32))
    np.testing.assert_array_equal(table, table2)
    np.testing.assert_array_equal(indices, indices2)


def test_id_table_large_ids_preserved() -> None:
    ids = np.array([[70_000, 65_535, 65_536, -1], [299_999, 70_000, -1, -1]], dtype=np.int32)
    table, indices = check_id_table(ids)
    assert table.tolist() == [-1, 70_000, 65_535, 65_536, 299_999]
    assert indices.tolist() == [[1, 2, 3, 0], [4, 1, 0, 0]]


def test_id_table_index_dtype_by_table_size() -> None:
    exact = np.arange(65536, dtype=np.int32).reshape(-1, 16) + 100_000
    table, indices = check_id_table(exact)
    assert len(table) == 65536 and indices.dtype == np.uint16
    assert int(indices.max()) == 65535

    over = np.arange(65537, dtype=np.int32).reshape(-1, 1)
    table, indices = check_id_table(over)
    assert len(table) == 65537 and indices.dtype == np.int32

    # -1 padding counts as a table entry.
    padded = np.concatenate([np.arange(65536, dtype=np.int32), [-1]]).reshape(-1, 1)
    _, indices = check_id_table(padded)
    assert indices.dtype == np.int32


def test_id_table_frequency_order() -> None:
    ids = np.array([[5, 9, 7], [9, 5, -1], [9, 3, -1], [7, 9, -1]])
    table, indices = check_id_table(ids)
    # 9 x4, -1 x3, 5 x2 and 7 x2 (tie: smaller id first), 3 x1.
    assert table.tolist() == [9, -1, 5, 7, 3]
    assert indices[0].tolist() == [2, 0, 3]


def test_id_table_deterministic_under_permutation_of_rows() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 50, size=(200, 8))
    table_a, _ = build_id_table(ids)
    table_b, _ = build_id_table(ids[rng.permutation(200)])
    np.testing.assert_array_equal(table_a, table_b)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0], ids=["flat", "peaked", "confident"])
def test_encode_topk_preserves_row_mass(scale: float) -> None:
    """The tail 1 − Σ top-k survives quantization: the largest entry absorbs the others' residual."""
    rng = np.random.default_rng(int(scale * 10))
    logits = rng.standard_normal((400, 300)) * scale
    logp_full = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    logp = -np.sort(-logp_full, axis=1)[:, :32]
    codec = LogProbCodec()
    decoded = codec.decode(codec.encode_topk(logp)).astype(np.float64)
    assert np.all(np.abs(decoded - logp) <= codec.topk_error_bound(logp))
    # Mass error is at most the top entry's own step (not the sum of 32 entries' errors).
    p_top = np.exp(logp[:, 0])
    step = p_top * np.expm1(codec.max_abs_error(logp[:, 0]))
    mass_err = np.abs(np.exp(decoded).sum(1) - np.exp(logp).sum(1))
    assert np.all(mass_err <= step + 1e-12)
    plain = np.abs(np.exp(codec.decode(codec.encode(logp)).astype(np.float64)).sum(1) - np.exp(logp).sum(1))
    assert mass_err.mean() < plain.mean()


def test_encode_topk_handles_padding_rows_and_empty_blocks() -> None:
    codec = LogProbCodec()
    logp = np.array([[-0.1, -2.5, -np.inf], [-np.inf, -np.inf, -np.inf]])
    decoded = codec.decode(codec.encode_topk(logp))
    np.testing.assert_array_equal(np.isneginf(decoded), np.isneginf(logp))
    assert codec.encode_topk(np.zeros((0, 4))).shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[n, K\]"):
        codec.encode_topk(np.zeros(4))
