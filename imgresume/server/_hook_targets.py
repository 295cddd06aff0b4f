# -*- test-case-name: tests.server.test_hooks -*-
"""
Hook targets: the two ways an upload event leaves the server.

L{CommandHook} runs a program per event with the event's JSON on its stdin;
L{URLHook} POSTs the JSON to a URL.  Each has C{deliver(event, body)},
returning a Deferred that fires on success and fails with L{HookFailed}
(or the transport's error) otherwise; cancelling it stops the attempt.  The
L{imgresume.server._hooks.HookDispatcher} calls them, and retries.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

import imgresume

#: Bytes of a failed hook's output (or HTTP answer) kept for the log.
OUTPUT_KEPT = 2000


class HookFailed(Exception):
    """One attempt of a hook failed; the message says how."""


class _HookProcess(ProcessProtocol):
    """One run of a hook command: writes the JSON, keeps the output's tail."""

    def __init__(self, body: bytes, done: Deferred[None]) -> None:
        self._body = body
        self._done = done
        self._output = b""

    def connectionMade(self) -> None:
        self.transport.write(self._body)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._output = (self._output + data)[-OUTPUT_KEPT:]

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # A grandchild may still hold the pipes: stop waiting for them.
        self.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        if self._done.called:
            return  # cancelled (timed out); already reported
        if reason.check(ProcessDone):
            self._done.callback(None)
            return
        status = reason.value
        how = (f"was killed by signal {status.signal}" if getattr(status, "signal", None)
               else f"exited with status {getattr(status, 'exitCode', '?')}")
        output = self._output.decode("utf-8", "replace").strip()
        self._done.errback(HookFailed(how + (f": {output}" if output else "")))


class CommandHook:
    """
    Runs a program per event, without a shell, with the event's JSON on its
    stdin and the environment of the server plus C{IMGRESUME_EVENT} (the
    event name) and C{IMGRESUME_UPLOAD_ID}.
    """

    def __init__(self, argv: Sequence[str], reactor: Any) -> None:
        self.argv = list(argv)
        self._reactor = reactor

    def __str__(self) -> str:
        return f"command {shlex.join(self.argv)}"

    def deliver(self, event: Mapping[str, Any], body: bytes) -> Deferred[None]:
        protocol: _HookProcess
        done: Deferred[None] = Deferred(lambda _: protocol.kill())
        protocol = _HookProcess(body, done)
        env = dict(os.environ)
        env["IMGRESUME_EVENT"] = event["event"]
        env["IMGRESUME_UPLOAD_ID"] = event.get("upload_id") or ""
        self._reactor.spawnProcess(protocol, self.argv[0], self.argv, env=env)
        return done

    def close(self) -> Deferred[None]:
        return succeed(None)


class URLHook:
    """
    POSTs each event's JSON to a URL with C{twisted.web.client.Agent}, over
    persistent connections.  Headers: C{Content-Type: application/json},
    C{X-Imgresume-Event} (the event name) and C{Idempotency-Key} (the
    event's id, the same on every retry).
    """

    def __init__(self, url: str, reactor: Any, connect_timeout: float = 30.0) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool

        self.url = url
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.retryAutomatically = False  # the dispatcher retries, and counts
        self._agent = Agent(reactor, connectTimeout=connect_timeout, pool=self._pool)

    def __str__(self) -> str:
        return f"url {self.url}"

    def deliver(self, event: Mapping[str, Any], body: bytes) -> Deferred[None]:
        from twisted.web.http_headers import Headers

        headers = Headers({
            b"Content-Type": [b"application/json"],
            b"User-Agent": [f"imgresume/{imgresume.__version__}".encode()],
            b"X-Imgresume-Event": [event["event"].encode()],
            b"Idempotency-Key": [event["id"].encode()],
        })
        d = self._agent.request(b"POST", self.url.encode("utf-8"), headers,
                                _BytesProducer(body))

        def answered(response: Any) -> Deferred[None]:
            def check(content: bytes) -> None:
                if not 200 <= response.code < 300:
                    text = content[:OUTPUT_KEPT].decode("utf-8", "replace").strip()
                    phrase = response.phrase.decode("latin-1", "replace")
                    raise HookFailed(
                        f"HTTP {response.code} {phrase}" + (f": {text}" if text else ""))

            reader = _BodyHead()
            response.deliverBody(reader)
            return reader.done.addCallback(check)

        return d.addCallback(answered)

    def close(self) -> Deferred[None]:
        return self._pool.closeCachedConnections()


class _BodyHead(Protocol):
    """Reads an HTTP answer's body, keeping its first bytes for the log."""

    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred(lambda _: self.transport.stopProducing())
        self._head = b""

    def dataReceived(self, data: bytes) -> None:
        if len(self._head) < OUTPUT_KEPT:
            self._head = (self._head + data)[:OUTPUT_KEPT]

    def connectionLost(self, reason: Failure) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self._head)
        else:
            self.done.errback(reason)


@implementer(IBodyProducer)
class _BytesProducer:
    """An HTTP request body that is all in memory already."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


__all__ = ["CommandHook", "URLHook", "HookFailed", "OUTPUT_KEPT"]
