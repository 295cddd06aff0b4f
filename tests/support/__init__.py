"""
Helpers shared by the tests; no tests here.

  - L{marks}: the C{slow} marker;
  - L{runners}: C{run} functions for storage and journal work;
  - L{relay}: a TCP relay that can freeze a connection;
  - L{sharedfs}: finding the GlusterFS and CephFS mounts;
  - L{storage_conformance}: the mixin every storage backend passes;
  - L{fuzz}: fuzz targets, seeds, corpus and the atheris runner.
"""
