# -*- test-case-name: tests.client.test_session -*-
"""
Why an attempt failed, in words for people: the reasons given by
L{imgresume.client.UploadFailed} and the retry notes of the progress
reports ("connection refused by 127.0.0.1:7000, retry 3/9 in 2.1 s").
Used by L{imgresume.client._session}.
"""

from __future__ import annotations

from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)

from imgresume._endpoints import endpoint_address


def describe(error: BaseException, endpoint: str | None = None) -> str:
    """
    A one-line human description of why an attempt failed; C{endpoint}
    (the endpoint string connected through) names the peer of a failed
    connection.
    """
    where = endpoint_address(endpoint) if endpoint else "the server"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused by {where}"
    if isinstance(error, DNSLookupError):
        return f"DNS lookup failed for {where}"
    if isinstance(error, TimeoutError):
        return f"connecting to {where} timed out"
    if isinstance(error, ConnectError):
        return f"cannot connect to {where}: {error}"
    return str(error) or type(error).__name__


def retry_note(error: BaseException, endpoint: str | None, retry: int, retries: int,
               delay: float) -> str:
    """What a retrying progress report says: why, which retry of how many, and when."""
    return f"{describe(error, endpoint)}, retry {retry}/{retries} in {delay:.1f} s"
