# -*- test-case-name: tests.test_auth -*-
"""
Challenge-response authentication in the handshake: the key never travels,
and a captured handshake cannot be replayed because every CHALLENGE carries a
fresh server nonce.  The server also proves it knows the key (the client's
nonce is in the proof), so a client with a key cannot be fooled by an
impostor server.

    client -> HELLO(options: auth=hmac-sha256, nonce=<64 hex>)
    server -> CHALLENGE(server_id, server nonce)
    client -> AUTH(HMAC(key, "imgresume-v1 client" 0 sn cn client_id 0 server_id))
    server -> WELCOME(options: auth-proof=<hex HMAC(key, "imgresume-v1 server" 0 ...)>)
"""

from __future__ import annotations

import hashlib
import hmac
import re

METHOD = "hmac-sha256"
NONCE_RE = re.compile(r"[0-9a-f]{64}\Z")


def _mac(key: bytes, role: bytes, first: bytes, second: bytes,
         client_id: str, server_id: str) -> bytes:
    message = b"".join([
        b"imgresume-v1 ", role, b"\0", first, second,
        client_id.encode("utf-8"), b"\0", server_id.encode("utf-8"),
    ])
    return hmac.new(key, message, hashlib.sha256).digest()


def client_proof(key: bytes, server_nonce: bytes, client_nonce: bytes,
                 client_id: str, server_id: str) -> bytes:
    """What the client sends in AUTH."""
    return _mac(key, b"client", server_nonce, client_nonce, client_id, server_id)


def server_proof(key: bytes, server_nonce: bytes, client_nonce: bytes,
                 client_id: str, server_id: str) -> bytes:
    """What the server sends in WELCOME's C{auth-proof} option."""
    return _mac(key, b"server", client_nonce, server_nonce, client_id, server_id)


def same(a: bytes, b: bytes) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(a, b)
