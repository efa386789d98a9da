"""The shared number and count checks: what passes, what is refused, and what the message says."""

from __future__ import annotations

import math

import pytest

from resilient_voice._validate import (
    buckets,
    flag,
    fraction,
    function,
    header,
    label,
    non_negative,
    number,
    optional_number,
    optional_whole,
    whole,
)


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        (1, {}, 1.0),
        (0.5, {}, 0.5),
        (0, {"inclusive": True}, 0.0),
        (1.0, {"minimum": 1.0, "inclusive": True}, 1.0),
        (-2, {"minimum": -5.0}, -2.0),
    ],
)
def test_number_accepts_finite_values_above_the_bound(
    value: float, kwargs: dict[str, object], expected: float
) -> None:
    result = number("rate", value, **kwargs)  # type: ignore[arg-type]
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    ("value", "kwargs", "error", "match"),
    [
        (True, {}, TypeError, "rate must be a number, got bool"),
        ("1", {}, TypeError, "got str"),
        (None, {}, TypeError, "got NoneType"),
        (0, {}, ValueError, r"rate must be a finite number > 0, got 0"),
        (-1.0, {"inclusive": True}, ValueError, ">= 0"),
        (0.5, {"minimum": 1.0, "inclusive": True}, ValueError, ">= 1, got 0.5"),
        (math.inf, {}, ValueError, "finite"),
        (math.nan, {}, ValueError, "finite"),
    ],
)
def test_number_refuses_with_the_option_name(
    value: object, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        number("rate", value, **kwargs)  # type: ignore[arg-type]


def test_optional_number_passes_none_through() -> None:
    assert optional_number("timeout", None) is None
    assert optional_number("timeout", 2) == 2.0
    with pytest.raises(ValueError, match="timeout"):
        optional_number("timeout", 0.0)


@pytest.mark.parametrize(
    ("value", "minimum", "error", "match"),
    [
        (True, 1, TypeError, "count must be an int, got bool"),
        (1.0, 1, TypeError, "got float"),
        (0, 1, ValueError, "count must be an int >= 1, got 0"),
        (-1, 0, ValueError, ">= 0"),
    ],
)
def test_whole_refuses_non_ints_and_small_values(
    value: object, minimum: int, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        whole("count", value, minimum=minimum)


def test_whole_and_optional_whole_accept_counts() -> None:
    assert whole("count", 3) == 3
    assert whole("count", 0, minimum=0) == 0
    assert optional_whole("count", None) is None
    assert optional_whole("count", 2) == 2
    with pytest.raises(ValueError, match="count"):
        optional_whole("count", 0)


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 1e-9])
def test_fraction_accepts_the_half_open_unit_interval(value: float) -> None:
    assert fraction("share", value) == float(value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (1.01, ValueError),
        (-0.5, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
        ("0.5", TypeError),
    ],
)
def test_fraction_refuses_everything_else(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="share"):
        fraction("share", value)


# Found by tests/test_bad_configuration.py; each was accepted, or failed with an error that did
# not name the option.


def test_an_int_too_large_for_a_float_is_a_value_error_naming_the_option() -> None:
    # float(10**400) raises OverflowError, which is neither TypeError nor ValueError.
    with pytest.raises(ValueError, match="rate must be a finite number"):
        number("rate", 10**400)
    with pytest.raises(ValueError, match="pause"):
        non_negative("pause", 10**400)


@pytest.mark.parametrize("value", ["false", "no", "0", None, 0, 1, 1.5])
def test_flag_refuses_anything_but_a_bool(value: object) -> None:
    # bool("false") is True: allow_insecure_http="false" from a config file switched it on.
    with pytest.raises(TypeError, match="strict must be True or False"):
        flag("strict", value)
    assert flag("strict", False) is False


@pytest.mark.parametrize("value", ["", " ", "\t", "a\nb", "a\r\nX-Injected: 1", "\x00"])
def test_label_refuses_blank_names_and_control_characters(value: str) -> None:
    with pytest.raises(ValueError, match="name must be a non-blank str"):
        label("name", value)
    with pytest.raises(TypeError, match="name must be a str"):
        label("name", 1)
    assert label("name", "twilio:AC1") == "twilio:AC1"


@pytest.mark.parametrize("value", ["", "a b", "a:b", "a\nb", "\u00e9"])
def test_header_refuses_what_is_not_a_header_name(value: str) -> None:
    with pytest.raises(ValueError, match="correlation_header must be an HTTP header name"):
        header("correlation_header", value)
    assert header("correlation_header", "X-Correlation-ID") == "X-Correlation-ID"


@pytest.mark.parametrize(
    ("value", "error"),
    [([], ValueError), ([0.5, 0.1], ValueError), ([math.nan], ValueError), ("1", TypeError)],
)
def test_buckets_are_non_empty_increasing_numbers(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="buckets"):
        buckets("buckets", value)
    assert buckets("buckets", [0, 0.5, math.inf]) == (0.0, 0.5, math.inf)


def test_function_refuses_what_cannot_be_called() -> None:
    with pytest.raises(TypeError, match="app must be callable"):
        function("app", None)
    assert function("key", None, optional=True) is None
