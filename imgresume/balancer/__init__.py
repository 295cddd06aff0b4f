# -*- test-case-name: tests.balancer.test_proxy -*-
"""
The imgresume round-robin TCP balancer (C{twistd imgresume-lb}).

Public API:

  - L{build_balancer}: backend endpoint strings in, a server factory out.
  - L{BalancerFactory}: the server factory; one L{FrontendProtocol} per client.
  - L{Backend}, L{BackendTracker}, L{BackendState}: backends and what is
    known about them.
  - L{HealthChecker}, L{HealthStatus}, L{CheckResult}: the active health
    checks that mark backends down and up in the tracker.
  - L{Scheduler}, L{RoundRobinScheduler}: the order backends are tried in.

See C{docs/balancer.md}.
"""

from ._backend import NO_BACKEND
from ._check import HEALTH_CLIENT_ID, CheckResult
from ._health import HealthChecker, HealthStatus
from ._proxy import BalancerFactory, FrontendProtocol
from ._scheduler import (
    Backend,
    BackendState,
    BackendTracker,
    RoundRobinScheduler,
    Scheduler,
)
from .tap import build_balancer

__all__ = [
    "HEALTH_CLIENT_ID",
    "NO_BACKEND",
    "Backend",
    "BackendState",
    "BackendTracker",
    "BalancerFactory",
    "CheckResult",
    "FrontendProtocol",
    "HealthChecker",
    "HealthStatus",
    "RoundRobinScheduler",
    "Scheduler",
    "build_balancer",
]
