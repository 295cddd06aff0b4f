# -*- test-case-name: tests.test_logs -*-
"""
Tests for L{imgresume.logs}: the escaping of what peers send
(L{escape}), the bounded rate of log lines about one peer
(L{PeerLogLimiter}), and JSON logs, in memory and from a real C{twistd
--logger=imgresume.logs.json_observer imgresume} process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imgresume.logs import JSONLinesObserver, PeerLogLimiter, escape, event_record
from imgresume.protocol import Hello, encode
from imgresume.testing import wait_until_connectable
from tests.support.processes import child_env


def twistd_command() -> list[str]:
    """The C{twistd} script the README runs (this interpreter's), or the same through C{-c}."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class EscapeTests(SynchronousTestCase):
    """L{escape} makes every character a peer could use to forge or hide log text visible."""

    def test_controls(self) -> None:
        """NUL, ESC, CR, LF, TAB, DEL and C1 controls become backslash escapes."""
        self.assertEqual(escape("a\x00b\x1b[31mc\rd\ne\tf\x7fg\x85h\x9b"),
                         "a\\x00b\\x1b[31mc\\rd\\ne\\tf\\x7fg\\x85h\\x9b")

    def test_bidi_and_separators(self) -> None:
        """Bidi overrides and isolates, zero-width and line/paragraph separators are escaped."""
        self.assertEqual(escape("x\u202ey\u2066z\u200b\u2028\u2029\ufeff"),
                         "x\\u202ey\\u2066z\\u200b\\u2028\\u2029\\ufeff")

    def test_backslash_is_unambiguous(self) -> None:
        """A backslash is doubled, so that a peer cannot fake an escape."""
        self.assertEqual(escape("a\\x00"), "a\\\\x00")

    def test_printable_text_unchanged(self) -> None:
        """Printable text, accents, CJK and emoji included, comes back as it was."""
        text = "scans/été 2024/報告 📄.tiff"
        self.assertIs(escape(text), text)

    def test_bytes(self) -> None:
        """Bytes are decoded as UTF-8; a byte that is not UTF-8 shows as \\xNN."""
        self.assertEqual(escape(b"caf\xc3\xa9\xff\x00"), "caf\u00e9\\xff\\x00")

    def test_other_values(self) -> None:
        """None and numbers are returned as they are."""
        self.assertIsNone(escape(None))
        self.assertEqual(escape(42), 42)

    def test_long_text_cut(self) -> None:
        """Past the limit the rest is counted, not logged."""
        self.assertEqual(escape("ab\x00" * 3, limit=4), "ab\\x00a...(5 more characters)")


class PeerLogLimiterTests(SynchronousTestCase):
    """L{PeerLogLimiter}: a few lines per peer per interval, then one summary."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)

    def test_burst_then_summary(self) -> None:
        """
        The first C{burst} events of a peer are allowed; the rest are counted
        and summarised in one line per peer when the interval ends.
        """
        limiter = PeerLogLimiter(self.log, self.clock, interval=60, burst=3)
        limiter.start()
        allowed = [limiter.allow("192.0.2.7", "MALFORMED_FRAME") for _ in range(1500)]
        allowed += [limiter.allow("192.0.2.7", "UNEXPECTED_FRAME") for _ in range(32)]
        self.assertEqual(allowed.count(True), 3)
        self.assertTrue(limiter.allow("198.51.100.1", "MALFORMED_FRAME"))
        self.assertEqual(self.events, [])
        self.clock.advance(60)
        [summary] = self.events
        self.assertEqual(summary["log_level"], LogLevel.warn)
        self.assertEqual(
            formatEvent(summary),
            "peer 192.0.2.7: 1,529 more in the last 60 s, not logged one by one: "
            "1,497 MALFORMED_FRAME, 32 UNEXPECTED_FRAME")
        self.assertEqual((summary["peer"], summary["count"]), ("192.0.2.7", 1529))
        # A new interval: the peer may be logged again.
        self.assertTrue(limiter.allow("192.0.2.7", "MALFORMED_FRAME"))
        limiter.stop()

    def test_total_burst(self) -> None:
        """Across peers, at most C{total_burst} lines per interval are allowed."""
        limiter = PeerLogLimiter(self.log, self.clock, burst=5, total_burst=10)
        allowed = [limiter.allow(f"10.0.0.{i}", "TIMEOUT") for i in range(100)]
        self.assertEqual(allowed.count(True), 10)
        limiter.flush()
        self.assertEqual(len(self.events), 90)

    def test_many_peers_share_a_summary(self) -> None:
        """Past C{max_peers}, peers share the summary line of "(other peers)"."""
        limiter = PeerLogLimiter(self.log, self.clock, burst=0, max_peers=2)
        for i in range(10):
            limiter.allow(f"10.0.0.{i}", "TIMEOUT")
        limiter.flush()
        self.assertEqual([e["peer"] for e in self.events],
                         ["10.0.0.0", "10.0.0.1", "(other peers)"])
        self.assertEqual(self.events[-1]["count"], 8)

    def test_stop_flushes(self) -> None:
        """Stopping logs the summaries owed."""
        limiter = PeerLogLimiter(self.log, self.clock, burst=0)
        limiter.start()
        limiter.allow("10.0.0.1", "TIMEOUT")
        limiter.stop()
        self.assertEqual(len(self.events), 1)


class JSONObserverTests(SynchronousTestCase):
    """L{JSONLinesObserver} writes one JSON object per event, one per line."""

    def observe(self, **event: object) -> dict:
        out = io.StringIO()
        JSONLinesObserver(out)(event)
        text = out.getvalue()
        self.assertEqual(text.count("\n"), 1)
        self.assertTrue(text.isascii())
        return json.loads(text)

    def test_record(self) -> None:
        """Time, level, namespace, the formatted message and the event's own fields."""
        record = self.observe(
            log_time=1767225600.25, log_level=LogLevel.warn, log_namespace="imgresume.x",
            log_format="upload {name} ({size} bytes)", name="a\x1b.tif", size=3,
            log_logger=object(), log_source=None)
        self.assertEqual(record, {
            "time": "2026-01-01T00:00:00.250000Z", "level": "warn",
            "namespace": "imgresume.x", "message": "upload a\x1b.tif (3 bytes)",
            "fields": {"name": "a\x1b.tif", "size": 3},
        })

    def test_failure(self) -> None:
        """An event with a failure carries its traceback."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = self.observe(log_time=0.0, log_level=LogLevel.critical,
                              log_format="oops", log_failure=failure)
        self.assertIn("ZeroDivisionError", record["failure"])

    def test_odd_values(self) -> None:
        """Values JSON cannot hold become text; bytes are escaped."""
        record = self.observe(log_format="x", thing=object(), raw=b"\x00\xff", many=(1, 2))
        self.assertTrue(record["fields"]["thing"].startswith("<object object"))
        self.assertEqual(record["fields"]["raw"], "\\x00\\xff")
        self.assertEqual(record["fields"]["many"], [1, 2])

    def test_legacy_event(self) -> None:
        """An event of the legacy API (text printed to stderr) keeps its text and system."""
        record = self.observe(log_time=0.0, log_format="{log_text}", log_text="boom",
                              log_legacy=True, message=("boom",), isError=1,
                              system="stderr", time=0.0)
        self.assertEqual((record["message"], record["system"]), ("boom", "stderr"))
        self.assertEqual(record["fields"], {})

    def test_event_record_is_what_is_written(self) -> None:
        """L{event_record} is the object written."""
        event = {"log_time": 0.0, "log_format": "hi", "log_level": LogLevel.info}
        self.assertEqual(self.observe(**event), event_record(event))


class TwistdJSONLogTests(SynchronousTestCase):
    """
    A real C{twistd --logger=imgresume.logs.json_observer imgresume}: one
    JSON object per line, to the C{--logfile} (or stdout with C{-}).
    """

    def start(self, *twistd_options: str) -> tuple[subprocess.Popen, str]:
        work = tempfile.mkdtemp(prefix="imgr-")
        self.addCleanup(shutil.rmtree, work, True)
        storage = os.path.join(work, "storage")
        os.mkdir(storage)
        sock = os.path.join(work, "s.sock")
        argv = [*twistd_command(), "-n", "--pidfile=", *twistd_options,
                "--logger=imgresume.logs.json_observer", "imgresume",
                "--listen", f"unix:{sock}", "--storage", storage, "--server-id", "json-node"]
        proc = subprocess.Popen(argv, env=child_env(), cwd=work, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        wait_until_connectable(sock, timeout=60, proc=proc)
        # A WELCOME means the reactor runs (and handles SIGTERM).
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(sock)
            s.sendall(encode(Hello("json-test")))
            self.assertTrue(s.recv(1024))
        return proc, work

    def stop(self, proc: subprocess.Popen) -> tuple[str, str]:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        # twistd ends by the signal it got, once it has shut down cleanly.
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), err)
        return out, err

    def assertJSONLines(self, text: str) -> list[dict]:
        """Every line of C{text} is one JSON object; return them."""
        lines = text.splitlines()
        self.assertGreater(len(lines), 3, text)
        records = [json.loads(line) for line in lines]
        for record in records:
            self.assertEqual(set(record) - {"failure", "system"},
                             {"time", "level", "namespace", "message", "fields"})
        messages = [r["message"] for r in records]
        self.assertTrue(any("storage self-test of" in m for m in messages), messages)
        self.assertTrue(any(m == "Server Shut Down." for m in messages), messages)
        return records

    def test_logfile(self) -> None:
        """With C{--logfile}, JSON lines go to that file and nothing to the terminal."""
        proc, work = self.start("--logfile=server.log")
        out, err = self.stop(proc)
        self.assertEqual((out, err), ("", ""))
        with open(os.path.join(work, "server.log")) as f:
            records = self.assertJSONLines(f.read())
        [passed] = [r for r in records if "storage self-test of" in r["message"]]
        self.assertEqual((passed["level"], passed["namespace"]),
                         ("info", "imgresume.server._storagecheck"))
        self.assertGreater(passed["fields"]["count"], 5)
        [handshake] = [r for r in records if r["message"].startswith("handshake from")]
        self.assertEqual(handshake["fields"]["client"], "json-test")

    def test_stdout(self) -> None:
        """With C{--logfile=-}, JSON lines go to stdout."""
        proc, _ = self.start("--logfile=-")
        out, err = self.stop(proc)
        self.assertJSONLines(out)
        self.assertEqual(err, "")

    def test_observer_importable_as_twistd_names_it(self) -> None:
        """twistd resolves the name given to C{--logger} (with C{namedAny})."""
        from twisted.python.reflect import namedAny

        from imgresume.logs import json_observer

        self.assertIs(namedAny("imgresume.logs.json_observer"), json_observer)
