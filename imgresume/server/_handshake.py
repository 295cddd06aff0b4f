# -*- test-case-name: tests.test_auth,tests.test_tls -*-
"""
The server's handshake policy: whom to welcome, whom to challenge for its
key, whom to turn away.

A L{Handshake} is one connection's: given the client's HELLO (and, under
C{--cert-identity}, the identity of its verified TLS certificate) it
decides, and given the client's AUTH it checks the proof.  Each decision is
a value (L{Accept}, L{Challenge} or L{Reject}) the protocol adapter carries
out on its L{imgresume.protocol.ServerConnection} and logs; nothing here
touches the connection.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Union

import attrs

from imgresume.protocol import (
    AUTH_METHOD,
    AUTH_NONCE_RE,
    HEALTH_CHECK_CLIENT_IDS,
    Hello,
    client_proof,
    proofs_equal,
    server_proof,
)


@attrs.frozen
class Accept:
    """Welcome the client with these WELCOME options; C{how} says why, for the log."""

    options: dict[str, str]
    how: str = ""


@attrs.frozen
class Challenge:
    """Send CHALLENGE with this nonce and wait for the client's AUTH."""

    nonce: bytes


@attrs.frozen
class Reject:
    """Refuse the handshake: C{message} for the client, C{reason} for the log."""

    message: str
    reason: str


Decision = Union[Accept, Challenge, Reject]


def is_health_check(hello: Hello | None) -> bool:
    """Whether C{hello} is a balancer's health check (welcomed for PING, not logged)."""
    return hello is not None and hello.client_id in HEALTH_CHECK_CLIENT_IDS


class Handshake:
    """
    One connection's handshake: owned by
    L{imgresume.server._protocol.UploadServerProtocol}, which calls
    L{hello} with the client's HELLO and, after a L{Challenge}, L{auth} with
    its proof, and carries out the L{Decision} each returns.

    @param keys: a L{imgresume.keys.KeyStore}: when given, every client must
        authenticate with its key (a health check excepted).
    @param cert_identity: a client with a verified TLS certificate must use
        the certificate's identity (its subject CN) as its client id, and
        needs no key.
    @param window: the deepest window of DATA packets the server wants in
        flight, advertised in every WELCOME.
    """

    def __init__(
        self,
        server_id: str,
        keys: Any = None,
        cert_identity: bool = False,
        window: int = 32,
        nonce: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._server_id = server_id
        self._keys = keys
        self._cert_identity = cert_identity
        self._window = window
        self._nonce = nonce
        self._hello: Hello | None = None
        self._server_nonce: bytes | None = None
        #: Welcomed as a balancer's health check: may only PING.
        self.health_only = False

    def hello(self, hello: Hello, certificate_identity: Callable[[], str | None]) -> Decision:
        """
        Decide on the client's HELLO.  C{certificate_identity} gives the
        identity of the client's verified TLS certificate, or None; it is
        asked only under C{cert_identity}.
        """
        self._hello = hello
        keys = self._keys
        if self._cert_identity:
            # --cert-identity: a verified TLS client certificate names the
            # client (its subject CN, see imgresume.tls) and is its credential.
            identity = certificate_identity()
            client_id = hello.client_id
            if identity is not None and client_id != identity:
                return Reject(
                    f"client id {client_id} does not match the certificate's identity "
                    f"{identity[:128]}",
                    reason=f"certificate identity is {identity[:128]}",
                )
            if identity is None and keys is None:
                return Reject(
                    "this server identifies clients by their TLS client certificate "
                    "(subject CN): connect with one",
                    reason="no verified client certificate with a CN",
                )
            if identity is not None and (keys is None or "auth" not in hello.options):
                return self._accept(how=" (client certificate)")
            # Otherwise a key is checked as well (a client with a key expects
            # the server to prove it knows it).
        if keys is None:
            return self._accept()
        options = hello.options
        if is_health_check(hello) and "auth" not in options:
            # A balancer's health check: welcome it for PING only, so that
            # checking a server that requires keys needs no key.
            self.health_only = True
            return self._accept(how=" (health check only)")
        if options.get("auth") != AUTH_METHOD or not AUTH_NONCE_RE.match(
            options.get("nonce", "")
        ):
            return Reject(
                "this server requires authentication (hmac-sha256): give the client "
                "its key",
                reason="client did not offer authentication",
            )
        self._server_nonce = self._nonce(32)
        return Challenge(self._server_nonce)

    def auth(self, mac: bytes) -> Decision:
        """Check the client's AUTH proof (after a L{Challenge})."""
        hello, server_nonce = self._hello, self._server_nonce
        assert hello is not None and server_nonce is not None
        key = self._keys.lookup(hello.client_id)
        client_nonce = bytes.fromhex(hello.options["nonce"])
        if key is None or not proofs_equal(mac, client_proof(
            key, server_nonce, client_nonce, hello.client_id, self._server_id,
        )):
            return Reject(
                "authentication failed: unknown or revoked client id, or wrong key",
                reason="unknown or revoked client" if key is None else "wrong proof",
            )
        proof = server_proof(key, server_nonce, client_nonce, hello.client_id,
                             self._server_id)
        return self._accept({"auth-proof": proof.hex()}, how=" (authenticated)")

    def _accept(self, options: dict[str, str] | None = None, how: str = "") -> Accept:
        # The deepest window of DATA packets this server wants in flight.
        return Accept({**(options or {}), "window": str(self._window)}, how)
