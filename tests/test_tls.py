# -*- test-case-name: tests.test_tls -*-
"""
TLS: servers on C{ssl:} and C{mtls:} (the drop-in endpoint of
L{imgresume.tls}), clients on Twisted's C{tls:} endpoint string verifying
the server's certificate and host name, client certificates and
C{--cert-identity}, and a TLS cluster of real processes behind
C{twistd imgresume-lb} that survives a SIGKILL of the serving server with
authentication on.

Every certificate is made here, by a test CA (L{PKI}); nothing is
fetched from outside.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import ISSLTransport, IStreamClientEndpoint
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from imgresume import keys
from imgresume.testing import LocalCluster
from imgresume._endpoints import is_local_only, requires_client_certificate
from imgresume.client import Progress, Uploader, UploadFailed
from imgresume.errors import HandshakeRejected
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage
from imgresume.tls import MutualTLSServerParser, peer_certificate_identity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = "scanner-7"


def _esc(path: str) -> str:
    """A path made safe inside an endpoint string (colons escaped)."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def _write_random(path: str, size: int) -> str:
    """Write C{size} random bytes to C{path}; return their SHA-256 in hex."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """A certificate authority that lives for one test: EC P-256, one day."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, common_name: str, *, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), client: bool = False):
        """A leaf certificate and its key, for a server or (C{client}) a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage_oid = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage_oid]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        names = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


class PKI:
    """
    The files of a small PKI in C{directory}:

      - C{ca_dir}: a directory holding C{ca.pem}, the test CA (what a
        C{tls:} client's C{trustRoots=} names); C{ca_file}: that file (what
        C{mtls:}'s C{caCerts=} names);
      - C{server}: (certificate, key) for C{localhost} and C{127.0.0.1};
      - C{elsewhere}: (certificate, key) for C{elsewhere.example} only;
      - C{client}: (certificate, key) of client C{scanner-7};
      - C{other_ca_dir}: a directory with another CA; C{stranger}: a client
        certificate for C{scanner-7} signed by that other CA.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        ca, other = CertificateAuthority("imgresume test CA"), CertificateAuthority("some other CA")
        self.ca_dir = os.path.join(directory, "trust")
        self.ca_file = self._write("trust/ca", ca.cert)
        self.other_ca_dir = os.path.join(directory, "other-trust")
        self._write("other-trust/ca", other.cert)
        self.server = self._write("server", *ca.issue(
            "localhost", dns=("localhost",), ips=("127.0.0.1",)))
        self.elsewhere = self._write("elsewhere", *ca.issue(
            "elsewhere.example", dns=("elsewhere.example",)))
        self.client = self._write("client", *ca.issue(CLIENT, client=True))
        self.stranger = self._write("stranger", *other.issue(CLIENT, client=True))

    def _write(self, name: str, cert, key=None):
        path = os.path.join(self.directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".pem", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        if key is None:
            return path + ".pem"
        with open(path + ".key", "wb") as f:
            f.write(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ))
        return path + ".pem", path + ".key"

    def ssl_listen(self, port: int | str = 0, cert=None) -> str:
        """A server C{ssl:} string on 127.0.0.1 (no client certificate asked)."""
        pem, key = cert or self.server
        return f"ssl:{port}:interface=127.0.0.1:privateKey={_esc(key)}:certKey={_esc(pem)}"

    def mtls_listen(self, port: int | str = 0) -> str:
        """A server C{mtls:} string on 127.0.0.1 requiring a client certificate."""
        pem, key = self.server
        return (f"mtls:{port}:interface=127.0.0.1:privateKey={_esc(key)}:"
                f"certKey={_esc(pem)}:caCerts={_esc(self.ca_file)}")

    def tls_client(self, host: str, port: int, *, trust: str | None = None,
                   cert=None) -> str:
        """A client C{tls:} string, optionally presenting a client certificate."""
        text = f"tls:{host}:{port}:trustRoots={_esc(trust or self.ca_dir)}"
        if cert is not None:
            text += f":certificate={_esc(cert[0])}:privateKey={_esc(cert[1])}"
        return text


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
        cert = self.x509(_name(CLIENT))
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


@implementer(IStreamClientEndpoint)
class _WaitForClose:
    """
    A client endpoint that makes its test wait, at cleanup, until every
    connection it made is closed: a TLS close takes a few reactor turns
    after the upload's result has fired.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, test: TestCase) -> None:
        self.endpoint, self.test = endpoint, test

    def connect(self, factory):
        def made(protocol):
            lost: Deferred[None] = Deferred()
            original = protocol.connectionLost

            def connectionLost(reason):
                try:
                    original(reason)
                finally:
                    lost.callback(None)

            protocol.connectionLost = connectionLost
            self.test.addCleanup(lambda: lost)
            return protocol

        return self.endpoint.connect(factory).addCallback(made)


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
                            backoff_max=0.05, connect_timeout=5, **kw)
        uploader.endpoint = _WaitForClose(uploader.endpoint, self)
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
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        proc = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "imgresume", "upload", "--to", to, "--client-id", CLIENT,
             "--no-journal", "--json", self.local],
            env=env, capture_output=True, text=True, timeout=60,
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
        digest = await deferToThread(_write_random, path, size)
        killed: list[str] = []

        def progress(p: Progress) -> None:
            if not killed and p.phase == "uploading" and p.server_id and p.done > size // 3:
                killed.append(p.server_id)
                self.cluster.kill(p.server_id)

        uploader = Uploader(self.endpoint, reactor=reactor, journal=None, client_id=CLIENT,
                            key=self.key, chunk_size=self.CHUNK, window=self.WINDOW,
                            backoff_base=0.05, backoff_max=0.5)
        uploader.endpoint = _WaitForClose(uploader.endpoint, self)
        result = await uploader.upload(path, "scans/scan.tif", progress=progress)
        self.assertEqual(len(killed), 1)
        self.assertEqual(result.sha256, digest)
        self.assertEqual(_sha256(os.path.join(self.cluster.storage, result.path)), digest)
        self.assertEqual(result.servers[0], killed[0])
        self.assertNotIn(killed[0], result.servers[1:])
        self.assertEqual(len(result.resumed_at), 1)
        self.assertGreater(result.resumed_at[0], 0)
        self.assertLessEqual(result.bytes_sent, size + self.WINDOW * self.CHUNK)
        # Authentication was in force: the key was checked on both servers...
        for server in result.servers:
            self.assertIn(f"client {CLIENT} (authenticated)",
                          _read_text(self.cluster.servers[server].log))
        # ...a certificate holder with a wrong key is refused, and so is one
        # whose key is right for another client id than its certificate's.
        for client_id, key, why in ((CLIENT, os.urandom(32), "wrong key"),
                                    ("scanner-8", self.other_key, "does not match")):
            uploader = Uploader(self.endpoint, reactor=reactor, journal=None,
                                client_id=client_id, key=key, max_attempts=1)
            uploader.endpoint = _WaitForClose(uploader.endpoint, self)
            try:
                await uploader.upload(path, "other.tif")
            except UploadFailed as e:
                self.assertIsInstance(e.cause, HandshakeRejected)
                self.assertIn(why, str(e.cause))
            else:
                self.fail(f"{client_id} got through")
