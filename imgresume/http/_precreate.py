# -*- test-case-name: tests.http.test_precreate -*-
"""
The pre-create hook: before a tus upload is created, a command or a URL
the operator names (C{--http-pre-create}) is asked whether to accept it,
from what the request carries (its headers, such as an application's
session cookie or token, its metadata, its size).  It blocks the creation,
with a timeout: the application decides who may upload what, as tusd's
C{pre-create} hook lets it.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Protocol, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from imgresume.http._headers import TusError
from imgresume.logs import escape

log = Logger()

#: What is kept of a hook's answer (its first line becomes the refusal's reason).
ANSWER_BYTES = 4096


def _reason(answer: bytes) -> str:
    lines = answer.decode("utf-8", "replace").strip().splitlines()
    return lines[0][:300] if lines else ""


class _Collect(ProcessProtocol):
    """A hook command: the request's JSON on its stdin, its stdout kept."""

    def __init__(self, body: bytes, done: Deferred[tuple[int | None, bytes]]) -> None:
        self.body, self.done, self.out = body, done, b""
        #: Fires when the process has ended and been reaped, even after a
        #: timeout has answered the request (L{PreCreateHook.idle}).
        self.reaped: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.body)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1 and len(self.out) < ANSWER_BYTES:
            self.out += data[: ANSWER_BYTES - len(self.out)]

    def processEnded(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback((getattr(reason.value, "exitCode", None), self.out))
        self.reaped.callback(None)


class _Read(Protocol):
    def __init__(self, done: Deferred[bytes]) -> None:
        self.done, self.data = done, b""

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < ANSWER_BYTES:
            self.data += data[: ANSWER_BYTES - len(self.data)]

    def connectionLost(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class PreCreateHook:
    """
    Asks a command (exit 0: accept; anything else: refuse, its first line
    of stdout the reason) or a URL (a C{POST} of the JSON; 2xx: accept;
    4xx: refuse, the first line of the body the reason; anything else:
    unavailable) about each creation.  Called by L{imgresume.http.TusUploads}.
    A refusal is a 403; a hook that fails, or does not answer within
    C{timeout} seconds, a 503 with C{Retry-After} (never an acceptance).
    """

    def __init__(self, reactor: Any, *, command: Sequence[str] | None = None,
                 url: str | None = None, timeout: float = 10.0) -> None:
        if (command is None) == (url is None):
            raise ValueError("a pre-create hook is a command or a URL")
        self._reactor = reactor
        self.command = tuple(command) if command is not None else None
        self.url = url
        self.timeout = timeout
        self._running: set[Deferred[None]] = set()

    def ask(self, request: Mapping[str, Any]) -> Deferred[None]:
        """
        Whether the creation C{request} describes may go on: fires with
        None, or fails with the L{TusError} to answer.
        """
        body = json.dumps({"event": "tus.pre-create", **request}).encode("utf-8")
        d = self._run_command(body) if self.command is not None else self._post(body)
        timer = self._reactor.callLater(self.timeout, d.cancel)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        def unavailable(failure: Failure) -> None:
            failure.trap(Exception)
            if isinstance(failure.value, TusError):
                return failure  # type: ignore[return-value]
            log.warn("pre-create hook {hook} failed: {error}", hook=self._name(),
                     error=escape(failure.getErrorMessage() or type(failure.value).__name__))
            raise TusError(503, "the pre-create hook did not answer; try again later",
                           (("Retry-After", "5"),))

        d.addBoth(done)
        d.addErrback(unavailable)
        return d

    def idle(self) -> Deferred[None]:
        """Fires once every hook command started so far has ended (a killed one reaped)."""
        return DeferredList(list(self._running)).addCallback(lambda _: None)

    def _name(self) -> str:
        return self.url if self.url is not None else os.path.basename(self.command[0])

    def _refused(self, answer: bytes, how: str) -> None:
        reason = _reason(answer) or f"refused by the pre-create hook ({how})"
        log.info("pre-create hook {hook} refused an upload: {reason}", hook=self._name(),
                 reason=escape(reason))
        raise TusError(403, reason)

    def _run_command(self, body: bytes) -> Deferred[None]:
        protocol: _Collect

        def kill(_: Deferred) -> None:
            try:
                protocol.transport.signalProcess("KILL")
            except Exception:
                pass

        ended: Deferred[tuple[int | None, bytes]] = Deferred(kill)
        protocol = _Collect(body, ended)
        self._reactor.spawnProcess(protocol, self.command[0], self.command, env=os.environ)
        self._running.add(protocol.reaped)
        protocol.reaped.addBoth(lambda _: self._running.discard(protocol.reaped))

        def judged(result: tuple[int | None, bytes]) -> None:
            code, out = result
            if code != 0:
                self._refused(out, f"exit status {code}")

        return ended.addCallback(judged)

    def _post(self, body: bytes) -> Deferred[None]:
        agent = Agent(self._reactor, connectTimeout=self.timeout)
        d = agent.request(b"POST", self.url.encode("ascii"), Headers({
            b"Content-Type": [b"application/json"],
            b"X-Imgresume-Event": [b"tus.pre-create"]}), FileBodyProducer(BytesIO(body)))

        def answered(response: Any) -> Deferred[None]:
            read: Deferred[bytes] = Deferred()
            response.deliverBody(_Read(read))

            def judge(content: bytes) -> None:
                if 200 <= response.code < 300:
                    return
                if 400 <= response.code < 500:
                    self._refused(content, f"HTTP {response.code}")
                raise RuntimeError(f"HTTP {response.code}")

            return read.addCallback(judge)

        return d.addCallback(answered)
