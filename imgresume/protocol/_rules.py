# -*- test-case-name: tests.protocol.test_server_machine,tests.test_errors -*-
"""
What a server checks without its storage, and how a broken rule travels.

The limits a server announces in WELCOME and enforces (L{ServerLimits}),
the form of a client id (L{CLIENT_ID_RE}) and of upload metadata, with the
C{if-exists} policy it may name (L{check_metadata}), and the ERROR frame
that carries an exception to the peer (L{error_frame}).  Used by the server
machine, L{imgresume.protocol._server.ServerConnection}.
"""

from __future__ import annotations

import re
from typing import Mapping

import attrs

from imgresume.errors import (
    FileTooLarge,
    HandshakeRejected,
    ImgresumeError,
    InvalidMetadata,
    InvalidName,
    UnsupportedVersion,
)
from imgresume.names import IF_EXISTS_KEY, IF_EXISTS_POLICIES, MAX_NAME_BYTES
from imgresume.protocol._codec import not_utf8
from imgresume.protocol._frames import PROTOCOL_VERSION, Error, Hello, Upload, Welcome

CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._@:+-]{1,128}\Z")
METADATA_KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
MAX_METADATA_ENTRIES = 64
MAX_METADATA_VALUE = 4096
MAX_MESSAGE_BYTES = 1024


@attrs.frozen
class ServerLimits:
    """Limits a server announces in WELCOME and enforces."""

    max_payload: int = 4 * 1024 * 1024
    chunk_size: int = 1024 * 1024
    max_file_size: int = 1 << 40
    #: The largest file taken whole in one PUT frame (0, the default here:
    #: PUT not offered; C{twistd imgresume} offers 4 MiB, C{--max-put});
    #: announced in WELCOME as C{put}, capped by C{max_payload} and
    #: C{max_file_size}.
    max_put: int = 0
    #: PUTs of one connection stored at once (not announced: a client may
    #: pipeline more, which wait in the connection's buffer).
    puts_at_once: int = 4

    @property
    def put_limit(self) -> int:
        """The largest file a PUT may carry, as announced (0: PUT not offered)."""
        return max(0, min(self.max_put, self.max_payload, self.max_file_size))


def welcome_frame(server_id: str, limits: ServerLimits, negotiated: Mapping[str, str],
                  extra: Mapping[str, str]) -> Welcome:
    """
    The WELCOME of a server machine with C{limits}: it takes the SHA-256 at
    the end (FINISH), hands every UPLOAD's if-exists policy to its caller,
    answers the client's integrity offers (C{negotiated}), offers PUT if
    C{limits} say so, and adds the caller's C{extra} options.
    """
    return Welcome(
        version=PROTOCOL_VERSION,
        server_id=server_id,
        max_payload=limits.max_payload,
        max_file_size=limits.max_file_size,
        chunk_size=limits.chunk_size,
        options={"late-digest": "1", "if-exists": ",".join(IF_EXISTS_POLICIES),
                 **negotiated,
                 **({"put": str(limits.put_limit)} if limits.put_limit else {}),
                 **extra},
    )


def error_frame(error: ImgresumeError) -> Error:
    """The ERROR frame that carries an exception to the peer."""
    message = error.message.encode("utf-8")[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
    return Error(
        code=int(error.code),
        message=message,
        offset=min(max(error.offset, 0), 2**64 - 1),
        retry_after_ms=min(max(int(error.retry_after * 1000), 0), 2**32 - 1),
    )


def check_metadata(
    metadata: Mapping[str, str], digest_declared: bool = True
) -> ImgresumeError | None:
    """
    Why the metadata of an UPLOAD is refused, or None if it is fine.  The
    metadata may name the upload's C{if-exists} policy; C{skip} needs the
    file's SHA-256 declared in the UPLOAD (C{digest_declared}), not in FINISH.
    """
    if len(metadata) > MAX_METADATA_ENTRIES:
        return InvalidMetadata(f"at most {MAX_METADATA_ENTRIES} metadata entries")
    for key, value in metadata.items():
        if not_utf8(key) or not_utf8(value):
            return InvalidMetadata(f"metadata {key!r:.80} is not valid UTF-8")
        if not METADATA_KEY_RE.match(key):
            return InvalidMetadata(
                "metadata keys are 1-128 characters of A-Z a-z 0-9 . _ -"
            )
        if len(value.encode("utf-8")) > MAX_METADATA_VALUE:
            return InvalidMetadata(
                f"metadata value for {key!r} is over {MAX_METADATA_VALUE} bytes"
            )
    policy = metadata.get(IF_EXISTS_KEY, IF_EXISTS_POLICIES[0])
    if policy not in IF_EXISTS_POLICIES:
        return InvalidMetadata(
            f"{IF_EXISTS_KEY} must be one of {', '.join(IF_EXISTS_POLICIES)}, "
            f"not {policy!r:.80}"
        )
    if policy == "skip" and not digest_declared:
        return InvalidMetadata(
            f"{IF_EXISTS_KEY}=skip needs the file's SHA-256 in UPLOAD: the server "
            "compares it with the stored file's before any byte is sent"
        )
    return None


def check_hello(hello: Hello) -> None:
    """
    Refuse a HELLO whose versions exclude this one, or whose client id is
    malformed.

    @raise UnsupportedVersion: no version in common.
    @raise HandshakeRejected: the client id is malformed.
    """
    if not (hello.version_min <= PROTOCOL_VERSION <= hello.version_max):
        raise UnsupportedVersion(
            f"client speaks versions {hello.version_min}-{hello.version_max}; "
            f"this server speaks {PROTOCOL_VERSION}"
        )
    if not CLIENT_ID_RE.match(hello.client_id):
        raise HandshakeRejected(
            "client id must be 1-128 characters of A-Z a-z 0-9 . _ @ : + -"
        )


def check_request(upload: Upload, max_size: int, too_large: str) -> ImgresumeError | None:
    """
    Why an UPLOAD (or the UPLOAD a PUT stands for) is refused before storage
    sees it, or None: its size over C{max_size} (C{too_large} says why),
    then its name's encoding and length, then its metadata, in that order
    (docs/protocol.md, UPLOAD and PUT).
    """
    if upload.size > max_size:
        return FileTooLarge(too_large)
    if not_utf8(upload.name):
        return InvalidName("name is not valid UTF-8")
    if len(upload.name.encode("utf-8")) > MAX_NAME_BYTES:
        return InvalidName(f"name is longer than {MAX_NAME_BYTES} bytes")
    return check_metadata(upload.metadata, upload.sha256 is not None)
