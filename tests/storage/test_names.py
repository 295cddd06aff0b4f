"""
Tests for L{imgresume.names}: which remote names are accepted, what
each refusal says, and that an accepted name never leaves the root.
"""

from __future__ import annotations

import os
import posixpath

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from imgresume.errors import InvalidName
from imgresume.names import (
    MAX_COMPONENT_BYTES,
    completion_candidates,
    if_exists_policy,
    validate_name,
)

ROOT = "/srv/imgresume/complete"


class ValidateNameTests(SynchronousTestCase):
    """Tests for L{validate_name}."""

    def assertRefused(self, name, *words: str) -> None:
        with self.assertRaises(InvalidName) as cm:
            validate_name(name)
        for word in words:
            self.assertIn(word, cm.exception.message, name)

    def test_plainNames(self) -> None:
        """Ordinary file names and paths are returned unchanged."""
        for name in ["a.tiff", "scans/2026/a.tiff", "IMG 0001.CR2",
                     "a b/c-d_e+f(1).jpeg", "x", "cons.d/a", "CONSOLE.txt",
                     "COM0.txt", "LPT10", "a..b", "a/b..c",
                     "dir.d/file", " lead"]:
            self.assertEqual(validate_name(name), name)

    def test_unicode(self) -> None:
        """Any script is allowed; names are returned in NFC."""
        self.assertEqual(validate_name("Москва/東京.png"), "Москва/東京.png")
        self.assertEqual(validate_name("e\u0301.tiff"), "\u00e9.tiff")
        self.assertEqual(validate_name("\U0001f4f7/😀.jpg"), "\U0001f4f7/😀.jpg")

    def test_notText(self) -> None:
        """Only str is a name."""
        self.assertRefused(b"a.tiff", "text")
        self.assertRefused(None, "text")

    def test_empty(self) -> None:
        """The empty name is refused."""
        self.assertRefused("", "empty")

    def test_tooLong(self) -> None:
        """More than 1024 UTF-8 bytes in all is refused; 1024 is fine."""
        ok = "/".join(["a" * 200] * 5) + "/" + "b" * 19  # 1024 bytes
        self.assertEqual(len(ok.encode()), 1024)
        self.assertEqual(validate_name(ok), ok)
        self.assertRefused(ok + "c", "1024")
        self.assertRefused("/".join(["é" * 100] * 6), "1024")

    def test_componentTooLong(self) -> None:
        """A component over 255 UTF-8 bytes is refused; 255 is fine."""
        self.assertEqual(validate_name("a" * 255), "a" * 255)
        self.assertRefused("a" * 256, "255")
        self.assertRefused("d/" + "é" * 128, "255")  # 256 bytes, 128 chars

    def test_absolute(self) -> None:
        """Absolute paths are refused."""
        self.assertRefused("/etc/passwd", "absolute")
        self.assertRefused("//server/share", "absolute")

    def test_backslash(self) -> None:
        """Backslashes are refused (a separator elsewhere)."""
        self.assertRefused("a\\b", "backslash")
        self.assertRefused("..\\..\\x", "backslash")

    def test_emptyComponents(self) -> None:
        """Doubled and trailing slashes are refused."""
        self.assertRefused("a//b", "empty path component")
        self.assertRefused("a/", "empty path component")

    def test_dotComponents(self) -> None:
        """'.' and '..' are refused wherever they are."""
        for name in [".", "..", "../x", "a/../b", "a/..", "./a", "a/./b"]:
            self.assertRefused(name, "component")

    def test_hidden(self) -> None:
        """Components starting with '.' are refused."""
        for name in [".hidden", "a/.git/config", ".incoming/x", "...", ".a.tiff"]:
            self.assertRefused(name, "starts with '.'")

    def test_controlCharacters(self) -> None:
        """NUL, C0, DEL and C1 controls are refused."""
        self.assertRefused("a\x00b", "NUL")
        for ch in ["\x01", "\t", "\n", "\r", "\x1b", "\x1f", "\x7f", "\x80",
                   "\x85", "\x9f"]:
            self.assertRefused(f"a{ch}b", f"U+{ord(ch):04X}")

    def test_otherRefusedCharacters(self) -> None:
        """Lone surrogates, bidi controls and line separators are refused."""
        self.assertRefused("a\ud800b", "surrogate")
        self.assertRefused("invoice\u202efdp.exe", "U+202E")
        self.assertRefused("a\u2028b", "U+2028")

    def test_trailingSpaceOrDot(self) -> None:
        """Components ending with a space or a dot are refused."""
        for name in ["a ", "a.", "dir./a", "dir /a", "a/b.", "a.tiff "]:
            self.assertRefused(name, "ends with a space or a dot")

    def test_windowsDeviceNames(self) -> None:
        """Windows device names are refused, with any extension and case."""
        for name in ["CON", "con", "Prn.txt", "aux.tar.gz", "NUL", "nul.tiff",
                     "COM1", "com9.log", "LPT1", "lpt9.x", "d/CON/a", "COM\u00b9",
                     "CON .txt", "conin$"]:
            self.assertRefused(name, "reserved")

    def test_messageShowsTheProblem(self) -> None:
        """Refusals quote the offending part, escaped."""
        self.assertRefused("ok/.bad/x", "'.bad'")
        self.assertRefused("a\nb", "'a\\nb'")

    def test_idempotent(self) -> None:
        """An accepted name validates to itself."""
        for name in ["a.tiff", "e\u0301/x", "Москва/a"]:
            once = validate_name(name)
            self.assertEqual(validate_name(once), once)


class CompletionCandidatesTests(SynchronousTestCase):
    """Tests for L{completion_candidates}."""

    ID = "0123456789abcdef0123456789abcdef"

    def first(self, name: str, n: int) -> list[str]:
        it = completion_candidates(name, self.ID)
        return [next(it) for _ in range(n)]

    def test_order(self) -> None:
        """The name, then the short id, then the full id, then numbered."""
        self.assertEqual(
            self.first("scans/a.tiff", 4),
            ["scans/a.tiff", "scans/a.01234567.tiff",
             f"scans/a.{self.ID}.tiff", f"scans/a.{self.ID}-1.tiff"],
        )

    def test_suffixes(self) -> None:
        """The last suffix stays last; a name without one gets none."""
        self.assertEqual(self.first("a.tar.gz", 2)[1], "a.tar.01234567.gz")
        self.assertEqual(self.first("README", 2)[1], "README.01234567")

    def test_ifExists(self) -> None:
        """
        With the policy "fail" the name is the only candidate; "rename"
        and "skip" (which is renamed when not skipped) give the alternates.
        The policy is read from an upload's metadata, "rename" by default.
        """
        self.assertEqual(list(completion_candidates("a.tif", self.ID, "fail")), ["a.tif"])
        for policy in ("rename", "skip"):
            self.assertEqual(len(list(completion_candidates("a.tif", self.ID, policy))), 102)
        self.assertEqual(if_exists_policy({}), "rename")
        self.assertEqual(if_exists_policy({"if-exists": "fail", "dpi": "600"}), "fail")

    def test_distinctAndValid(self) -> None:
        """Candidates differ and are valid names within the component limit."""
        for name in ["a.tiff", "d/" + "x" * 250 + ".tiff", "é" * 127,
                     "x" * 200 + "." + "y" * 54]:
            got = list(completion_candidates(name, self.ID))
            self.assertEqual(len(set(got)), len(got))
            for c in got:
                self.assertEqual(validate_name(c), c)
                self.assertLessEqual(
                    len(c.rsplit("/", 1)[-1].encode()), MAX_COMPONENT_BYTES
                )


names = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(
            ["a", "b.tiff", ".", "..", "", " ", "/", "\\", "\x00", "é",
             "e\u0301", "CON", "nul", ":", "~", "$", "..a", "a..", "\u202e",
             "\u2024", "\uff0e", "\u2215", "\u29f8", "%2e", "*"]
        ),
        max_size=12,
    ).map("".join),
    st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=5).map("/".join),
)


class NamePropertyTests(SynchronousTestCase):
    """Properties of L{validate_name} over generated names."""

    @settings(max_examples=400, deadline=None)
    @given(names)
    def test_acceptedNamesStayInside(self, name: str) -> None:
        """
        Any accepted name, joined to a root, resolves strictly inside it, is
        accepted by L{FilePath.descendant}, and validates to itself.
        """
        try:
            valid = validate_name(name)
        except InvalidName:
            return
        joined = posixpath.normpath(posixpath.join(ROOT, valid))
        self.assertTrue(joined.startswith(ROOT + "/"), (name, joined))
        self.assertEqual(joined, ROOT + "/" + valid)
        child = FilePath(ROOT).descendant(valid.split("/"))
        self.assertTrue(child.path.startswith(ROOT + os.sep))
        self.assertEqual(validate_name(valid), valid)
        for part in valid.split("/"):
            self.assertNotIn(part, ("", ".", ".."))
            self.assertFalse(part.startswith("."))
            self.assertFalse(any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in part))
