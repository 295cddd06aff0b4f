# -*- test-case-name: tests.storage.test_ids -*-
"""
Upload ids: 128 random bits as 32 lowercase hex digits.

An id is both a capability (whoever knows it may resume the upload) and a
directory name under C{incoming/}, so the check is strict: nothing but
C{[0-9a-f]{32}} ever reaches a path.
"""

from __future__ import annotations

import re
import secrets

_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


def new_upload_id() -> str:
    """Return a fresh upload id (C{secrets.token_hex(16)})."""
    return secrets.token_hex(16)


def is_upload_id(s: object) -> bool:
    """
    Return whether C{s} is a well-formed upload id: a C{str} of exactly 32
    lowercase hex digits (no surrounding whitespace, no newline).
    """
    return isinstance(s, str) and _UPLOAD_ID.fullmatch(s) is not None
