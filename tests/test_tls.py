# -*- test-case-name: tests.test_tls -*-
"""
TLS: servers on C{ssl:} and C{mtls:} (the drop-in endpoint of
L{imgresume.tls}), clients on Twisted's C{tls:} endpoint string verifying
the server's certificate and host name, client certificates and
C{--cert-identity}, in this process.  The TLS cluster of real processes is
in L{tests.system.test_tls_cluster}.

Every certificate is made by a test CA (L{tests.support.tls.PKI}); nothing
is fetched from outside.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from imgresume import keys
from imgresume._endpoints import is_local_only, requires_client_certificate
from imgresume.client import Uploader, UploadFailed
from imgresume.errors import HandshakeRejected
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage
from imgresume.tls import MutualTLSServerParser, peer_certificate_identity
from tests.support.processes import child_env
from tests.support.tls import CLIENT, PKI, CertificateAuthority, WaitForClose, subject_name


class EndpointStringTests(SynchronousTestCase):
    """The C{mtls:} string: parsing, the drop-in, and the secure-by-default rule."""

    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())

    def test_local_only(self) -> None:
        """C{mtls:} counts as local only when bound to loopback, like C{ssl:}."""
        self.assertTrue(is_local_only("mtls:7443:privateKey=k.pem:caCerts=ca.pem:"
                                      "interface=127.0.0.1"))
        self.assertFalse(is_local_only("mtls:7443:privateKey=k.pem:caCerts=ca.pem"))
        self.assertFalse(is_local_only("mtls:7443:interface=0.0.0.0:privateKey=k.pem"))
        self.assertTrue(requires_client_certificate("mtls:7443:privateKey=k.pem"))
        self.assertTrue(requires_client_certificate("MTLS:7443"))
        for other in ("ssl:7443:privateKey=k.pem", "tcp:7000", "haproxy:mtls:7443"):
            self.assertFalse(requires_client_certificate(other), other)

    def test_drop_in_registers_mtls(self) -> None:
        """serverFromString finds C{mtls:} through the drop-in in twisted/plugins."""
        from twisted.internet.endpoints import SSL4ServerEndpoint

        endpoint = serverFromString(MemoryReactor(), self.pki.mtls_listen(7443))
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        self.assertEqual(endpoint._port, 7443)
        self.assertEqual(endpoint._interface, "127.0.0.1")

    def test_options_require_a_client_certificate(self) -> None:
        """The context verifies peers and fails a handshake without a certificate."""
        from OpenSSL import SSL

        endpoint = MutualTLSServerParser().parseStreamServer(
            MemoryReactor(), "7443", privateKey=self.pki.server[1],
            certKey=self.pki.server[0], caCerts=self.pki.ca_file,
        )
        context = endpoint._sslContextFactory.getContext()
        required = SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self.assertEqual(context.get_verify_mode() & required, required)
        options = context.set_options(0)  # adds nothing, answers the options in force
        self.assertTrue(options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1)

    def test_missing_arguments_and_files(self) -> None:
        """Without caCerts, or with unreadable files, the error says what is wrong."""
        parser = MutualTLSServerParser()
        with self.assertRaises(ValueError) as caught:
            parser.parseStreamServer(MemoryReactor(), "7443", privateKey=self.pki.server[1])
        self.assertIn("caCerts=CA.pem", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            parser.parseStreamServer(MemoryReactor(), "7443", privateKey=self.pki.server[1],
                                     certKey=self.pki.server[0], caCerts="/nonexistent.pem")
        self.assertIn("/nonexistent.pem", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            parser.parseStreamServer(MemoryReactor(), "7443", privateKey=self.pki.server[1],
                                     certKey=self.pki.server[0], caCerts=self.pki.server[1])
        self.assertIn("no PEM certificate", str(caught.exception))


@implementer(ISSLTransport)
class _FakeTLSTransport:
    """Just enough of a TLS transport for L{peer_certificate_identity}."""

    def __init__(self, certificate, verify_result: int = 0) -> None:
        self.certificate, self.verify_result = certificate, verify_result

    def getPeerCertificate(self):
        return self.certificate

    def getHandle(self):
        return self

    def get_verify_result(self) -> int:
        return self.verify_result


class PeerIdentityTests(SynchronousTestCase):
    """The identity a client certificate gives: its one subject CN, if verified."""

    def x509(self, subject: x509.Name):
        from OpenSSL.crypto import X509

        ca = CertificateAuthority("ca")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.cert.subject)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(ca.key, hashes.SHA256()))
        return X509.from_cryptography(cert)

    def test_common_name(self) -> None:
        """A verified certificate with one CN gives that CN."""
        cert = self.x509(subject_name(CLIENT))
        self.assertEqual(peer_certificate_identity(_FakeTLSTransport(cert)), CLIENT)

    def test_no_identity(self) -> None:
        """No TLS, no certificate, an unverified one, or not exactly one CN: None."""
        from twisted.internet.testing import StringTransport

        cn = x509.NameAttribute(NameOID.COMMON_NAME, CLIENT)
        org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hospital")
        self.assertIsNone(peer_certificate_identity(StringTransport()))
        self.assertIsNone(peer_certificate_identity(None))
        self.assertIsNone(peer_certificate_identity(_FakeTLSTransport(None)))
        self.assertIsNone(peer_certificate_identity(
            _FakeTLSTransport(self.x509(x509.Name([cn])), verify_result=20)))
        self.assertIsNone(peer_certificate_identity(
            _FakeTLSTransport(self.x509(x509.Name([org])))))
        self.assertIsNone(peer_certificate_identity(
            _FakeTLSTransport(self.x509(x509.Name([cn, cn])))))


class ServerOptionsTests(SynchronousTestCase):
    """C{twistd imgresume} and C{twistd imgresume-lb} options with TLS."""

    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())
        self.storage = self.mktemp()
        os.makedirs(self.storage)

    def parse(self, *args: str):
        from imgresume.server.tap import Options

        options = Options()
        options.parseOptions(["--storage", self.storage, *args])
        return options

    def test_public_mtls_with_cert_identity_is_authenticated(self) -> None:
        """Listening on all interfaces with C{mtls:} and --cert-identity needs no --keys."""
        public = self.pki.mtls_listen(7443).replace(":interface=127.0.0.1", "")
        self.assertFalse(is_local_only(public))
        options = self.parse("--listen", public, "--cert-identity")
        self.assertTrue(options["cert-identity"])

    def test_public_mtls_without_cert_identity_needs_keys(self) -> None:
        """C{mtls:} alone does not name clients: without --keys it is refused."""
        public = self.pki.mtls_listen(7443).replace(":interface=127.0.0.1", "")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--listen", public)
        self.assertIn("--cert-identity", str(caught.exception))

    def test_cert_identity_needs_mtls(self) -> None:
        """--cert-identity on a listener that asks for no certificate is refused."""
        for listen in ("tcp:9000:interface=127.0.0.1", self.pki.ssl_listen(7443)):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse("--listen", listen, "--cert-identity")
            self.assertIn("needs --listen mtls:", str(caught.exception))

    def test_balancer_listens_on_mtls(self) -> None:
        """C{twistd imgresume-lb --listen mtls:...} builds a listener on that endpoint."""
        from imgresume.balancer.tap import Options, makeService

        options = Options()
        options.parseOptions(["--listen", self.pki.mtls_listen(7443),
                              "--backend", "tcp:127.0.0.1:9001"])
        service = makeService(options, reactor=MemoryReactor())
        endpoint = service.getServiceNamed("listener").endpoint
        self.assertEqual(type(endpoint).__name__, "SSL4ServerEndpoint")


class InProcessTestCase(TestCase):
    """A server in this process on a TLS endpoint, and Uploaders on C{tls:}."""

    timeout = 30

    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())
        self.data = os.urandom(300_000)
        self.local = os.path.abspath(self.mktemp())
        with open(self.local, "wb") as f:
            f.write(self.data)
        self.storage = MemoryStorage()

    async def serve(self, listen: str, **factory_kw) -> int:
        """Listen with a memory-storage server; return its port."""
        factory = UploadServerFactory(self.storage, "node-tls", reactor, **factory_kw)
        port = await serverFromString(reactor, listen).listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def uploader(self, endpoint: str, **kw) -> Uploader:
        """An Uploader on C{endpoint}; the test ends after its connections close."""
        kw.setdefault("client_id", CLIENT)
        kw.setdefault("max_attempts", 2)
        uploader = Uploader(endpoint, reactor=reactor, journal=None, backoff_base=0.01,
                            backoff_max=0.05, connect_timeout=5, digest="sha256", **kw)
        uploader.endpoint = WaitForClose(uploader.endpoint, self)
        return uploader

    async def upload_ok(self, endpoint: str, **kw) -> None:
        """Upload the test file through C{endpoint} and check what is stored."""
        result = await self.uploader(endpoint, **kw).upload(self.local, "scans/a.tif")
        self.assertEqual(result.sha256, hashlib.sha256(self.data).hexdigest())
        self.assertEqual(self.storage.read_completed(result.path), self.data)

    async def refused(self, endpoint: str, **kw) -> BaseException:
        """Upload through C{endpoint}, expect L{UploadFailed}; return its cause."""
        try:
            await self.uploader(endpoint, **kw).upload(self.local, "scans/a.tif")
        except UploadFailed as e:
            self.assertIsNotNone(e.cause)
            return e.cause
        self.fail(f"upload through {endpoint} succeeded")


class ServerCertificateTests(InProcessTestCase):
    """The client verifies the server's certificate and host name."""

    async def test_upload_over_tls(self) -> None:
        """C{ssl:} server, C{tls:} client trusting the test CA: upload verified."""
        port = await self.serve(self.pki.ssl_listen())
        await self.upload_ok(self.pki.tls_client("localhost", port))
        await self.upload_ok(self.pki.tls_client("127.0.0.1", port))

    async def test_untrusted_ca_is_refused(self) -> None:
        """A client that trusts another CA refuses the server's certificate."""
        port = await self.serve(self.pki.ssl_listen())
        cause = await self.refused(
            self.pki.tls_client("localhost", port, trust=self.pki.other_ca_dir))
        self.assertIn("certificate verify failed", str(cause))

    async def test_wrong_host_name_is_refused(self) -> None:
        """A certificate of the right CA for another host name is refused."""
        port = await self.serve(self.pki.ssl_listen(cert=self.pki.elsewhere))
        cause = await self.refused(self.pki.tls_client("localhost", port))
        self.assertIn("DNSMismatch", str(cause))

    async def test_cli_upload_over_tls(self) -> None:
        """C{imgresume upload --to tls:...} with a client certificate just works."""
        port = await self.serve(self.pki.mtls_listen())
        to = self.pki.tls_client("localhost", port, cert=self.pki.client)
        proc = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "imgresume", "upload", "--to", to, "--client-id", CLIENT,
             "--no-journal", "--json", "--digest", "sha256", self.local],
            env=child_env(), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(hashlib.sha256(self.data).hexdigest(), proc.stdout)


class ClientCertificateTests(InProcessTestCase):
    """C{mtls:} requires a client certificate; C{--cert-identity} names the client."""

    def key_store(self) -> keys.KeyStore:
        path = os.path.join(self.mktemp(), "keys.json")
        self.key = keys.add_client(path, CLIENT)
        return keys.KeyStore(path, maybeDeferred, reactor)

    async def test_client_certificate_required(self) -> None:
        """Without a certificate, or with one of another CA, the handshake fails."""
        port = await self.serve(self.pki.mtls_listen())
        cause = await self.refused(self.pki.tls_client("localhost", port))
        self.assertIn("certificate required", str(cause))
        await self.refused(self.pki.tls_client("localhost", port, cert=self.pki.stranger))
        await self.upload_ok(self.pki.tls_client("localhost", port, cert=self.pki.client))

    async def test_cert_identity_mismatch_is_refused(self) -> None:
        """With cert_identity, a client id other than the certificate's CN is refused."""
        port = await self.serve(self.pki.mtls_listen(), cert_identity=True)
        cause = await self.refused(
            self.pki.tls_client("localhost", port, cert=self.pki.client),
            client_id="scanner-8")
        self.assertIsInstance(cause, HandshakeRejected)
        self.assertIn("client id scanner-8 does not match the certificate's identity "
                      "scanner-7", str(cause))

    async def test_cert_identity_replaces_the_key(self) -> None:
        """With cert_identity and keys, the certificate alone lets its holder in."""
        port = await self.serve(self.pki.mtls_listen(), cert_identity=True,
                                keys=self.key_store())
        endpoint = self.pki.tls_client("localhost", port, cert=self.pki.client)
        await self.upload_ok(endpoint)
        # A client that has a key too gets it checked, and the server's proof.
        await self.upload_ok(endpoint, key=self.key)
        cause = await self.refused(endpoint, key=os.urandom(32))
        self.assertIsInstance(cause, HandshakeRejected)

    async def test_keys_without_cert_identity(self) -> None:
        """Without cert_identity, C{mtls:} plus keys still wants the key."""
        port = await self.serve(self.pki.mtls_listen(), keys=self.key_store())
        endpoint = self.pki.tls_client("localhost", port, cert=self.pki.client)
        cause = await self.refused(endpoint)
        self.assertIn("requires authentication", str(cause))
        await self.upload_ok(endpoint, key=self.key)

    async def test_cert_identity_without_certificate(self) -> None:
        """cert_identity on a plain listener refuses clients, unless keys are set."""
        port = await self.serve("tcp:0:interface=127.0.0.1", cert_identity=True)
        cause = await self.refused(f"tcp:127.0.0.1:{port}")
        self.assertIn("identifies clients by their TLS client certificate", str(cause))
