# -*- test-case-name: tests.system.test_failover,tests.system.test_haproxy,tests.system.test_haproxy_tus -*-
"""
Clusters of real processes on this machine, for tests, benchmarks and
C{make demo}: never used by a server, a balancer or a client.

  - L{LocalCluster}: N C{twistd imgresume} servers over one storage
    directory and one C{twistd imgresume-lb} in front of them; each server
    a L{Node} that can be SIGKILLed and started again.
  - L{HAProxyCluster}: the same servers behind a real C{haproxy} running the
    shipped C{docs/examples/haproxy.cfg} (L{render_config}); the HTTP-mode
    variant for the tus door, C{docs/examples/haproxy-tus.cfg}, rendered by
    L{render_tus_config}.
  - L{free_tcp_port}, L{wait_until_connectable}, L{twistd_argv},
    L{stop_processes}: the small pieces, for code that starts its own
    processes.
"""

from imgresume.testing._cluster import (
    LocalCluster,
    Node,
    free_tcp_port,
    stop_processes,
    twistd_argv,
    wait_until_connectable,
)
from imgresume.testing._haproxy import (
    BACKEND,
    CHECK_CLIENT_ID,
    EXAMPLE_CONFIG,
    FAST_CHECKS,
    HAProxyCluster,
    check_hello,
    find_haproxy,
    render_config,
    runtime_command,
    show_stat,
)
from imgresume.testing._haproxy_tus import TUS_BACKEND, TUS_EXAMPLE_CONFIG, render_tus_config

__all__ = [
    "BACKEND",
    "CHECK_CLIENT_ID",
    "EXAMPLE_CONFIG",
    "FAST_CHECKS",
    "HAProxyCluster",
    "LocalCluster",
    "Node",
    "check_hello",
    "find_haproxy",
    "free_tcp_port",
    "render_config",
    "runtime_command",
    "show_stat",
    "render_tus_config",
    "TUS_BACKEND",
    "TUS_EXAMPLE_CONFIG",
    "stop_processes",
    "twistd_argv",
    "wait_until_connectable",
]
