# -*- test-case-name: tests.test_logs.EscapeTests -*-
"""
Making what peers send safe to log: L{escape} turns every character that
is not printable (controls, format characters such as bidi overrides, line
and paragraph separators, lone surrogates) into a visible backslash escape,
so that a name, a client id or a message from a peer is one line of plain
text in a log, whatever it was made of.
"""

from __future__ import annotations

from typing import Any

#: Longest text logged from one field; the rest is replaced by a count.
MAX_LOGGED = 1024

_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str, from_bytes: bool) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    if ch.isprintable():
        return ch
    code = ord(ch)
    if from_bytes and 0xDC80 <= code <= 0xDCFF:
        code -= 0xDC00  # a byte that is not UTF-8 (surrogateescape)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(value: Any, limit: int = MAX_LOGGED) -> Any:
    """
    C{value} as it may be logged when a peer chose it: a string with every
    character that is not printable (C0 and C1 controls such as NUL, ESC, CR
    and LF; DEL; bidi overrides and other format characters; line and
    paragraph separators; non-ASCII spaces; lone surrogates) written as
    C{\\xNN}, C{\\uNNNN} or C{\\UNNNNNNNN} (C{\\n}, C{\\r}, C{\\t} for those
    three), and a backslash as C{\\\\}, so that the escapes are unambiguous.
    Past C{limit} characters the rest is replaced by
    C{...(N more characters)}.

    Bytes are decoded as UTF-8 first (a byte that is not UTF-8 becomes
    C{\\xNN}); other values (numbers, None) are returned unchanged.  Called
    at every log call that carries text from a peer (C{docs/security.md}).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _escape_text(bytes(value).decode("utf-8", "surrogateescape"), limit, True)
    if isinstance(value, str):
        return _escape_text(value, limit, False)
    return value


def _escape_text(text: str, limit: int, from_bytes: bool) -> str:
    more = len(text) - limit
    if more > 0:
        text = text[:limit]
    if not text.isprintable() or "\\" in text:
        text = "".join(_escape_char(ch, from_bytes) for ch in text)
    if more > 0:
        text += f"...({more} more characters)"
    return text
