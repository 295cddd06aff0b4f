# -*- test-case-name: tests.test_tls -*-
"""
TLS for imgresume servers and balancers.

Two things live here:

  - L{MutualTLSServerParser}, the C{mtls:} server endpoint string: TLS
    (1.2 or later) that I{requires} every client to present a certificate
    signed by a given CA.  Twisted's own C{ssl:} string cannot require one.
    The drop-in C{twisted/plugins/imgresume_tls_endpoint.py} registers it,
    so C{--listen mtls:...} works for C{twistd imgresume} and
    C{twistd imgresume-lb} alike::

        mtls:PORT:privateKey=KEY.pem[:certKey=CERT.pem]:caCerts=CA.pem
            [:interface=ADDR][:backlog=N][:extraCertChain=CHAIN.pem]

  - L{peer_certificate_identity}: the client identity a verified client
    certificate gives (its subject common name), used by the server's
    C{--cert-identity}.

Nothing here imports OpenSSL at module level: the drop-in is imported by
every C{twistd} run that lists plugins.

See C{docs/tls.md}.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.interfaces import (
    ISSLTransport,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _read_certificates(path: str, what: str) -> list[Any]:
    """Every PEM certificate in the file at C{path}, as L{Certificate}s."""
    from twisted.internet.ssl import Certificate

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"mtls: cannot read {what} {path}: {e.strerror or e}") from None
    certificates = [Certificate.loadPEM(block) for block in _PEM_CERT.findall(pem)]
    if not certificates:
        raise ValueError(f"mtls: {what} {path} holds no PEM certificate")
    return certificates


def mutual_tls_options(privateKey: str, certKey: str | None, caCerts: str,
                       extraCertChain: str | None = None) -> Any:
    """
    Server TLS options that require a client certificate signed by one of
    the CA certificates in the PEM file C{caCerts}.

    @param privateKey: PEM file with the server's private key (and, if
        C{certKey} is None, its certificate too).
    @param certKey: PEM file with the server's certificate.
    @param extraCertChain: PEM file with intermediate certificates sent
        after the server's own.
    @return: a L{twisted.internet.ssl.CertificateOptions}.
    @raise ValueError: a file is missing or holds no usable PEM.
    """
    from twisted.internet.ssl import (
        CertificateOptions,
        PrivateCertificate,
        TLSVersion,
        trustRootFromCertificates,
    )

    try:
        with open(certKey or privateKey, "rb") as f:
            cert_pem = f.read()
        with open(privateKey, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise ValueError(
            f"mtls: cannot read the server certificate or key: {e.filename}: {e.strerror}"
        ) from None
    server = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    authorities = _read_certificates(caCerts, "caCerts")
    chain = None
    if extraCertChain:
        chain = [c.original.to_cryptography()
                 for c in _read_certificates(extraCertChain, "extraCertChain")]
    return CertificateOptions(
        # cryptography objects: pyOpenSSL deprecates its own X509 and PKey.
        privateKey=server.privateKey.original.to_cryptography_key(),
        certificate=server.original.to_cryptography(),
        extraCertChain=chain,
        # A trust root turns on verification and makes a client certificate
        # mandatory (VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT).
        trustRoot=trustRootFromCertificates(authorities),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """
    The C{mtls:} server endpoint string parser (see the module docstring).
    An instance is registered by the drop-in in C{twisted/plugins/}.
    """

    prefix = "mtls"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> IStreamServerEndpoint:
        return self._parse(reactor, *args, **kwargs)

    def _parse(
        self,
        reactor: Any,
        port: str,
        privateKey: str | None = None,
        certKey: str | None = None,
        caCerts: str | None = None,
        interface: str = "",
        backlog: str = "50",
        extraCertChain: str | None = None,
    ) -> IStreamServerEndpoint:
        from twisted.internet.endpoints import SSL4ServerEndpoint

        if not privateKey or not caCerts:
            raise ValueError(
                "mtls: needs privateKey=KEY.pem and caCerts=CA.pem (the CA that signs "
                "client certificates), e.g. mtls:7443:privateKey=server.key:"
                "certKey=server.pem:caCerts=clients-ca.pem"
            )
        options = mutual_tls_options(privateKey, certKey, caCerts, extraCertChain)
        return SSL4ServerEndpoint(reactor, int(port), options, int(backlog), interface)


def peer_certificate_identity(transport: Any) -> str | None:
    """
    The identity of the verified client certificate on C{transport}: the
    certificate's subject common name (CN).

    None when the transport is not TLS, when the peer sent no certificate,
    when OpenSSL did not verify it, or when its subject does not have
    exactly one CN.  (Subject alternative names are not used: client
    certificates name their holder in the CN, and C{openssl req -subj
    /CN=scanner-7} is all it takes to make one.)
    """
    if transport is None or not ISSLTransport.providedBy(transport):
        return None
    certificate = transport.getPeerCertificate()
    if certificate is None:
        return None
    handle = transport.getHandle()
    if getattr(handle, "get_verify_result", lambda: 0)() != 0:  # X509_V_OK
        return None
    from cryptography.x509.oid import NameOID

    names = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) and value else None
