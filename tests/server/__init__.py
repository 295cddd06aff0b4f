"""Tests of imgresume.server: the Twisted adapter, its memory budget, hooks, PROXY-header trust."""
