"""
Helpers shared by the tests, one copy each; no tests here (docs/testing.md).

  - L{storage_conformance}: the mixin every storage backend passes;
  - L{sharedfs_suite}: the shared-filesystem suite, run on GlusterFS and
    CephFS; L{sharedfs}: finding their mounts, measuring through them;
  - L{runners}: C{run} functions for storage and journal work;
  - L{wire}: frames a protocol wrote, decoded;
  - L{storages}: a storage whose writes wait for the test;
  - L{memorynet}: an in-memory network to a real server protocol;
  - L{servers}: upload servers in this process on 127.0.0.1;
  - L{processes}: child processes (Python, C{twistd imgresume});
  - L{cluster}: helpers for tests on clusters of real processes;
  - L{options}: C{twistd imgresume} options, parsed;
  - L{tls}: a test PKI;
  - L{relay}: a TCP relay that can freeze a connection;
  - L{marks}: the C{slow} marker;
  - L{fuzz}: fuzz targets, seeds, corpus and the atheris runner.
"""
