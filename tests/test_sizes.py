"""
Tests for L{imgresume.sizes}: human sizes and durations on command lines.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from imgresume.sizes import format_size, parse_duration, parse_size

K, M, G, T, P = (1 << 10), (1 << 20), (1 << 30), (1 << 40), (1 << 50)


class ParseSizeTests(SynchronousTestCase):
    """parse_size()."""

    def test_plain_bytes(self) -> None:
        """A bare number is bytes."""
        self.assertEqual(parse_size("0"), 0)
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("10B"), 10)

    def test_binary_suffixes(self) -> None:
        """K, M, G, T, P are powers of 1024."""
        self.assertEqual(
            [parse_size(f"3{u}") for u in "KMGTP"], [3 * K, 3 * M, 3 * G, 3 * T, 3 * P]
        )

    def test_suffix_spellings(self) -> None:
        """Suffixes are case-insensitive and may be written KB, KiB, with spaces."""
        for text in ["20M", "20m", "20MB", "20MiB", "20mib", "20 M", " 20M ", "20 MiB"]:
            self.assertEqual(parse_size(text), 20 * M, text)

    def test_fractions(self) -> None:
        """Fractional sizes are rounded down to whole bytes."""
        self.assertEqual(parse_size("1.5G"), 3 * G // 2)
        self.assertEqual(parse_size("0.5K"), 512)
        self.assertEqual(parse_size("1.5"), 1)

    def test_bad_sizes(self) -> None:
        """Text that is not a size raises ValueError naming it."""
        for text in ["", " ", "M", "abc", "-1", "+1", "1.5.5", "1X", "1e3", "1KK",
                     "20 MiBs", "1,5M", ".5M", "5.M", "0x10"]:
            error = self.assertRaises(ValueError, parse_size, text)
            self.assertIn(repr(text), str(error))


class ParseDurationTests(SynchronousTestCase):
    """parse_duration()."""

    def test_default_seconds(self) -> None:
        """A bare number is seconds."""
        self.assertEqual(parse_duration("30"), 30.0)
        self.assertIsInstance(parse_duration("30"), float)

    def test_units(self) -> None:
        """ms, s, m, h, d scale to seconds."""
        self.assertEqual(parse_duration("250ms"), 0.25)
        self.assertEqual(parse_duration("90s"), 90.0)
        self.assertEqual(parse_duration("15m"), 900.0)
        self.assertEqual(parse_duration("2h"), 7200.0)
        self.assertEqual(parse_duration("7d"), 7 * 86400.0)
        self.assertEqual(parse_duration("1.5h"), 5400.0)

    def test_spelling(self) -> None:
        """Units are case-insensitive and may be separated by spaces."""
        self.assertEqual(parse_duration("90S"), 90.0)
        self.assertEqual(parse_duration(" 5 m "), 300.0)
        self.assertEqual(parse_duration("100MS"), 0.1)

    def test_bad_durations(self) -> None:
        """Text that is not a duration raises ValueError naming it."""
        for text in ["", "s", "5w", "-1s", "5 sec", "5min", "1.2.3s", "5 s s", "inf", "nan"]:
            error = self.assertRaises(ValueError, parse_duration, text)
            self.assertIn(repr(text), str(error))


class FormatSizeTests(SynchronousTestCase):
    """format_size()."""

    def test_bytes(self) -> None:
        """Below 1 KiB, whole bytes."""
        self.assertEqual(format_size(0), "0 B")
        self.assertEqual(format_size(1023), "1023 B")

    def test_units(self) -> None:
        """Above, one decimal and the largest binary unit under 1024."""
        self.assertEqual(format_size(K), "1.0 KiB")
        self.assertEqual(format_size(1536), "1.5 KiB")
        self.assertEqual(format_size(int(12.3 * M)), "12.3 MiB")
        self.assertEqual(format_size(G), "1.0 GiB")
        self.assertEqual(format_size(5 * T), "5.0 TiB")

    def test_tib_is_the_largest(self) -> None:
        """Sizes of a PiB and more stay in TiB."""
        self.assertEqual(format_size(P), "1024.0 TiB")

    def test_negative(self) -> None:
        """Negative sizes keep their sign."""
        self.assertEqual(format_size(-2048), "-2.0 KiB")

    def test_parse_round_trip(self) -> None:
        """parse_size reads what format_size writes, for sizes exact to 0.1 unit."""
        for n in [0, 1, 1023, K, 3 * M, 3 * G // 2, 7 * T]:
            self.assertEqual(parse_size(format_size(n)), n, n)
