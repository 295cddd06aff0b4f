# -*- test-case-name: tests.storage.test_ids -*-
"""
Tests for L{imgresume.names}: upload ids.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from imgresume.names import is_upload_id, new_upload_id


class UploadIdTests(TestCase):
    """Tests for L{imgresume.names}."""

    def test_newIdsAreWellFormed(self) -> None:
        """New ids are 32 lowercase hex digits and differ."""
        ids = {new_upload_id() for _ in range(100)}
        self.assertEqual(len(ids), 100)
        self.assertTrue(all(is_upload_id(i) for i in ids))

    def test_strict(self) -> None:
        """Anything else is not an id."""
        for bad in ["", "a" * 31, "a" * 33, "A" * 32, " " + "a" * 31,
                    "a" * 32 + "\n", "ａ" * 32, b"a" * 32, None]:
            self.assertFalse(is_upload_id(bad), bad)
