"""Tests of imgresume.balancer: the proxy, its scheduler and options, the health checks."""
