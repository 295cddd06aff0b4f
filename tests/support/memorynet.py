"""
An in-memory network for client tests: L{MemoryNetwork} is a client
endpoint whose every connection is joined through L{iosim} to a real server
protocol over a L{MemoryStorage}, all on one fake clock (L{InstantReactor}).
"""

from __future__ import annotations

from typing import Any, Callable

from zope.interface import implementer

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage


class InstantReactor(Clock):
    """
    A fake clock that is also enough of a reactor for the uploader: with a
    runner that does file work on this thread, C{callFromThread} runs the
    call at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


@implementer(IStreamClientEndpoint)
class MemoryNetwork:
    """
    A client endpoint whose every connection is joined through L{iosim} to
    a new protocol of one real L{UploadServerFactory} over a
    L{MemoryStorage}, all on one fake clock.  L{run} pumps the bytes and
    lets time pass until a Deferred fires.
    """

    def __init__(self, clock: InstantReactor, storage: MemoryStorage | None = None,
                 **factory_kwargs: Any) -> None:
        self.clock = clock
        self.storage = storage or MemoryStorage(busy_retry_after=0.05)
        self.factory = UploadServerFactory(self.storage, "mem", clock, **factory_kwargs)
        self.pumps: list[iosim.IOPump] = []

    def __repr__(self) -> str:
        # What the journal keys entries by: the same for every network.
        return "MemoryNetwork()"

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        server = self.factory.buildProtocol(None)
        self.pumps.append(iosim.connect(
            server, iosim.FakeTransport(server, isServer=True),
            client, iosim.FakeTransport(client, isServer=False),
            greet=False, clock=self.clock,
        ))
        return succeed(client)

    def cut(self) -> None:
        """Break the newest connection, as a crashed server would."""
        self.pumps[-1].serverIO.abortConnection()

    def run(self, d: Deferred[Any], limit: int = 100_000) -> Any:
        """Pump and let time pass until C{d} fires; its result (a failure raises)."""
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        for _ in range(limit):
            if outcome:
                break
            if not any([pump.pump() for pump in self.pumps]):  # every pump, each time
                self.clock.advance(0.01)
        else:
            raise AssertionError("the Deferred never fired")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]
