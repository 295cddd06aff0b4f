"""
TLS for tests: a test PKI made in Python (L{CertificateAuthority}, L{PKI}:
server and client certificates, endpoint strings that use them) and
L{WaitForClose}, a client endpoint that makes its test wait for TLS closes.
Nothing is fetched from outside.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.trial.unittest import TestCase
from zope.interface import implementer

#: The client id of the client certificates L{PKI} makes.
CLIENT = "scanner-7"


def _esc(path: str) -> str:
    """A path made safe inside an endpoint string (colons escaped)."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


def subject_name(common_name: str) -> x509.Name:
    """An X.509 name of one common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class CertificateAuthority:
    """A certificate authority that lives for one test: EC P-256, one day."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        public = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject_name(common_name)).issuer_name(subject_name(common_name))
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
            .subject_name(subject_name(common_name)).issuer_name(self.cert.subject)
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


@implementer(IStreamClientEndpoint)
class WaitForClose:
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
