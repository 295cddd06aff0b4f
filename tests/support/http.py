"""
tus requests to an in-memory server: a L{TusSite} over a
L{MemoryStorage} on a fake clock, its connections on C{StringTransport}s
(L{TusWire}), the answers parsed (L{Answer}).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import attrs
from zope.interface import implementer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport

from imgresume.http import TusUploads, tus_site
from imgresume.storage.memory import MemoryStorage

TUS = {"Tus-Resumable": "1.0.0"}


@attrs.frozen
class Answer:
    """One HTTP response: status, headers (lower-case names), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def __getitem__(self, name: str) -> str:
        return self.headers[name.lower()]

    def get(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def parse_answers(data: bytes) -> list[Answer]:
    """The responses in C{data}, in order."""
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        answers.append(Answer(status, headers, rest[:length]))
        data = rest[length:]
    return answers


def metadata(**entries: str) -> str:
    """An C{Upload-Metadata} value."""
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in entries.items())


def repr_digest(data: bytes) -> str:
    """C{Repr-Digest} of C{data}."""
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """A L{StringTransport} that says it is TCP, and can half-close."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class TusWire:
    """
    One connection to an in-memory tus site: L{send} raw bytes,
    L{request} one whole request and get its L{Answer}.
    """

    def __init__(self, site: Any, tcp: bool = False) -> None:
        self.site = site
        kind = TCPStringTransport if tcp else StringTransport
        self.transport = kind(peerAddress=IPv4Address("TCP", "127.0.0.1", 4321))
        self.proto = site.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def head(self, method: str, path: str, headers: dict[str, str],
             length: int | None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes = b"", tus: bool = True) -> Answer | None:
        """Send a request; its answer, or None if none came (yet)."""
        all_headers = {**(TUS if tus else {}), **(headers or {})}
        self.transport.clear()
        self.send(self.head(method, path, all_headers, len(body)) + body)
        answers = parse_answers(self.transport.value())
        return answers[-1] if answers else None

    def answers(self) -> list[Answer]:
        return parse_answers(self.transport.value())

    def lose(self) -> None:
        """The client's connection breaks."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.proto.connectionLost(Failure(ConnectionLost("cut")))


def memory_stored_sha256(storage: Any) -> Any:
    """
    For a L{MemoryStorage}: the SHA-256 of an upload's stored bytes (what
    the filesystem's wiring reads from its data file).
    """

    def digest(writer: Any) -> Any:
        from twisted.internet.defer import succeed

        data = storage._uploads[writer.info.upload_id].data
        return succeed(hashlib.sha256(bytes(data)).digest())

    return digest


class TusServer:
    """A tus site over C{storage} (a fresh L{MemoryStorage}) on a fake clock."""

    def __init__(self, storage: Any = None, clock: Any = None, **options: Any) -> None:
        self.storage = storage if storage is not None else MemoryStorage()
        self.clock = clock if clock is not None else MemoryReactorClock()
        self.events: list[dict[str, Any]] = []
        options.setdefault("max_size", 1 << 30)
        options.setdefault("stored_sha256", memory_stored_sha256(self.storage))

        def emit(kind: str, **fields: Any) -> None:
            self.events.append({"event": kind, **fields})

        limits = {k: options.pop(k) for k in ("max_pending", "checksum_limit", "cors_origins",
                                              "upload_page")
                  if k in options}
        self.uploads = TusUploads(self.storage, clock=self.clock, server_id="test",
                                  emit=emit, **options)
        self.site = tus_site(self.uploads, reactor=self.clock, **limits)

    def wire(self, tcp: bool = False) -> TusWire:
        return TusWire(self.site, tcp)

    def create(self, size: int, **headers: str) -> str:
        """Create an upload; its path."""
        answer = self.wire().request("POST", "/files/", {"Upload-Length": str(size),
                                                          **headers})
        assert answer is not None and answer.status == 201, answer
        return answer["Location"]
