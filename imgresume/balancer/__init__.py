# -*- test-case-name: tests.balancer.test_proxy -*-
"""
The imgresume round-robin TCP balancer (C{twistd imgresume-lb}).

Public API:

  - L{buildBalancer}: backend endpoint strings in, a server factory out.
  - L{BalancerFactory}: the server factory; one L{FrontendProtocol} per client.
  - L{Backend}, L{BackendTracker}, L{BackendState}: backends and what is
    known about them.
  - L{HealthChecker}, L{HealthStatus}, L{CheckResult}: the active health
    checks that mark backends down and up in the tracker.
  - L{Scheduler}, L{RoundRobinScheduler}: the order backends are tried in.

See C{docs/balancer.md}.
"""

from ._health import HEALTH_CLIENT_ID, CheckResult, HealthChecker, HealthStatus
from ._proxy import NO_BACKEND, BalancerFactory, FrontendProtocol
from ._scheduler import (
    Backend,
    BackendState,
    BackendTracker,
    RoundRobinScheduler,
    Scheduler,
)
from .tap import buildBalancer

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
    "buildBalancer",
]
