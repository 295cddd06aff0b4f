# -*- test-case-name: tests.balancer.test_splice -*-
"""
The zero-copy relay: the bytes of a client and its backend connection moved
by C{splice(2)} through a kernel pipe, never through Python, once both are
plain sockets (TCP or UNIX) on Linux.

L{SpliceRelay} takes over the two sockets from their Twisted transports
(which stop reading) and registers one small descriptor per socket with the
reactor. Each direction (C{up}: client to backend, C{down}: backend to
client) runs the same loop, as HAProxy does with C{option splice-auto}::

    readable source --splice--> pipe --splice--> destination

A direction reads only while its pipe is empty. When the destination takes
only part of what the pipe holds (C{EAGAIN}), the direction stops reading
its source and waits for the destination to become writable: the pipe is
the whole buffer, so a slow peer holds at most one pipe's worth in the
balancer, in the kernel. A direction holds a pipe only while bytes are in
it; an empty pipe goes back to the L{PipePool}, so idle or steady
connections share a few pipes.

When a source ends (EOF), a socket fails, or splice is refused (C{EINVAL}
and the like: a kernel or socket type without it), the relay I{hands back}:
what the pipes still hold is read into memory and written through the
Twisted transports, which read again. Twisted then finds the end or the
error itself, and the balancer's ordinary close, logging and counting run
as on the buffered path.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from typing import Any, Literal, Protocol as TypingProtocol

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._pipes import Pipe, PipePool

#: Whether this platform can splice at all (Linux, Python >= 3.10).
SPLICE_AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")

#: Rounds of read-then-write one readiness event may run per direction
#: before giving the other connections a turn.
ROUNDS = 4

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# Errors that mean "no splice here", not "this connection failed".
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

Direction = Literal["up", "down"]

log = Logger()


def _describe(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def splice(src: int, dst: int, count: int) -> int:
    """C{os.splice} with the relay's flags; a name tests can replace."""
    return os.splice(src, dst, count, flags=_FLAGS)


def can_splice(transport: Any) -> bool:
    """
    Whether C{transport} is a plain socket transport (TCP or UNIX) whose
    bytes can be spliced: not TLS, not a wrapping protocol such as the
    PROXY protocol listener's.
    """
    return (
        SPLICE_AVAILABLE
        and isinstance(transport, FileDescriptor)
        and not getattr(transport, "TLS", False)
        and callable(getattr(transport, "fileno", None))
    )


class RelayOwner(TypingProtocol):
    """What a L{SpliceRelay} reports to: the client connection it serves."""

    def relay_counted(self, up: int, down: int) -> None:
        """Bytes read from the client (C{up}) and the backend (C{down})."""

    def relay_handed_back(self, up: bytes, down: bytes) -> None:
        """
        The relay has ended and the transports are the owner's again, not
        reading: C{up} must be written to the backend, C{down} to the
        client, before anything else.
        """


@implementer(IReadDescriptor, IWriteDescriptor)
class _Socket:
    """One of the two sockets, as the reactor sees it while the relay owns it."""

    __slots__ = ("relay", "transport", "fd", "reading", "writing", "source", "sink")

    def __init__(self, relay: SpliceRelay, transport: FileDescriptor) -> None:
        self.relay = relay
        self.transport = transport
        self.fd: int = transport.fileno()
        self.reading = False
        self.writing = False
        self.source: _Flow
        self.sink: _Flow

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "imgresume-lb splice"

    def doRead(self) -> None:
        self.relay.pump(self.source)

    def doWrite(self) -> None:
        self.relay.pump(self.sink)

    def connectionLost(self, reason: Failure) -> None:
        self.relay.lost(self, reason)


class _Flow:
    """One direction: its source and sink sockets and what it holds."""

    __slots__ = ("name", "src", "dst", "pipe", "pending", "held")

    def __init__(self, name: Direction, src: _Socket, dst: _Socket) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.pipe: Pipe | None = None
        #: Bytes in the pipe.
        self.pending = 0
        #: Bytes to write before the first splice (the PROXY header and the
        #: client's early bytes).
        self.held = memoryview(b"")
        src.source = self
        dst.sink = self


class SpliceRelay:
    """
    Relays one client and its backend connection with splice(2) until either
    side ends, then hands both transports back to its L{RelayOwner}. Made
    by L{imgresume.balancer._proxy.FrontendProtocol} when both transports
    pass L{can_splice}.

    @ivar pauses: how often a source was paused because its sink was full.
    @ivar largest: the most bytes one direction has held at once.
    """

    def __init__(
        self,
        reactor: Any,
        splicer: Splicer,
        pool: PipePool,
        client: FileDescriptor,
        backend: FileDescriptor,
        owner: RelayOwner,
        context: dict[str, Any],
    ) -> None:
        """
        Relay between C{client} and C{backend}, plain socket transports
        (L{can_splice}) that are not writing, from L{start} on, with pipes
        from C{pool}. C{context} goes into log events (C{connection},
        C{client}); C{splicer} is told if splice turns out not to work here.
        """
        self._reactor = reactor
        self._splicer = splicer
        self._pool = pool
        self._owner = owner
        self._context = context
        self.active = True
        self.pauses = 0
        self.largest = 0
        self._client = _Socket(self, client)
        self._backend = _Socket(self, backend)
        self._up = _Flow("up", self._client, self._backend)
        self._down = _Flow("down", self._backend, self._client)

    def start(self, prefix: bytes = b"") -> None:
        """
        Take the sockets over from their transports and relay, C{prefix}
        to the backend first. The owner may be called back before this
        returns.
        """
        self._client.transport.stopReading()
        self._backend.transport.stopReading()
        self._up.held = memoryview(prefix)
        self.pump(self._up)
        self.pump(self._down)

    def held(self, direction: Direction) -> int:
        """Bytes one direction holds now (in its pipe or before it)."""
        flow = self._up if direction == "up" else self._down
        return flow.pending + len(flow.held)

    # -- the loop --------------------------------------------------------

    def pump(self, flow: _Flow) -> None:
        """
        Move what C{flow} can: first what it holds, then read and write up
        to L{ROUNDS} times; then set what to wait for. Called by the reactor
        through the flow's sockets.
        """
        if not self.active:
            return
        moved = 0
        try:
            if self._flush(flow):
                for _ in range(ROUNDS):
                    if flow.pipe is None:
                        flow.pipe = self._take()
                    n = splice(flow.src.fd, flow.pipe.w, flow.pipe.size)
                    if not n:  # end of stream: Twisted will read it again
                        self._count(flow, moved)
                        self._hand_back()
                        return
                    moved += n
                    flow.pending = n
                    if not self._flush(flow):
                        break
        except BlockingIOError:
            pass
        except OSError as e:
            self._count(flow, moved)
            if e.errno in _UNSUPPORTED:
                self._splicer.refused(e, self._context)
            self._hand_back()
            return
        self._count(flow, moved)
        held = flow.pending + len(flow.held)
        if held > self.largest:
            self.largest = held
        if not flow.pending and flow.pipe is not None:
            self._pool.give(flow.pipe)
            flow.pipe = None
        self._wait(flow)

    def _take(self) -> Pipe:
        """A pipe from the pool; if none can be made, say so and raise."""
        try:
            return self._pool.take()
        except OSError as e:
            log.warn(
                "no pipe for client {client}: {error}; relaying it through buffers",
                error=_describe(e),
                errno=e.errno,
                **self._context,
            )
            raise

    def _flush(self, flow: _Flow) -> bool:
        """
        Write what C{flow} holds (in memory, then in its pipe) to its sink;
        whether all of it went. Raises L{BlockingIOError} when none did.
        """
        if flow.held:
            flow.held = flow.held[os.write(flow.dst.fd, flow.held):]
            if flow.held:
                return False
        if flow.pending:
            assert flow.pipe is not None
            flow.pending -= splice(flow.pipe.r, flow.dst.fd, flow.pending)
        return not flow.pending

    def _count(self, flow: _Flow, moved: int) -> None:
        if moved:
            if flow.name == "up":
                self._owner.relay_counted(moved, 0)
            else:
                self._owner.relay_counted(0, moved)

    def _wait(self, flow: _Flow) -> None:
        """Read the source while the flow holds nothing, else wait to write."""
        blocked = bool(flow.pending or flow.held)
        if blocked and flow.src.reading:
            self.pauses += 1
        self._interest(flow.src, reading=not blocked)
        self._interest(flow.dst, writing=blocked)

    def _interest(
        self, sock: _Socket, reading: bool | None = None, writing: bool | None = None
    ) -> None:
        if reading is not None and reading != sock.reading:
            sock.reading = reading
            (self._reactor.addReader if reading else self._reactor.removeReader)(sock)
        if writing is not None and writing != sock.writing:
            sock.writing = writing
            (self._reactor.addWriter if writing else self._reactor.removeWriter)(sock)

    # -- ending ----------------------------------------------------------

    def _hand_back(self) -> None:
        """
        Stop relaying: unregister both sockets, read what the pipes hold
        into memory, and give it and the transports to the owner.
        """
        if not self.active:
            return
        self.active = False
        for sock in (self._client, self._backend):
            self._reactor.removeReader(sock)
            self._reactor.removeWriter(sock)
            sock.reading = sock.writing = False
        up, down = self._drain(self._up), self._drain(self._down)
        self._owner.relay_handed_back(up, down)

    def _drain(self, flow: _Flow) -> bytes:
        out = [bytes(flow.held)]
        flow.held = memoryview(b"")
        pipe, flow.pipe = flow.pipe, None
        if pipe is not None:
            try:
                while flow.pending > 0:
                    chunk = os.read(pipe.r, flow.pending)
                    if not chunk:
                        break
                    out.append(chunk)
                    flow.pending -= len(chunk)
            except OSError:
                pass
            self._pool.give(pipe, empty=flow.pending == 0)
            flow.pending = 0
        return b"".join(out)

    def lost(self, sock: _Socket, reason: Failure) -> None:
        """
        The reactor dropped one of the sockets (a hang-up it saw while the
        relay did not read it, or the reactor's shutdown): hand back, then
        close that transport as the reactor would have.
        """
        self._hand_back()
        sock.transport.connectionLost(reason)


class Splicer:
    """
    The balancer's choice of relay for each client connection: a
    L{SpliceRelay} when splice is on and both transports are plain sockets,
    else none (the caller relays through buffers). Holds the L{PipePool}.
    One per L{imgresume.balancer.BalancerFactory}.
    """

    def __init__(self, wanted: bool = True) -> None:
        """
        @param wanted: C{False} (C{--no-splice}) relays everything through
            buffers.
        """
        self.wanted = wanted
        #: The pipes; L{None} while splice is off.
        self.pool: PipePool | None = PipePool() if wanted and SPLICE_AVAILABLE else None

    def relay(
        self, reactor: Any, client: Any, backend: Any, owner: RelayOwner,
        context: dict[str, Any],
    ) -> SpliceRelay | None:
        """
        A relay for this pair of transports, or L{None} for buffers.
        C{context} goes into its log events: C{connection} and C{client}.
        """
        if self.pool is None or not (can_splice(client) and can_splice(backend)):
            return None
        return SpliceRelay(reactor, self, self.pool, client, backend, owner, context)

    def announce(self) -> None:
        """Log how the balancer relays, and the open files limit."""
        if self.pool is not None:
            mode = "splice(2) between plain sockets, buffers otherwise"
        elif self.wanted:
            mode = "buffers (splice(2) is not available on this platform)"
        else:
            mode = "buffers (--no-splice)"
        log.info(
            "relaying with {mode}; open files limit {openFiles}",
            mode=mode,
            splice=self.pool is not None,
            openFiles=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        )

    def refused(self, error: OSError, context: dict[str, Any]) -> None:
        """
        Splice failed with C{error} in a way that says it cannot work here
        (C{EINVAL}...): relay every later connection through buffers.
        Called by the owner of the relay that saw it.
        """
        pool, self.pool = self.pool, None
        if pool is None:
            return
        pool.close()
        log.warn(
            "splice(2) refused for client {client}: {error}; relaying through"
            " buffers from now on",
            error=_describe(error),
            errno=error.errno,
            **context,
        )

    def stop(self) -> None:
        """Close the idle pipes (the balancer stops listening)."""
        if self.pool is not None:
            self.pool.clear()
