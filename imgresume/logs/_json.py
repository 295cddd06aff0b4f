# -*- test-case-name: tests.test_logs.JSONObserverTests,tests.test_logs.TwistdJSONLogTests -*-
"""
JSON logs: L{JSONLinesObserver} writes each log event as one JSON object on
a line of its own, and L{json_observer} is the factory twistd's C{--logger}
option names::

    twistd -n --pidfile= --logfile=node-1.log \\
        --logger=imgresume.logs.json_observer imgresume --listen ...

twistd calls the factory with no arguments and then ignores C{--logfile};
L{json_observer} honours it anyway (see L{twistd_log_target}).
"""

from __future__ import annotations

import datetime
import json
import signal
import sys
from typing import IO, Any, Callable

from twisted.logger import ILogObserver, formatEvent
from twisted.python import logfile
from zope.interface import implementer

from imgresume.logs._escape import escape

#: Keys of events from the legacy C{twisted.python.log} API that are not fields.
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "why",
                          "failure"})


def _jsonable(value: Any) -> Any:
    """A field value as JSON can carry it (anything else becomes its text)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return escape(value, limit=1 << 16)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def event_record(event: dict[str, Any]) -> dict[str, Any]:
    """
    One log event as the JSON object written for it::

        {"time": "2026-01-31T12:00:00.123456Z", "level": "info",
         "namespace": "imgresume.server._protocol",
         "message": "upload requested: scan.tiff (1048576 bytes) by scanner-7",
         "fields": {"name": "scan.tiff", "size": 1048576, "client": "scanner-7"}}

    plus C{"failure"} (the traceback, as text) for an event that carries one,
    and C{"system"} for events of the legacy API (C{"stderr"} for what was
    printed).  C{fields} holds the event's own keys, not Twisted's C{log_*}.
    """
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": (datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
                 .isoformat().replace("+00:00", "Z") if when is not None else None),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    legacy = "log_legacy" in event or "isError" in event
    if legacy and event.get("system") is not None:
        record["system"] = _jsonable(event.get("system"))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["failure"] = failure.getTraceback()
        except Exception:
            record["failure"] = repr(failure)
    record["fields"] = {
        key: _jsonable(value) for key, value in event.items()
        if not key.startswith("log_") and not (legacy and key in _LEGACY_KEYS)
    }
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes every log event to a text file as one JSON object per line
    (L{event_record}), ASCII only: non-ASCII and control characters are
    JSON escapes, so no event can break a line or reach a terminal raw.
    Made by L{json_observer} for twistd, or by a program for any file.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = json.dumps(event_record(event), ensure_ascii=True, sort_keys=False)
        except Exception as e:  # a field JSON cannot take: still one valid line
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        self.out.write(line + "\n")
        self.out.flush()


def twistd_log_target() -> tuple[str | None, bool]:
    """
    The C{--logfile} and C{--nodaemon} twistd was given, as C{(logfile,
    nodaemon)}; C{(None, True)} when not called from twistd's logger setup.

    twistd calls a C{--logger} factory with no arguments, from its
    L{twisted.application.app.AppLogger}'s C{start}, which holds the options:
    the factory finds that logger on the call stack.
    """
    from twisted.application.app import AppLogger

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, AppLogger):
            return (getattr(candidate, "_logfilename", None) or None,
                    bool(getattr(candidate, "_nodaemon", True)))
        frame = frame.f_back
    return None, True


def json_observer() -> JSONLinesObserver:
    """
    The log observer for C{twistd --logger=imgresume.logs.json_observer}:
    JSON lines (L{JSONLinesObserver}) where twistd would have written its
    text log: the C{--logfile} file (rotated like twistd's own: at 1 MB, and
    on SIGUSR1), or stdout with C{--logfile=-} or with C{-n} and no
    C{--logfile}; a daemon without C{--logfile} writes C{twistd.log}.
    """
    path, nodaemon = twistd_log_target()
    if path == "-" or (path is None and nodaemon):
        return JSONLinesObserver(sys.stdout)
    target = logfile.LogFile.fromFullPath(path or "twistd.log")
    _rotate_on_sigusr1(target.rotate)
    return JSONLinesObserver(target)


def _rotate_on_sigusr1(rotate: Callable[[], None]) -> None:
    """Rotate the log file on SIGUSR1, as twistd does for its own."""
    if not hasattr(signal, "SIGUSR1"):  # pragma: no cover - not POSIX
        return

    def on_signal(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(rotate)

    signal.signal(signal.SIGUSR1, on_signal)
