# -*- test-case-name: tests.system.test_tls_cluster -*-
"""
A TLS cluster of real processes: three C{twistd imgresume} servers on
C{mtls:} with C{--keys} and C{--cert-identity} behind C{twistd imgresume-lb},
surviving a SIGKILL of the serving server with authentication on.

Every certificate is made by a test CA (L{tests.support.tls.PKI}).
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from imgresume import keys
from imgresume.client import UploadFailed, Uploader
from imgresume.errors import HandshakeRejected
from imgresume.testing import LocalCluster
from tests.support.cluster import KillServingServer, sha256_file, write_random
from tests.support.tls import CLIENT, PKI, WaitForClose


class TLSClusterTests(TestCase):
    """
    End-to-end TLS through the balancer on real processes: three C{twistd
    imgresume} on C{mtls:} with C{--keys} and C{--cert-identity} over one
    storage, C{twistd imgresume-lb} relaying the TLS bytes over TCP.
    """

    timeout = 90
    CHUNK = 256 * 1024
    WINDOW = 4

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        self.pki = PKI(os.path.join(self.work, "pki"))
        key_file = os.path.join(self.work, "keys.json")
        self.key = keys.add_client(key_file, CLIENT)
        self.other_key = keys.add_client(key_file, "scanner-8")
        self.cluster = LocalCluster(
            self.work, servers=3,
            server_listen=self.pki.mtls_listen,
            server_args=["--keys", key_file, "--cert-identity"],
            # The balancer's protocol health checks cannot speak through TLS
            # ended at the servers: rely on passive ejection.
            lb_args=["--check-interval", "0"],
        )
        self.addCleanup(self.cluster.stop)
        self.endpoint = self.pki.tls_client("127.0.0.1", self.cluster.lb_port,
                                            cert=self.pki.client)

    async def test_sigkill_serving_server_under_tls(self) -> None:
        """The serving server is SIGKILLed mid-upload; the client resumes on another."""
        await deferToThread(self.cluster.start)
        size = 24 * 1024 * 1024 + 4321
        path = os.path.join(self.work, "scan.tif")
        digest = await deferToThread(write_random, path, size)
        kill = KillServingServer(self.cluster, after=size // 3)
        uploader = Uploader(self.endpoint, reactor=reactor, journal=None, client_id=CLIENT,
                            key=self.key, chunk_size=self.CHUNK, window=self.WINDOW,
                            backoff_base=0.05, backoff_max=0.5, digest="sha256")
        uploader.endpoint = WaitForClose(uploader.endpoint, self)
        result = await uploader.upload(path, "scans/scan.tif", progress=kill)
        kill.check(self, result)
        self.assertEqual(result.sha256, digest)
        self.assertEqual(sha256_file(os.path.join(self.cluster.storage, result.path)), digest)
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], 0)
        self.assertLessEqual(result.bytes_sent, size + self.WINDOW * self.CHUNK)
        # Authentication was in force: the key was checked on both servers...
        for server in result.servers:
            with open(self.cluster.servers[server].log) as f:
                self.assertIn(f"client {CLIENT} (authenticated)", f.read())
        # ...a certificate holder with a wrong key is refused, and so is one
        # whose key is right for another client id than its certificate's.
        for client_id, key, why in ((CLIENT, os.urandom(32), "wrong key"),
                                    ("scanner-8", self.other_key, "does not match")):
            uploader = Uploader(self.endpoint, reactor=reactor, journal=None,
                                client_id=client_id, key=key, max_attempts=1)
            uploader.endpoint = WaitForClose(uploader.endpoint, self)
            try:
                await uploader.upload(path, "other.tif")
            except UploadFailed as e:
                self.assertIsInstance(e.cause, HandshakeRejected)
                self.assertIn(why, str(e.cause))
            else:
                self.fail(f"{client_id} got through")
