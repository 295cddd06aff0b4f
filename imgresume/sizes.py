# -*- test-case-name: tests.test_sizes -*-
"""Human sizes and durations on command lines: C{20M}, C{1.5G}, C{90s}, C{7d}."""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGTP])(?:i?B)?|B)?\s*\Z", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*\Z", re.I)
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """Bytes in C{text}: a number with an optional binary suffix K, M, G, T, P."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 512K, 20M, 1.5G)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def parse_duration(text: str) -> float:
    """Seconds in C{text}: a number with an optional unit ms, s, m, h, d."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (try 30s, 15m, 7d)")
    return float(m.group(1)) * _SECONDS[(m.group(2) or "s").lower()]


def format_size(n: float) -> str:
    """C{n} bytes for a human: C{12.3 MiB}."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < (1023.5 if unit == "B" else 1023.95) or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
