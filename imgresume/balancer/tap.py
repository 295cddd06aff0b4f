# -*- test-case-name: tests.balancer.test_proxy -*-
"""
C{twistd imgresume-lb}: command-line options and service assembly for the
round-robin balancer. Named by the drop-in
C{twisted/plugins/imgresume_dropin.py} and imported only when the subcommand
runs.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import clientFromString
from twisted.python import usage

from .._listen import ListenerService
from .._options import BaseOptions
from ..metrics import BalancerMetrics, Registry, metrics_service
from ..sizes import parse_duration
from ._health import HealthChecker
from ._proxy import BalancerFactory
from ._scheduler import Backend, BackendTracker, RoundRobinScheduler


def _seconds(value: str) -> float:
    return parse_duration(value)


_seconds.coerceDoc = (  # type: ignore[attr-defined]
    "A duration: seconds, or a number with a unit (500ms, 2s, 1m)."
)


def _whole_number(least: int, refusal: str, doc: str) -> Callable[[str], int]:
    """
    An option coercer: a whole number of at least C{least}; C{refusal} is
    the error (formatted with C{number}), C{doc} what C{--help} says.
    """

    def coerce(value: str) -> int:
        number = int(value)
        if number < least:
            raise ValueError(refusal.format(number=number))
        return number

    coerce.coerceDoc = doc  # type: ignore[attr-defined]
    return coerce


_count = _whole_number(1, "must be at least 1, not {number}", "A whole number, at least 1.")
_limit = _whole_number(
    0, "must be 0 (no limit) or more, not {number}", "A whole number; 0 means no limit."
)


class Options(BaseOptions):
    """
    Command line of C{twistd imgresume-lb}; parsed by twistd (or C{twist})
    and handed to L{makeService}.
    """

    synopsis = "--backend ENDPOINT [--backend ENDPOINT ...] [options]"

    longdesc = """\
A round-robin TCP balancer in front of imgresume upload servers.

Each new client connection goes to the next backend in --backend order. A
backend that refuses or does not accept within --connect-timeout is skipped:
the same client is tried on the next backend (each at most once), and the
failed backend is left out of the rotation for --eject-for seconds while
others are up. If no backend accepts, the client gets an imgresume ERROR frame
(NO_BACKEND, retry after 1000 ms) and is closed.

Every --check-interval seconds the balancer also checks each backend at the
protocol level: it connects, sends HELLO (client id imgresume-lb-health),
expects WELCOME, sends PING and expects the same nonce back in PONG, all
within --check-timeout, then closes. After --fall failed checks in a row a
backend is down: no new client is sent to it until --rise checks in a row
pass. Connections already proxied to it are left alone. While every backend
is down, clients are still tried on all of them.

Bytes are forwarded unchanged in both directions with flow control: a slow
side pauses the other, so memory per connection stays bounded. With
--send-proxy a PROXY protocol v2 header with the client's address goes
first, so servers started with --proxy-protocol-from log (and limit) the
real client. At most --max-connections-per-address client connections from
one IP address are accepted at a time.

Addresses are Twisted endpoint strings, e.g.
  --listen tcp:7000:interface=0.0.0.0
  --listen unix:/run/imgresume-lb.sock
  --listen ssl:7443:privateKey=lb.key:certKey=lb.pem
  --backend tcp:10.0.0.11:7001 --backend tcp:10.0.0.12:7001
  --backend unix:/run/imgresume-1.sock
  --backend ssl:host=10.0.0.13:port=7443:caCertsDir=/etc/ssl/certs

A --listen reachable from other hosts (not a loopback interface or a UNIX
socket) is refused unless --backends-authenticate says every backend
requires keys or client certificates, or --insecure accepts that anyone
who can connect may upload.

Examples:
  twistd -n --pidfile= imgresume-lb --listen tcp:7000:interface=127.0.0.1 \\
      --backend tcp:127.0.0.1:7001 --backend tcp:127.0.0.1:7002
  twistd -n --pidfile= imgresume-lb --listen tcp:7000 --backends-authenticate \\
      --backend tcp:10.0.0.11:7001 --backend tcp:10.0.0.12:7001
"""

    optParameters = [
        [
            "listen",
            "l",
            "tcp:7000:interface=127.0.0.1",
            "Where to accept clients: a Twisted server endpoint string"
            " (tcp:, unix:, ssl:, haproxy:...).",
        ],
        [
            "connect-timeout",
            None,
            5.0,
            "How long to wait for one backend to accept a connection before"
            " skipping to the next.",
            _seconds,
        ],
        [
            "eject-for",
            None,
            2.0,
            "How long a backend that failed a connect is left out of the"
            " rotation (it is still tried if every backend is out); 0 never"
            " leaves it out.",
            _seconds,
        ],
        [
            "check-mode",
            None,
            "protocol",
            "protocol: a check speaks imgresume (HELLO, PING); connect: a check"
            " only connects (for servers that terminate TLS themselves, whose"
            " protocol the balancer cannot see).",
        ],
        [
            "check-interval",
            None,
            2.0,
            "How often each backend gets a health check (connect, HELLO,"
            " WELCOME, PING, PONG, close); 0 disables health checks.",
            _seconds,
        ],
        [
            "check-timeout",
            None,
            1.0,
            "How long one health check may take, connect included, before it"
            " counts as failed.",
            _seconds,
        ],
        [
            "fall",
            None,
            2,
            "Failed health checks in a row that take a backend out of the"
            " rotation (until it passes --rise checks).",
            _count,
        ],
        [
            "rise",
            None,
            1,
            "Passed health checks in a row that put a backend that is down"
            " back into the rotation.",
            _count,
        ],
        [
            "max-connections-per-address",
            None,
            64,
            "Client connections allowed at once from one IP address; one more"
            " gets a HANDSHAKE_REJECTED ERROR frame and is closed.",
            _limit,
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics over HTTP at /metrics on this server"
            " endpoint (e.g. tcp:9102:interface=127.0.0.1) [default: off].",
        ],
    ]

    optFlags = [
        [
            "backends-authenticate",
            None,
            "Assert that every backend authenticates clients (twistd imgresume --keys,"
            " or mtls: with --cert-identity): needed to listen beyond this host.",
        ],
        [
            "insecure",
            None,
            "Allow listening beyond this host in front of backends that may not"
            " authenticate clients (anyone who can connect may upload).",
        ],
        [
            "send-proxy",
            None,
            "Start every backend connection with a PROXY protocol v2 header"
            " carrying the client's address (health checks send LOCAL); the"
            " servers must trust it (twistd imgresume --proxy-protocol-from).",
        ],
        [
            "no-splice",
            None,
            "Relay every connection through user-space buffers instead of"
            " splice(2) between plain sockets (for debugging; costs more CPU).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["backends"] = []

    def opt_backend(self, endpoint: str) -> None:
        self["backends"].append(endpoint)

    # usage.Options shows __doc__ verbatim as the help text: keep it one line.
    opt_backend.__doc__ = (
        "A backend server: a Twisted client endpoint string (tcp:HOST:PORT,"
        " unix:PATH, ssl:host=HOST:port=PORT, ...). Repeat once per backend;"
        " round-robin follows this order. At least one is required."
    )

    opt_b = opt_backend

    def postOptions(self) -> None:
        from imgresume._endpoints import is_local_only

        if (not is_local_only(self["listen"]) and not self["insecure"]
                and not self["backends-authenticate"]):
            raise usage.UsageError(
                f"--listen {self['listen']} is reachable from other hosts: say"
                " --backends-authenticate if every backend requires keys or client"
                " certificates (twistd imgresume --keys), or --insecure to accept"
                " that anyone who can connect may upload"
            )
        if self["check-mode"] not in ("protocol", "connect"):
            raise usage.UsageError("--check-mode must be protocol or connect")
        if not self["backends"]:
            raise usage.UsageError(
                "at least one --backend ENDPOINT is required"
                " (e.g. --backend tcp:127.0.0.1:7001)"
            )
        if self["connect-timeout"] <= 0:
            raise usage.UsageError("--connect-timeout must be more than 0")
        if self["check-timeout"] <= 0:
            raise usage.UsageError("--check-timeout must be more than 0")


def build_balancer(
    reactor: Any,
    backends: Sequence[str],
    *,
    connect_timeout: float = 5.0,
    eject_for: float = 2.0,
    send_proxy: bool = False,
    max_per_address: int = 0,
    metrics: BalancerMetrics | None = None,
    splice: bool = True,
) -> BalancerFactory:
    """
    Assemble a round-robin balancer over C{backends} (client endpoint
    strings, parsed with C{reactor}) and return its server factory, ready to
    be given to any server endpoint. Used by L{makeService}; also the way to
    run a balancer inside another program or a test. C{metrics} (default: a
    registry of its own) is where it counts; see L{BalancerMetrics}.
    C{splice=False} relays through buffers only (C{--no-splice}).
    """
    parsed = [Backend(name, clientFromString(reactor, name)) for name in backends]
    tracker = BackendTracker(parsed, reactor, eject_for=eject_for)
    return BalancerFactory(
        RoundRobinScheduler(tracker), tracker, reactor, connect_timeout=connect_timeout,
        send_proxy=send_proxy, max_per_address=max_per_address, metrics=metrics,
        splice=splice,
    )


def makeService(config: Options, reactor: Any = None) -> IService:
    """
    Build the balancer service from parsed L{Options}. Called by twistd;
    C{reactor} defaults to the global one.

    The result is a L{MultiService} holding the metrics listener (named
    C{"metrics"}, with C{--metrics} only), the L{HealthChecker} (named
    C{"health"}; idle when C{--check-interval} is 0) and the listener (named
    C{"listener"}), started in that order.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    metrics = BalancerMetrics(Registry())
    try:
        factory = build_balancer(
            reactor,
            config["backends"],
            connect_timeout=config["connect-timeout"],
            eject_for=config["eject-for"],
            send_proxy=config["send-proxy"],
            max_per_address=config["max-connections-per-address"],
            metrics=metrics,
            splice=not config["no-splice"],
        )
        listener = ListenerService(reactor, config["listen"], factory)
        scrape = None
        if config["metrics"] is not None:
            scrape = metrics_service(reactor, config["metrics"], metrics.registry)
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(f"bad endpoint string: {e}") from e
    listener.setName("listener")
    checker = HealthChecker(
        factory.tracker,
        reactor,
        interval=config["check-interval"],
        timeout=config["check-timeout"],
        fall=config["fall"],
        rise=config["rise"],
        send_proxy=config["send-proxy"],
        connect_only=config["check-mode"] == "connect",
        metrics=metrics,
    )
    checker.setName("health")
    top = MultiService()
    if scrape is not None:
        scrape.setServiceParent(top)
    checker.setServiceParent(top)
    listener.setServiceParent(top)
    top.metrics = metrics  # type: ignore[attr-defined]
    return top
