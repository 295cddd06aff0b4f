"""Tests of imgresume.storage: the backends, remote names, garbage collection, the self-test."""
