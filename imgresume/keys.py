# -*- test-case-name: tests.test_auth -*-
"""
Per-client keys for handshake authentication.

The operator manages a key file with C{imgresume keys add|revoke|list}; each
server reads it and notices changes without a restart (L{KeyStore} polls it).
The file is JSON, written atomically with mode 0600::

    {"format": 1,
     "clients": {"scanner-7": {"key": "<64 hex>", "created": 1764115200.0,
                               "revoked": null}}}

A revoked client keeps its entry (with the time of revocation) so that the
file records who had access when.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

CLIENT_ID_RE = re.compile(r"[A-Za-z0-9._@:+-]{1,128}\Z")
KEY_BYTES = 32


class KeyFileError(Exception):
    """The key file is missing, unreadable or malformed; the message says which."""


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (create one with `imgresume keys add`)")
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e}")
    clients = data.get("clients") if isinstance(data, dict) else None
    if data.get("format") != 1 or not isinstance(clients, dict):
        raise KeyFileError(f"{path}: not an imgresume key file (format 1)")
    for client_id, entry in clients.items():
        if not CLIENT_ID_RE.match(client_id) or not isinstance(entry, dict):
            raise KeyFileError(f"{path}: bad entry for {client_id!r}")
        try:
            if len(bytes.fromhex(entry["key"])) != KEY_BYTES:
                raise ValueError
        except (KeyError, ValueError, TypeError):
            raise KeyFileError(f"{path}: bad key for {client_id!r}")
    return data


def load_keys(path: str) -> dict[str, bytes]:
    """The keys of the clients that are not revoked, by client id."""
    data = _read(path)
    return {
        client_id: bytes.fromhex(entry["key"])
        for client_id, entry in data["clients"].items()
        if not entry.get("revoked")
    }


@contextmanager
def _edit(path: str) -> Iterator[dict[str, Any]]:
    """
    Read-modify-write the key file under an exclusive lock, atomically.
    Operators' side (C{imgresume keys}, on a POSIX host): C{fcntl} is
    imported here, not with the module, whose L{read_key} the client uses
    on Windows and macOS too.
    """
    import fcntl

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = _read(path)
        except KeyFileError:
            if os.path.exists(path):
                raise
            data = {"format": 1, "clients": {}}
        yield data
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def add_client(path: str, client_id: str, *, rotate: bool = False) -> bytes:
    """
    Create a key for C{client_id} and return it (shown to the operator once).

    @raise KeyFileError: the client already has a valid key and C{rotate}
        is false, or the id is not valid.
    """
    if not CLIENT_ID_RE.match(client_id):
        raise KeyFileError("client ids are 1-128 characters of A-Z a-z 0-9 . _ @ : + -")
    key = secrets.token_bytes(KEY_BYTES)
    with _edit(path) as data:
        old = data["clients"].get(client_id)
        if old is not None and not old.get("revoked") and not rotate:
            raise KeyFileError(f"{client_id} already has a key; use --rotate to replace it")
        data["clients"][client_id] = {"key": key.hex(), "created": time.time(), "revoked": None}
    return key


def revoke_client(path: str, client_id: str) -> None:
    """Revoke C{client_id}'s key; servers refuse it from their next reload."""
    with _edit(path) as data:
        entry = data["clients"].get(client_id)
        if entry is None:
            raise KeyFileError(f"{client_id}: no such client in {path}")
        entry["revoked"] = entry.get("revoked") or time.time()


def list_clients(path: str) -> list[dict[str, Any]]:
    """Every client with its creation and revocation times (never the key)."""
    data = _read(path)
    return [
        {"client_id": cid, "created": e.get("created"), "revoked": e.get("revoked")}
        for cid, e in sorted(data["clients"].items())
    ]


def read_key(path: str) -> bytes:
    """A client's key from a file holding it in hex (what `keys add` printed)."""
    with open(path, encoding="ascii") as f:
        text = f.read().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"{path}: expected {KEY_BYTES * 2} hex digits")
    return key


class KeyStore:
    """
    The server's view of the key file, reloaded when the file changes.

    Created by the server service; queried by the protocol adapter on every
    handshake (in memory).  C{run} performs the file reads off the reactor.
    """

    def __init__(self, path: str, run: Callable[..., Deferred[Any]], clock: Any,
                 interval: float = 2.0) -> None:
        self.path = path
        self._run = run
        self._keys: dict[str, bytes] = load_keys(path)
        self._stamp = self._stat()
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock
        self._interval = interval
        self._checking = False

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def lookup(self, client_id: str) -> bytes | None:
        """The key of a client that is allowed in, or None."""
        return self._keys.get(client_id)

    def __len__(self) -> int:
        return len(self._keys)

    def start(self) -> None:
        """Begin watching the file."""
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        """Stop watching."""
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> None:
        if self._checking:
            return
        self._checking = True

        def reload() -> tuple[Any, dict[str, bytes] | None]:
            stamp = self._stat()
            if stamp == self._stamp:
                return stamp, None
            return stamp, load_keys(self.path)

        def done(result: tuple[Any, dict[str, bytes] | None]) -> None:
            stamp, keys = result
            self._stamp = stamp
            if keys is not None:
                self._keys = keys
                log.info("key file {path} reloaded: {count} clients allowed",
                         path=self.path, count=len(keys))

        def failed(f: Any) -> None:
            # Keep the keys we have: a half-edited or broken file must not
            # lock every client out (nor let anyone in).
            log.error("key file {path} not reloaded: {error}", path=self.path,
                      error=f.getErrorMessage())

        d = self._run(reload)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: setattr(self, "_checking", False))
