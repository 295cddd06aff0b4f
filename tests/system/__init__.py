"""Whole-system tests on real processes: failover, chaos, HAProxy, GlusterFS, CephFS, TLS, the docs."""
