"""Unit tests for eventhub.units: durations, rates and sizes."""

from __future__ import annotations

import math

import pytest

from eventhub.units import Rate, format_duration, parse_duration, parse_rate, parse_size

# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 86400 + 7200 + 180 + 4 + 0.005),
        ("1.5s", 1.5),
        ("0.5h", 1800.0),
        ("0s", 0.0),
        ("  30s  ", 30.0),
        ("10", 10.0),
        ("2.5", 2.5),
        ("0", 0.0),
    ],
)
def test_parse_duration_text(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("value", "seconds"), [(0, 0.0), (30, 30.0), (1.5, 1.5), (0.001, 0.001)])
def test_parse_duration_numbers(value: float, seconds: float) -> None:
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "s",
        "ms",
        "abc",
        "30x",
        "30 s",
        "1m 30s",
        "m30",
        "30s!",
        "1.5.3s",
        "1,5s",
        "30S",
        "30sec",
        "5y",
        "-5s",
        "+5s",
    ],
)
def test_parse_duration_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5, "-5", "-0.1"])
def test_parse_duration_rejects_negative(value: str | float) -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", ["nan", "NaN", math.nan])
def test_parse_duration_rejects_nan(value: str | float) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(30.0, "30s"), (1.0, "1s"), (90.0, "90s"), (0.25, "250ms"), (1.5, "1500ms"), (0.0, "0ms")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# ---------------------------------------------------------------- rates


@pytest.mark.parametrize(
    ("text", "count", "period", "per_second"),
    [
        ("50/s", 50.0, 1.0, 50.0),
        ("600/m", 600.0, 60.0, 10.0),
        ("10/5s", 10.0, 5.0, 2.0),
        ("1000/h", 1000.0, 3600.0, 1000 / 3600),
        ("1/d", 1.0, 86400.0, 1 / 86400),
        ("5/100ms", 5.0, 0.1, 50.0),
        ("0.5/s", 0.5, 1.0, 0.5),
        (" 50 / s ", 50.0, 1.0, 50.0),
        ("3/10m", 3.0, 600.0, 0.005),
    ],
)
def test_parse_rate(text: str, count: float, period: float, per_second: float) -> None:
    rate = parse_rate(text)
    assert rate.count == count
    assert rate.period == pytest.approx(period)
    assert rate.per_second == pytest.approx(per_second)


@pytest.mark.parametrize(
    "text",
    ["", "50", "50/", "/s", "50/x", "50/S", "50 per s", "-1/s", "50/-1s", "5.0.1/s", "a/s", "50s"],
)
def test_parse_rate_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["0/s", "0.0/m", "10/0s", "10/0m"])
def test_parse_rate_must_be_positive(text: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (Rate(50, 1), "50/1s"),
        (Rate(600, 60), "600/60s"),
        (Rate(0.5, 1), "0.5/1s"),
        (Rate(5, 0.1), "5/100ms"),
    ],
)
def test_rate_str_parses_back(rate: Rate, text: str) -> None:
    assert str(rate) == text
    parsed = parse_rate(text)
    assert parsed.per_second == pytest.approx(rate.per_second)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1MiB", 1024**2),
        ("512KB", 512_000),
        ("512KiB", 512 * 1024),
        ("1MB", 1_000_000),
        ("2GB", 2_000_000_000),
        ("2GiB", 2 * 1024**3),
        ("100B", 100),
        ("1048576", 1_048_576),
        ("0", 0),
        ("1mib", 1024**2),
        ("1kb", 1000),
        (" 10 MiB ", 10 * 1024**2),
        (0, 0),
        (1024, 1024),
        (10**12, 10**12),
    ],
)
def test_parse_size(value: str | int, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value", ["", "MiB", "1.5MB", "1TB", "1 M", "-1", "-1KB", "ten", "1KiB2", "1e6"]
)
def test_parse_size_rejects_bad_text(value: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(value)


def test_parse_size_rejects_negative_int() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


@pytest.mark.parametrize("value", [True, False])
def test_parse_size_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError):
        parse_size(value)
