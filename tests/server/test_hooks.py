# -*- test-case-name: tests.server.test_hooks -*-
"""
Tests for L{imgresume.server._hooks}: the events the server adapter emits
and their fields, the dispatcher's retries, backoff, concurrency, bounded
queue and stop (with a fake clock and fake targets), and real deliveries:
a hook command and a hook URL (an in-test twisted.web server) told about
uploads made over real TCP, failing and slow hooks that never hold an
upload up, and a real C{twistd imgresume --hook-command} process.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
import zlib
from typing import Any

from blake3 import blake3
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from imgresume.testing import LocalCluster, free_tcp_port
from imgresume.client import Uploader
from imgresume.metrics import Registry, ServerMetrics
from imgresume.protocol import (
    Accepted,
    Ack,
    Completed,
    Data,
    Hello,
    Resume,
    Upload,
    encode,
)
from imgresume.server import UploadServerFactory, make_server_service
from imgresume.server._hook_targets import HookFailed
from imgresume.server._hooks import HookConfig, HookDispatcher
from imgresume.server._upload_events import upload_event
from imgresume.server.tap import Options as ServerOptions
from imgresume.storage.memory import MemoryStorage
from tests.support.options import server_options
from tests.support.wire import decode_frames

CONTENT = bytes(range(256)) * 40
SHA = hashlib.sha256(CONTENT).digest()

#: A hook command: appends its stdin to argv[1]; argv[2] is "ok", "fail"
#: (exit 1) or "slow" (sleep argv[3] seconds first).
HOOK_SCRIPT = """\
import sys, time
mode = sys.argv[2] if len(sys.argv) > 2 else "ok"
if mode == "slow":
    time.sleep(float(sys.argv[3]))
data = sys.stdin.buffer.read()
with open(sys.argv[1], "ab") as f:
    f.write(data)
if mode == "fail":
    print("downstream is down", file=sys.stderr)
    sys.exit(1)
"""


def write_script(directory: str) -> str:
    """The hook script, executable, in C{directory}."""
    path = os.path.join(directory, "hook.py")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\n" + HOOK_SCRIPT)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def read_events(path: str) -> list[dict[str, Any]]:
    """The JSON events a hook script appended to C{path}."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def messages(observer: EventLoggingObserver, level: LogLevel) -> list[str]:
    """The formatted log messages of one level."""
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in observer if e["log_level"] == level]


class Recorder:
    """An L{IUploadEvents} keeping what it is told."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class EventTests(SynchronousTestCase):
    """The events the server adapter emits, and their fields (in memory)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.storage = MemoryStorage()
        self.recorder = Recorder()
        self.factory = UploadServerFactory(
            self.storage, "node-a", self.clock, handshake_timeout=10, idle_timeout=60,
            events=self.recorder,
        )

    def connect(self) -> Any:
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(encode(Hello("scanner-7")))
        return proto

    def test_created_and_completed(self) -> None:
        """
        An upload emits upload.created (offset 0) then upload.completed
        (path, offset = size), with the upload's id, name, size, SHA-256,
        metadata, client and server, the time, and an id of its own.
        """
        proto = self.connect()
        proto.dataReceived(encode(Upload("scans/a.tif", len(CONTENT), SHA, {"batch": "42"})))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        created, completed = self.recorder.events
        common = {
            "server_id": "node-a", "client_id": "scanner-7", "name": "scans/a.tif",
            "size": len(CONTENT), "sha256": SHA.hex(), "metadata": {"batch": "42"},
            "time": 1_700_000_000,
        }
        self.assertEqual(created["event"], "upload.created")
        self.assertEqual({k: created[k] for k in common}, common)
        self.assertEqual(created["offset"], 0)
        self.assertRegex(created["upload_id"], "^[0-9a-f]{32}$")
        self.assertNotIn("path", created)
        self.assertEqual(completed["event"], "upload.completed")
        self.assertEqual({k: completed[k] for k in common}, common)
        self.assertEqual(completed["upload_id"], created["upload_id"])
        self.assertEqual(completed["path"], "complete/scans/a.tif")
        self.assertEqual(completed["offset"], len(CONTENT))
        self.assertFalse(completed["repeat"])
        self.assertNotEqual(created["id"], completed["id"])
        json.dumps(self.recorder.events)  # JSON-ready

    def test_resumed_failed_and_repeat(self) -> None:
        """
        A resume emits upload.resumed at the stored offset; an upload cut by
        the idle timeout emits upload.failed with the error; a resume of a
        completed upload emits upload.completed marked as a repeat; an
        unknown one upload.failed with UNKNOWN_UPLOAD.
        """
        proto = self.connect()
        proto.dataReceived(encode(Upload("b.tif", len(CONTENT), SHA)))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT[:4096]), CONTENT[:4096])))
        self.clock.advance(61)
        created, failed = self.recorder.events
        upload_id = created["upload_id"]
        self.assertEqual(failed["event"], "upload.failed")
        self.assertEqual(failed["upload_id"], upload_id)
        self.assertEqual(failed["offset"], 4096)
        self.assertEqual(failed["error"]["code"], "TIMEOUT")
        self.assertTrue(failed["error"]["retryable"])
        self.assertIn("no frame for too long", failed["error"]["message"])
        proto.connectionLost(_lost())

        proto = self.connect()
        proto.dataReceived(encode(Resume(upload_id)))
        resumed = self.recorder.events[-1]
        self.assertEqual(resumed["event"], "upload.resumed")
        self.assertEqual((resumed["upload_id"], resumed["offset"], resumed["name"]),
                         (upload_id, 4096, "b.tif"))
        rest = CONTENT[4096:]
        proto.dataReceived(encode(Data(4096, zlib.crc32(rest), rest)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        self.assertEqual(self.recorder.events[-1]["event"], "upload.completed")
        proto.dataReceived(encode(Resume(upload_id)))
        again = self.recorder.events[-1]
        self.assertEqual((again["event"], again["repeat"], again["path"]),
                         ("upload.completed", True, "complete/b.tif"))
        proto.dataReceived(encode(Resume("f" * 32)))
        unknown = self.recorder.events[-1]
        self.assertEqual((unknown["event"], unknown["upload_id"], unknown["error"]["code"]),
                         ("upload.failed", "f" * 32, "UNKNOWN_UPLOAD"))
        self.assertEqual(len(self.recorder.events), 6)

    def test_if_exists(self) -> None:
        """
        An UPLOAD skipped by if-exists=skip emits no event (no upload was
        made), and a later timeout on its connection none either; one
        refused by if-exists=fail emits upload.failed with NAME_TAKEN, and
        so does a completion refused because the name was taken meanwhile
        (the writer released for a later resume).
        """
        proto = self.connect()
        proto.dataReceived(encode(Upload("a.tif", len(CONTENT), SHA)))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        self.assertEqual(len(self.recorder.events), 2)
        proto.dataReceived(encode(Upload("a.tif", len(CONTENT), SHA, {"if-exists": "skip"})))
        self.assertEqual(len(self.recorder.events), 2)
        proto.dataReceived(encode(Upload("a.tif", len(CONTENT), SHA, {"if-exists": "fail"})))
        refused = self.recorder.events[-1]
        self.assertEqual((refused["event"], refused["upload_id"], refused["name"],
                          refused["error"]["code"], refused["error"]["retryable"]),
                         ("upload.failed", None, "a.tif", "NAME_TAKEN", False))
        proto.dataReceived(encode(Upload("a.tif", len(CONTENT), SHA, {"if-exists": "skip"})))
        self.clock.advance(61)  # the idle timeout: no upload.failed for the skipped one
        self.assertEqual(len(self.recorder.events), 3)

        proto = self.connect()
        proto.dataReceived(encode(Upload("b.tif", len(CONTENT), SHA, {"if-exists": "fail"})))
        created = self.recorder.events[-1]
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        self.storage.files["complete/b.tif"] = b"put there meanwhile"
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        failed = self.recorder.events[-1]
        self.assertEqual((failed["event"], failed["upload_id"], failed["error"]["code"]),
                         ("upload.failed", created["upload_id"], "NAME_TAKEN"))
        self.assertEqual(self.storage._owned, set())
        self.assertEqual(self.storage.files["complete/b.tif"], b"put there meanwhile")

    def test_late_digest_refused_by_quota(self) -> None:
        """
        An upload whose SHA-256 comes at the end (its UPLOAD declares 32 zero
        bytes on the wire) reports C{sha256} null in its events: in the
        upload.created of one accepted, and in the upload.failed of one the
        client's quota refuses.
        """
        self.factory = UploadServerFactory(
            self.storage, "node-a", self.clock, max_uploads_per_client=1,
            events=self.recorder,
        )
        late = encode(Upload("late.tif", len(CONTENT), SHA)).replace(SHA, bytes(32))
        first, second = self.connect(), self.connect()
        first.dataReceived(late)
        second.dataReceived(late)
        created, failed = self.recorder.events
        self.assertEqual((created["event"], created["sha256"]), ("upload.created", None))
        self.assertEqual((failed["event"], failed["error"]["code"]),
                         ("upload.failed", "QUOTA_EXCEEDED"))
        self.assertEqual((failed["name"], failed["size"]), ("late.tif", len(CONTENT)))
        self.assertIsNone(failed["sha256"])

    def test_emit_raising_is_not_the_uploads_problem(self) -> None:
        """A sink that raises is logged; the upload completes anyway."""
        def broken(event: dict[str, Any]) -> None:
            raise RuntimeError("bug in a hook")

        self.recorder.emit = broken  # type: ignore[method-assign]
        proto = self.connect()
        proto.transport.clear()
        proto.dataReceived(encode(Upload("c.tif", len(CONTENT), SHA)))
        proto.dataReceived(encode(Data(0, zlib.crc32(CONTENT), CONTENT)))
        proto.dataReceived(encode(Data(len(CONTENT), 0, b"")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        frames = [type(frame) for frame in decode_frames(proto.transport.value())]
        self.assertEqual(frames, [Accepted, Ack, Completed])


def _lost() -> Any:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    return Failure(ConnectionDone())


class FakeTarget:
    """A hook target whose every attempt the test settles by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], bytes, Deferred[None]]] = []

    def deliver(self, event: dict[str, Any], body: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((event, body, d))
        return d

    def close(self) -> Deferred[None]:
        return succeed(None)

    def __str__(self) -> str:
        return "fake"


def event(n: int) -> dict[str, Any]:
    return upload_event(
        "upload.completed", time=0.0, server_id="s", client_id="c", upload_id=f"{n:032x}",
        name=f"{n}.tif", size=1, sha256=b"\0" * 32, metadata={}, offset=1, path="p",
    )


class DispatcherTests(SynchronousTestCase):
    """L{HookDispatcher} with a fake clock and fake targets."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.target = FakeTarget()
        self.metrics = ServerMetrics(Registry())
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def dispatcher(self, **kw: Any) -> HookDispatcher:
        kw.setdefault("attempts", 4)
        kw.setdefault("backoff", 1.0)
        kw.setdefault("timeout", 30.0)
        return HookDispatcher([self.target], self.clock, metrics=self.metrics, **kw)

    def fail_last(self) -> None:
        self.target.calls[-1][2].errback(HookFailed("exited with status 1"))

    def test_body(self) -> None:
        """The body is the event as one line of JSON."""
        self.dispatcher().emit(event(1))
        [(sent, body, _)] = self.target.calls
        self.assertTrue(body.endswith(b"\n"))
        self.assertEqual(json.loads(body), event(1) | {"id": sent["id"]})

    def test_exponential_backoff_then_give_up(self) -> None:
        """
        A failing delivery is retried after 1, 2, then 4 seconds; after the
        last attempt it is given up with an error in the log.
        """
        d = self.dispatcher()
        d.emit(event(1))
        for delay in (1.0, 2.0, 4.0):
            self.fail_last()
            calls = len(self.target.calls)
            self.clock.advance(delay - 0.01)
            self.assertEqual(len(self.target.calls), calls)
            self.assertEqual(d.pending(), 1)
            self.clock.advance(0.01)
            self.assertEqual(len(self.target.calls), calls + 1)
        self.fail_last()
        self.assertEqual(len(self.target.calls), 4)
        self.assertEqual(d.pending(), 0)
        [error] = messages(self.log, LogLevel.error)
        self.assertIn("attempt 4 of 4", error)
        self.assertIn("giving up", error)
        self.assertIn("exited with status 1", error)
        self.assertEqual(len(messages(self.log, LogLevel.warn)), 3)
        self.assertEqual(self.metrics.hook_deliveries.value(result="failed"), 1)
        self.assertEqual(self.metrics.hook_attempt_failures.value(), 4)

    def test_success_after_retry(self) -> None:
        """A retry that succeeds counts as delivered."""
        d = self.dispatcher()
        d.emit(event(1))
        self.fail_last()
        self.clock.advance(1)
        self.target.calls[-1][2].callback(None)
        self.assertEqual(d.pending(), 0)
        self.assertEqual(self.metrics.hook_deliveries.value(result="delivered"), 1)

    def test_backoff_is_capped(self) -> None:
        """The wait between retries never exceeds max_backoff."""
        d = self.dispatcher(attempts=10, max_backoff=3.0)
        d.emit(event(1))
        for _ in range(5):
            self.fail_last()
            calls = len(self.target.calls)
            self.clock.advance(3.0)
            self.assertEqual(len(self.target.calls), calls + 1)

    def test_timeout(self) -> None:
        """An attempt without an answer within the timeout is cancelled and retried."""
        d = self.dispatcher(timeout=5.0)
        d.emit(event(1))
        first = self.target.calls[0][2]
        self.clock.advance(5.0)
        self.assertTrue(first.called)
        self.assertIn("no answer within 5 s", messages(self.log, LogLevel.warn)[0])
        self.clock.advance(1.0)
        self.assertEqual(len(self.target.calls), 2)

    def test_synchronous_exception(self) -> None:
        """A target raising at once is a failed attempt, not an error of emit."""
        def explode(event: Any, body: bytes) -> Deferred[None]:
            raise OSError("spawn failed")

        self.target.deliver = explode  # type: ignore[method-assign]
        d = self.dispatcher(attempts=2)
        d.emit(event(1))
        self.clock.advance(1)
        self.assertEqual(d.pending(), 0)
        self.assertIn("spawn failed", messages(self.log, LogLevel.error)[0])

    def test_concurrency(self) -> None:
        """At most C{concurrency} deliveries run at once; the rest wait in order."""
        d = self.dispatcher(concurrency=2)
        for n in range(5):
            d.emit(event(n))
        self.assertEqual(len(self.target.calls), 2)
        self.target.calls[0][2].callback(None)
        self.assertEqual(len(self.target.calls), 3)
        self.assertEqual(self.target.calls[2][0]["name"], "2.tif")
        self.assertEqual(d.pending(), 4)

    def test_queue_bound(self) -> None:
        """
        Past C{max_queue} pending deliveries the oldest queued one is
        dropped, with a warning naming its upload.
        """
        d = self.dispatcher(concurrency=1, max_queue=3)
        for n in range(1, 6):
            d.emit(event(n))
        self.assertEqual(d.pending(), 3)
        warnings = messages(self.log, LogLevel.warn)
        self.assertEqual(len(warnings), 2)
        self.assertIn(f"{2:032x}", warnings[0])
        self.assertIn(f"{3:032x}", warnings[1])
        self.assertEqual(self.metrics.hook_deliveries.value(result="dropped"), 2)
        while d.pending():
            self.target.calls[-1][2].callback(None)
        self.assertEqual([c[0]["name"] for c in self.target.calls],
                         ["1.tif", "4.tif", "5.tif"])

    def test_stop(self) -> None:
        """
        Stopping retries a waiting delivery at once, waits for it at most
        the grace period, then abandons it (logged) and fires.
        """
        d = self.dispatcher(stop_grace=2.0)
        d.startService()
        d.emit(event(1))
        self.fail_last()
        stopped = d.stopService()
        self.assertEqual(len(self.target.calls), 2)
        self.assertNoResult(stopped)
        self.clock.advance(2.0)
        self.successResultOf(stopped)
        self.assertIn("1 deliveries abandoned", messages(self.log, LogLevel.error)[-1])
        d.emit(event(2))
        self.assertEqual(len(self.target.calls), 2)
        self.assertEqual(self.metrics.hook_deliveries.value(result="dropped"), 2)


class OptionsTests(SynchronousTestCase):
    """The hook options of C{twistd imgresume}."""

    def parse(self, *args: str) -> ServerOptions:
        return server_options(self, *args)

    def test_hooks(self) -> None:
        """The command is split like a shell's and found on PATH; the rest parsed."""
        options = self.parse(
            "--hook-command", "python3 -c 'import sys; sys.stdin.read()' --flag",
            "--hook-url", "https://archive.example/hooks/imgresume",
            "--hook-attempts", "7", "--hook-backoff", "500ms", "--hook-timeout", "1m",
        )
        config = options["hooks"]
        self.assertTrue(os.path.isabs(config.command[0]))
        self.assertEqual(config.command[1:], ("-c", "import sys; sys.stdin.read()", "--flag"))
        self.assertEqual(config.url, "https://archive.example/hooks/imgresume")
        self.assertEqual((config.attempts, config.backoff, config.timeout), (7, 0.5, 60.0))

    def test_no_hooks(self) -> None:
        """Without options there are no hooks."""
        self.assertFalse(self.parse()["hooks"].enabled)

    def test_bad(self) -> None:
        """A missing program, a URL that is not HTTP, a zero count are usage errors."""
        for args in (["--hook-command", "no-such-program-imgresume"],
                     ["--hook-command", "'unbalanced"],
                     ["--hook-url", "ftp://archive.example/"],
                     ["--hook-url", "http://x/", "--hook-attempts", "0"]):
            self.assertRaises(usage.UsageError, self.parse, *args)


class _Receiver(Resource):
    """A hook URL: records POSTs; answers with the next status in C{codes}."""

    isLeaf = True

    def __init__(self, codes: list[int] | None = None) -> None:
        super().__init__()
        self.codes = list(codes or [])
        self.posts: list[tuple[Any, dict[str, Any]]] = []

    def render_POST(self, request: Any) -> bytes:
        self.posts.append((request.requestHeaders, json.loads(request.content.read())))
        code = self.codes.pop(0) if self.codes else 200
        request.setResponseCode(code)
        return b"ok" if code < 400 else b"archive is full"


class LiveTests(TestCase):
    """Hooks of an in-process server uploading over real TCP."""

    timeout = 30

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.script = write_script(self.work)
        self.out = os.path.join(self.work, "events.jsonl")
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    async def server(self, **hooks: Any) -> tuple[Any, str]:
        """A started server with these hook settings, and its client endpoint."""
        hooks.setdefault("backoff", 0.05)
        top = make_server_service(
            "tcp:0:interface=127.0.0.1", MemoryStorage(), reactor=reactor,
            server_id="node-live", gc_interval=0, hooks=HookConfig(**hooks),
        )
        top.startService()
        self.addCleanup(top.stopService)
        port = (await top.listener._waitingForPort).getHost().port
        return top, f"tcp:127.0.0.1:{port}"

    async def web(self, receiver: _Receiver) -> str:
        """Serve C{receiver} at /hook; stopped (connections closed) after the test."""
        root = Resource()
        root.putChild(b"hook", receiver)
        wrapper = WrappingFactory(Site(root))
        port = reactor.listenTCP(0, wrapper, interface="127.0.0.1")

        async def stop() -> None:
            await port.stopListening()
            for _ in range(100):  # the client's pool closes; so do these
                if not wrapper.protocols:
                    break
                await deferLater(reactor, 0.02, lambda: None)
            for proto in list(wrapper.protocols):
                proto.transport.abortConnection()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return f"http://127.0.0.1:{port.getHost().port}/hook"

    async def upload(self, endpoint: str, name: str = "a.tif") -> float:
        """Upload a 300 kB file with metadata; the seconds it took."""
        path = os.path.join(self.work, name)
        with open(path, "wb") as f:
            f.write(os.urandom(300_000))
        started = time.monotonic()
        await Uploader(endpoint, reactor=reactor, journal=None, client_id="scanner-7",
                       chunk_size=64 * 1024).upload(path, f"scans/{name}",
                                                    metadata={"batch": "42"})
        return time.monotonic() - started

    async def test_command(self) -> None:
        """
        The hook command gets upload.created then upload.completed on its
        stdin, with the upload's fields, and IMGRESUME_EVENT set.
        """
        top, endpoint = await self.server(command=(self.script, self.out))
        await self.upload(endpoint)
        await top.hooks.when_idle()
        events = read_events(self.out)
        self.assertEqual(sorted(e["event"] for e in events),
                         ["upload.completed", "upload.created"])
        completed = next(e for e in events if e["event"] == "upload.completed")
        self.assertEqual(
            {k: completed[k] for k in ("name", "size", "client_id", "server_id",
                                       "metadata", "path", "offset")},
            {"name": "scans/a.tif", "size": 300_000, "client_id": "scanner-7",
             "server_id": "node-live", "metadata": {"batch": "42"},
             "path": "complete/scans/a.tif", "offset": 300_000})
        with open(os.path.join(self.work, "a.tif"), "rb") as f:
            # BLAKE3, the default digest: no "sha256" value.
            self.assertEqual(completed["digest"], {"algorithm": "blake3",
                                                   "hex": blake3(f.read()).hexdigest()})
        self.assertIsNone(completed["sha256"])
        self.assertEqual(top.metrics.hook_deliveries.value(result="delivered"), 2)

    async def test_failing_command(self) -> None:
        """
        A command that exits 1 is retried C{attempts} times, then given up
        with an error in the log; the upload completes promptly anyway.
        """
        top, endpoint = await self.server(command=(self.script, self.out, "fail"),
                                          attempts=3)
        seconds = await self.upload(endpoint)
        self.assertLess(seconds, 5)
        await top.hooks.when_idle()
        events = read_events(self.out)
        self.assertEqual(len(events), 6)  # two events, three attempts each
        errors = messages(self.log, LogLevel.error)
        self.assertEqual(len(errors), 2)
        for error in errors:
            self.assertIn("attempt 3 of 3", error)
            self.assertIn("exited with status 1: downstream is down", error)

    async def test_slow_command(self) -> None:
        """A hook that takes 2 s never delays the upload's answers."""
        top, endpoint = await self.server(command=(self.script, self.out, "slow", "2"))
        seconds = await self.upload(endpoint)
        self.assertLess(seconds, 1.5)
        self.assertEqual(read_events(self.out), [])
        await top.hooks.when_idle()
        self.assertEqual(len(read_events(self.out)), 2)

    async def test_url(self) -> None:
        """
        The hook URL receives one POST per event, JSON, with the event name
        and its id as headers; an HTTP 500 is retried with the same id.
        """
        receiver = _Receiver(codes=[500])
        url = await self.web(receiver)
        top, endpoint = await self.server(url=url)
        await self.upload(endpoint)
        await top.hooks.when_idle()
        self.assertEqual(len(receiver.posts), 3)
        (h1, first), *rest = receiver.posts
        [(h2, retried)] = [(h, e) for h, e in rest if e["id"] == first["id"]]
        [(_, second)] = [(h, e) for h, e in rest if e["id"] != first["id"]]
        self.assertEqual(first, retried)
        self.assertEqual(h1.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(h2.getRawHeaders(b"idempotency-key"), [first["id"].encode()])
        self.assertEqual(h1.getRawHeaders(b"x-imgresume-event"), [b"upload.created"])
        self.assertEqual((first["event"], second["event"]),
                         ("upload.created", "upload.completed"))
        self.assertEqual(second["metadata"], {"batch": "42"})
        [warning] = [m for m in messages(self.log, LogLevel.warn) if "hook" in m]
        self.assertIn("HTTP 500", warning)
        self.assertIn("archive is full", warning)

    async def test_url_nothing_listening(self) -> None:
        """
        A hook URL where nothing listens is retried, then given up (logged);
        the upload completes promptly.
        """
        top, endpoint = await self.server(
            url=f"http://127.0.0.1:{free_tcp_port()}/hook", attempts=2)
        seconds = await self.upload(endpoint)
        self.assertLess(seconds, 5)
        await top.hooks.when_idle()
        errors = messages(self.log, LogLevel.error)
        self.assertEqual(len(errors), 2)
        self.assertIn("refused", errors[0].lower())


class ProcessTests(TestCase):
    """C{--hook-command} on a real C{twistd imgresume} behind C{imgresume-lb}."""

    timeout = 60

    async def test_twistd_hook_command(self) -> None:
        """An upload through the balancer reaches the server's hook command."""
        await self._hook_command(put_max=0, events=["upload.created", "upload.completed"])

    async def test_twistd_hook_command_put(self) -> None:
        """
        A small file sent whole in one PUT is created and completed in one
        step: the hook command gets C{upload.completed} alone.
        """
        await self._hook_command(put_max=4 << 20, events=["upload.completed"])

    async def _hook_command(self, put_max: int, events: list[str]) -> None:
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        script = write_script(work)
        out = os.path.join(work, "events.jsonl")
        cluster = LocalCluster(work, servers=1,
                               server_args=["--hook-command", f"{script} {out}"])
        cluster.start()
        self.addCleanup(cluster.stop)
        path = os.path.join(work, "scan.tif")
        with open(path, "wb") as f:
            f.write(os.urandom(100_000))
        result = await Uploader(cluster.lb_endpoint, reactor=reactor, journal=None,
                                client_id="scanner-9", put_max=put_max,
                                ).upload(path, "in/scan.tif")
        deadline = time.monotonic() + 10
        while len(read_events(out)) < len(events):
            self.assertLess(time.monotonic(), deadline, "hook events never arrived")
            await deferLater(reactor, 0.05, lambda: None)
        await deferLater(reactor, 0.2, lambda: None)  # nothing more comes
        self.assertEqual([e["event"] for e in read_events(out)], events)
        events = {e["event"]: e for e in read_events(out)}
        self.assertEqual(events["upload.completed"]["upload_id"], result.upload_id)
        self.assertEqual(events["upload.completed"]["server_id"], "node-1")
        self.assertEqual(events["upload.completed"]["client_id"], "scanner-9")
        self.assertEqual(events["upload.completed"]["path"], result.path)
