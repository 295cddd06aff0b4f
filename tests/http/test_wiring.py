# -*- test-case-name: tests.http.test_wiring -*-
"""
C{twistd imgresume --http}: the secure-by-default rule (keys and TLS beyond
loopback, as the native listener's), the tus endpoint built beside the
native listener over the same storage, its events counted and given to the
same hooks, and the stored digest of a filesystem upload.
"""

from __future__ import annotations

import hashlib

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from imgresume.keys import add_client
from imgresume.server import make_server_service
from imgresume.storage.filesystem import FilesystemStorage
from imgresume.storage.interfaces import NewUpload
from imgresume.storage.memory import MemoryStorage
from tests.support.options import server_options
from tests.support.runners import sync_run


class OptionsTests(SynchronousTestCase):
    """--http and the secure-by-default rule."""

    def keys(self) -> str:
        path = self.mktemp()
        add_client(path, "scanner-7")
        return path

    def test_off(self) -> None:
        """No --http by default."""
        self.assertIsNone(server_options(self)["http"])

    def test_loopback(self) -> None:
        """On a loopback interface or a UNIX socket it needs neither keys nor TLS."""
        for endpoint in ("tcp:8080:interface=127.0.0.1", "ssl:8443:interface=127.0.0.1",
                         "unix:/tmp/tus.sock"):
            self.assertEqual(server_options(self, "--http", endpoint)["http"], endpoint)

    def test_refused_without_keys(self) -> None:
        """Reachable from other hosts without --keys: refused, saying what to do."""
        with self.assertRaises(usage.UsageError) as caught:
            server_options(self, "--http", "tcp:8080")
        self.assertIn("--keys", str(caught.exception))
        self.assertIn("--insecure", str(caught.exception))

    def test_refused_without_tls(self) -> None:
        """With keys but in clear: refused (bearer keys would cross the network)."""
        with self.assertRaises(usage.UsageError) as caught:
            server_options(self, "--keys", self.keys(), "--http", "tcp:8080")
        self.assertIn("TLS", str(caught.exception))

    def test_keys_and_tls(self) -> None:
        """Keys and an ssl: endpoint: accepted."""
        endpoint = "ssl:8443:privateKey=k.pem:certKey=c.pem"
        options = server_options(self, "--keys", self.keys(), "--http", endpoint)
        self.assertEqual(options["http"], endpoint)

    def test_cors_origins(self) -> None:
        """--http-cors-origins: comma-separated origins (trailing / dropped); needs --http."""
        options = server_options(self, "--http", "tcp:8080:interface=127.0.0.1",
                                 "--http-cors-origins", "https://a.example/, http://b:3000")
        self.assertEqual(options["http-cors-origins"], ("https://a.example", "http://b:3000"))
        self.assertEqual(server_options(self)["http-cors-origins"], ())
        with self.assertRaises(usage.UsageError):
            server_options(self, "--http-cors-origins", "*")

    def test_insecure(self) -> None:
        """--insecure lets it listen anywhere in clear, as for --listen."""
        self.assertEqual(server_options(self, "--insecure", "--http", "tcp:8080")["http"],
                         "tcp:8080")


class ServiceTests(SynchronousTestCase):
    """make_server_service(http_listen=...)."""

    def test_beside_native(self) -> None:
        """
        The tus listener is a child of the server over the same storage; its
        upload events are counted in the server's metrics like native ones.
        """
        storage = MemoryStorage()
        reactor = MemoryReactorClock()
        top = make_server_service("tcp:0:interface=127.0.0.1", storage, reactor=reactor,
                                  http_listen="tcp:0:interface=127.0.0.1", gc_interval=0,
                                  http_cors_origins=["https://a.example"])
        self.assertIsNotNone(top.http)
        self.assertIs(top.http.uploads.storage, storage)
        self.assertEqual(top.http.listener.description, "tcp:0:interface=127.0.0.1")
        self.assertEqual(top.http.listener.factory.files.cors_origins, ("https://a.example",))
        top.http.uploads.create("anonymous", 3, {"filename": "x"}, None)
        self.assertEqual(top.metrics.uploads_created.value(), 1)

    def test_off(self) -> None:
        """Without http_listen there is no tus endpoint."""
        top = make_server_service("tcp:0", MemoryStorage(), reactor=MemoryReactorClock(),
                                  gc_interval=0)
        self.assertIsNone(top.http)


class StoredDigestTests(SynchronousTestCase):
    """FilesystemStorage.stored_sha256: what a filesystem storage holds, hashed."""

    def test_digest(self) -> None:
        """The SHA-256 of the upload's stored bytes."""
        storage = FilesystemStorage(self.mktemp(), run=sync_run)
        writer = self.successResultOf(storage.create(NewUpload("a", 6, None)))
        self.successResultOf(writer.write(0, b"abcdef"))
        digest = self.successResultOf(storage.stored_sha256(writer))
        self.assertEqual(digest, hashlib.sha256(b"abcdef").digest())
        completed = self.successResultOf(writer.complete(digest))
        self.assertEqual(completed.sha256, digest)
