# -*- test-case-name: tests.test_integrity -*-
"""
The integrity algorithms both ends of an upload agree on, and how they
agree (docs/protocol.md, section 2b).

Two kinds, each chosen per connection in HELLO/WELCOME:

  - the per-packet B{checksum} of every DATA payload (and of the storage
    journal's records): C{crc32c} (Castagnoli, hardware-accelerated; the
    default) or C{crc32} (ISO-HDLC / zlib; what a peer that negotiates
    nothing uses);
  - the whole-file B{digest}, 32 bytes: C{blake3} (BLAKE3-256; the
    default) or C{sha256} (what a peer that negotiates nothing uses).

The C implementations (C{zlib}, the C{crc32c} package, C{hashlib}, the
C{blake3} package) release the GIL on large buffers, so a thread that
checksums or hashes does not hold up the reactor.  Where each runs was
chosen by measurement (docs/benchmarks.md, "Integrity work on the reactor
thread"): the server checks a DATA payload's CRC-32C on the reactor thread
(44 us per MiB, less than a hand-off to a thread costs the reactor), and
BLAKE3 hashes on the calling thread only (C{max_threads=1}; its own thread
pool was slower beside a busy reactor on two cores, and cost more CPU).

This module is the one table of names: the protocol machines, the server,
the client and the storage backends look algorithms up here and nowhere
else.  It imports nothing of imgresume's.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Callable, Mapping, Protocol

import blake3 as _blake3
import crc32c as _crc32c


class Hasher(Protocol):
    """A running whole-file digest (hashlib's interface)."""

    def update(self, data: bytes | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


#: Checksum functions: C{f(data, running=0) -> u32}, resumable like
#: C{zlib.crc32}; C{f(b"")} is 0.
CHECKSUMS: Mapping[str, Callable[..., int]] = {
    "crc32c": _crc32c.crc32c,
    "crc32": zlib.crc32,
}


def _new_blake3() -> Hasher:
    # On the calling thread only, without the GIL: the disk or hash thread
    # that calls it.  Spread over the cores (max_threads=AUTO) it competed
    # with the reactor for them (docs/benchmarks.md).
    return _blake3.blake3(max_threads=1)


#: Digest constructors, each making a L{Hasher} of 32-byte digests.
DIGESTS: Mapping[str, Callable[[], Hasher]] = {
    "blake3": _new_blake3,
    "sha256": hashlib.sha256,
}

#: Every digest is this many bytes.
DIGEST_SIZE = 32

#: How humans see the names (logs, messages, the CLI).
TITLES: Mapping[str, str] = {
    "crc32c": "CRC-32C", "crc32": "CRC-32", "blake3": "BLAKE3", "sha256": "SHA-256",
}

#: What this build prefers, best first.
CHECKSUM_PREFERENCE = ("crc32c", "crc32")
DIGEST_PREFERENCE = ("blake3", "sha256")

#: What a peer that negotiates nothing uses (every imgresume before
#: negotiation, and every record without an algorithm field).
LEGACY_CHECKSUM = "crc32"
LEGACY_DIGEST = "sha256"

#: The defaults of this build.
DEFAULT_CHECKSUM = CHECKSUM_PREFERENCE[0]
DEFAULT_DIGEST = DIGEST_PREFERENCE[0]

#: HELLO options: the algorithms the client can use, best first, comma-separated.
HELLO_CHECKSUMS = "checksums"
HELLO_DIGESTS = "digests"
#: WELCOME options: the ones the server chose for this connection.
WELCOME_CHECKSUM = "checksum"
WELCOME_DIGEST = "digest"


def checksum(name: str, data: bytes | memoryview, running: int = 0) -> int:
    """The C{name} checksum of C{data}, continuing from C{running}."""
    return CHECKSUMS[name](data, running)


def new_digest(name: str) -> Hasher:
    """A fresh C{name} hasher."""
    return DIGESTS[name]()


def digest_of(name: str, data: bytes | memoryview) -> bytes:
    """The C{name} digest of C{data}, in one call."""
    h = new_digest(name)
    h.update(data)
    return h.digest()


#: The digest of no bytes, per algorithm (ACCEPTED's tail when nothing is stored).
EMPTY_DIGESTS: Mapping[str, bytes] = {name: digest_of(name, b"") for name in DIGESTS}


def title(name: str) -> str:
    """The human name of an algorithm (C{"blake3"} -> C{"BLAKE3"})."""
    return TITLES.get(name, name)


def _choose(offered: str | None, known: tuple[str, ...], legacy: str) -> str:
    """The first of a client's offered names this end knows, else C{legacy}."""
    if offered is None:
        return legacy
    for name in offered.split(","):
        if name in known:
            return name
    return legacy


def hello_options(digest: str = DEFAULT_DIGEST) -> dict[str, str]:
    """
    The HELLO options of a client that wants C{digest} for its uploads:
    every checksum this build knows, best first, and that digest alone.
    """
    if digest not in DIGESTS:
        raise ValueError(f"unknown digest {digest!r}; known: {', '.join(DIGESTS)}")
    return {HELLO_CHECKSUMS: ",".join(CHECKSUM_PREFERENCE), HELLO_DIGESTS: digest}


def negotiate(hello: Mapping[str, str]) -> tuple[str, str, dict[str, str]]:
    """
    The server's side: from a HELLO's options, the checksum and digest of
    the connection, and the WELCOME options that announce them.  A HELLO
    that names neither gets the legacy pair and no options (an old client
    knows none); a key the client sent is always answered.
    """
    chosen_checksum = _choose(hello.get(HELLO_CHECKSUMS), CHECKSUM_PREFERENCE, LEGACY_CHECKSUM)
    chosen_digest = _choose(hello.get(HELLO_DIGESTS), DIGEST_PREFERENCE, LEGACY_DIGEST)
    options = {}
    if HELLO_CHECKSUMS in hello:
        options[WELCOME_CHECKSUM] = chosen_checksum
    if HELLO_DIGESTS in hello:
        options[WELCOME_DIGEST] = chosen_digest
    return chosen_checksum, chosen_digest, options


def agreed(hello: Mapping[str, str], welcome: Mapping[str, str]) -> tuple[str, str]:
    """
    The client's side: the checksum and digest a WELCOME chose.  A server
    that names none (an old server) uses the legacy pair.

    @raise ValueError: the server chose something the client did not offer.
    """
    result = []
    for hello_key, welcome_key, legacy in (
        (HELLO_CHECKSUMS, WELCOME_CHECKSUM, LEGACY_CHECKSUM),
        (HELLO_DIGESTS, WELCOME_DIGEST, LEGACY_DIGEST),
    ):
        chosen = welcome.get(welcome_key, legacy)
        offered = hello.get(hello_key, "").split(",") + [legacy]
        if chosen not in offered:
            raise ValueError(f"server chose {welcome_key} {chosen!r}, which was not offered")
        result.append(chosen)
    return result[0], result[1]


def mismatch_message(upload_id: str, stored: str, negotiated: str) -> str:
    """
    Why a RESUME of an upload created with digest C{stored} is refused on a
    connection that negotiated C{negotiated} (DIGEST_ALGORITHM_MISMATCH).
    """
    return (
        f"upload {upload_id} was created with {title(stored)} digests, but this "
        f"connection negotiated {title(negotiated)}: resume it from a client asking "
        f"for {title(stored)} (imgresume upload --digest {stored}), or start a fresh upload"
    )
