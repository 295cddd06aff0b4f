# -*- test-case-name: tests.storage.test_names -*-
"""
The names both ends of an upload agree on: client-chosen remote names, the
alternate names used when a completed file of the same name already exists,
and upload ids.

A name is a relative, "/"-separated path below the storage's C{complete/}
directory.  It is checked, never repaired: the only change made to an
accepted name is Unicode NFC normalisation, so that the same visible name
from two clients maps to one file.  Everything else that is odd is refused
with L{InvalidName} and a message saying what is wrong.

What happens when a completed file already has the name is the upload's
C{if-exists} policy (L{IF_EXISTS_POLICIES}, asked for in the UPLOAD's
metadata under L{IF_EXISTS_KEY}; L{if_exists_policy} reads it):
C{rename} stores it beside under an alternate name, C{skip} stores nothing
when the file there is identical, C{fail} refuses.

An upload id is 128 random bits as 32 lowercase hex digits.  It is both a
capability (whoever knows it may resume the upload) and a directory name
under C{incoming/}, so the check is strict: nothing but C{[0-9a-f]{32}} ever
reaches a path.

Used by the client (to refuse a bad name before sending it), by the
protocol (the name limit) and by every storage backend.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from typing import Iterator, Mapping

from imgresume.errors import InvalidName

#: Longest accepted name, in UTF-8 bytes.
MAX_NAME_BYTES = 1024
#: Longest accepted path component, in UTF-8 bytes (NAME_MAX of common
#: filesystems).
MAX_COMPONENT_BYTES = 255

_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")

#: The UPLOAD metadata key that carries the upload's policy for a name
#: already taken by a completed file (docs/protocol.md, section 6).
IF_EXISTS_KEY = "if-exists"
#: The policies, the default first: store beside under another name; store
#: nothing if the file there has the same size and SHA-256; refuse.
IF_EXISTS_POLICIES = ("rename", "skip", "fail")

_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{p}{d}" for p in ("COM", "LPT") for d in "123456789\u00b9\u00b2\u00b3"]
)

# Unicode characters refused besides controls: bidirectional embeddings,
# overrides and isolates (they make a name display as something else), and
# the line/paragraph separators (they break log lines like a newline).
_REFUSED_FORMAT = frozenset(
    "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
)


def _show(s: str, limit: int = 60) -> str:
    """A short, escaped rendering of part of a name for an error message."""
    r = repr(s)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def _check_char(ch: str, name: str) -> None:
    cp = ord(ch)
    if cp < 0x20 or 0x7F <= cp <= 0x9F:
        if cp == 0:
            raise InvalidName(f"name {_show(name)} contains a NUL character")
        raise InvalidName(
            f"name {_show(name)} contains control character U+{cp:04X}"
        )
    if 0xD800 <= cp <= 0xDFFF:
        raise InvalidName(
            f"name {_show(name)} contains a lone surrogate U+{cp:04X}"
        )
    if ch in _REFUSED_FORMAT:
        raise InvalidName(
            f"name {_show(name)} contains bidirectional or separator "
            f"character U+{cp:04X}"
        )


def _check_component(part: str, name: str) -> None:
    if part == "":
        raise InvalidName(
            f"name {_show(name)} has an empty path component ('//' or a "
            "trailing '/')"
        )
    if part in (".", ".."):
        raise InvalidName(
            f"name {_show(name)} contains a {part!r} component; "
            "relative path tricks are not allowed"
        )
    if part.startswith("."):
        raise InvalidName(
            f"component {_show(part)} of name {_show(name)} starts with '.'; "
            "hidden names are not allowed"
        )
    if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
        raise InvalidName(
            f"component {_show(part)} of name {_show(name)} is longer than "
            f"{MAX_COMPONENT_BYTES} bytes in UTF-8"
        )
    if part.endswith((" ", ".")):
        raise InvalidName(
            f"component {_show(part)} of name {_show(name)} ends with a space "
            "or a dot"
        )
    stem = part.split(".", 1)[0].rstrip(" ").upper()
    if stem in _WINDOWS_RESERVED:
        raise InvalidName(
            f"component {_show(part)} of name {_show(name)} is a reserved "
            f"Windows device name ({stem})"
        )


def validate_name(name: str) -> str:
    """
    Check a client-chosen remote name and return it NFC-normalised.

    Accepted: a relative path of one or more "/"-separated components, in
    any script.  Refused (L{InvalidName}, never rewritten): a non-string,
    the empty name, more than L{MAX_NAME_BYTES} UTF-8 bytes, a component of
    more than L{MAX_COMPONENT_BYTES} bytes, a leading "/", a backslash,
    empty components, "." and "..", components starting with ".", control
    characters (C0, DEL, C1, NUL), lone surrogates, bidirectional controls,
    line/paragraph separators, components ending with a space or a dot, and
    Windows device names (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with or without
    an extension, in any case): a Windows machine reading C{complete/} would
    open the device, not the file.  A colon is an ordinary character on the
    POSIX storage (C{"C:/x"}, C{"10:30.tif"} are accepted): at worst such a
    name is unusable on Windows, never another thing.

    Called by storage backends on every new upload.

    @raise InvalidName: with a message saying what is wrong.
    """
    if not isinstance(name, str):
        raise InvalidName(f"name must be text, not {type(name).__name__}")
    if name == "":
        raise InvalidName("name is empty")
    for ch in name:
        _check_char(ch, name)
    name = unicodedata.normalize("NFC", name)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise InvalidName(
            f"name {_show(name)} is longer than {MAX_NAME_BYTES} bytes in UTF-8"
        )
    if name.startswith("/"):
        raise InvalidName(f"name {_show(name)} is absolute; use a relative path")
    if "\\" in name:
        raise InvalidName(
            f"name {_show(name)} contains a backslash; separate directories "
            "with '/'"
        )
    parts = name.split("/")
    for part in parts:
        _check_component(part, name)
    return "/".join(parts)


def _fit(stem: str, tag: str, suffix: str) -> str:
    """C{stem.tag + suffix}, shortening stem (then suffix) to fit a component."""
    while True:
        leaf = f"{stem}.{tag}{suffix}" if stem else f"{tag}{suffix}"
        if len(leaf.encode("utf-8")) <= MAX_COMPONENT_BYTES:
            return leaf.rstrip(" .")
        if stem:
            stem = stem[:-1]
        else:
            suffix = suffix[:-1]


def if_exists_policy(metadata: Mapping[str, str]) -> str:
    """
    The C{if-exists} policy an upload's metadata asks for (C{"rename"} when
    it names none).  The server machine has checked the value at UPLOAD.
    """
    return metadata.get(IF_EXISTS_KEY, IF_EXISTS_POLICIES[0])


def completion_candidates(
    name: str, upload_id: str, if_exists: str = "rename"
) -> Iterator[str]:
    """
    Yield the paths (relative to C{complete/}) a completed upload may take,
    best first: C{name} itself, then C{<stem>.<first 8 hex of id><suffix>},
    then C{<stem>.<id><suffix>}, then C{<stem>.<id>-<n><suffix>}.  A backend
    takes the first one that is free and never replaces an existing file.
    An upload whose C{if_exists} policy is C{"fail"} may only take C{name}:
    when it is taken the backend raises L{imgresume.errors.NameTaken}.

    C{name} must already be valid (L{validate_name}).  Stem and suffix split
    the last component like L{pathlib.PurePosixPath}: C{"a.tar.gz"} gives
    C{"a.tar"} and C{".gz"}.  Long stems are shortened so every candidate's
    last component fits in L{MAX_COMPONENT_BYTES}.
    """
    yield name
    if if_exists == "fail":
        return
    parent, slash, leaf = name.rpartition("/")
    stem, dot, ext = leaf.rpartition(".")
    if not stem:
        stem, suffix = leaf, ""
    else:
        suffix = dot + ext
    tags = [upload_id[:8], upload_id]
    tags.extend(f"{upload_id}-{n}" for n in range(1, 100))
    for tag in tags:
        yield parent + slash + _fit(stem, tag, suffix)


def new_upload_id() -> str:
    """Return a fresh upload id (C{secrets.token_hex(16)})."""
    return secrets.token_hex(16)


def is_upload_id(s: object) -> bool:
    """
    Return whether C{s} is a well-formed upload id: a C{str} of exactly 32
    lowercase hex digits (no surrounding whitespace, no newline).
    """
    return isinstance(s, str) and _UPLOAD_ID.fullmatch(s) is not None
