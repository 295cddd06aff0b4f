# -*- test-case-name: tests.storage.test_filesystem -*-
"""
The filesystem L{IUploadStorage <imgresume.storage.interfaces.IUploadStorage>}:
partial and completed uploads in one directory tree that every server
process, on every host, mounts (local disk, NFS, CephFS, GlusterFS).

Layout under the root::

    incoming/<upload_id>/meta.json   what the upload is and its state
    incoming/<upload_id>/data        the bytes, written with pwrite only
    incoming/<upload_id>/journal     one 20-byte record per committed write
    incoming/<upload_id>/lock        OFD lock = write ownership
    incoming/<upload_id>/lease       generation and owner of the current writer
    incoming/<upload_id>/takeover    a newer connection's request to take over
    complete/<name>                  finished files (hard links of data)

The offset an upload resumes from is never a file size: it is proven from the
journal (checksummed records) and from the CRC-32 of the last recorded range
read back from the data file.  See C{docs/storage.md} for the whole design.

All disk work runs through the C{run} callable given to L{FilesystemStorage}
(a thread pool in the server), so the reactor never blocks on disk.

The public names are L{FilesystemStorage} and L{FilesystemUploadWriter};
garbage collection is L{imgresume.storage.filesystem.gc}, the self-test of
a root L{imgresume.storage.filesystem.selftest}.  The private modules hold
one concern each:

  - C{_locks}: OFD/POSIX locks, write ownership of an upload;
  - C{_durable}: durable-write primitives and the mapping of C{OSError};
  - C{_journal}: the journal record format and the offset proof;
  - C{_layout}: C{incoming/<id>/}, C{meta.json}, leases, takeover requests;
  - C{_publish}: symlink-safe, no-clobber completion into C{complete/};
  - C{_readback}: the read-back hash that follows the writes;
  - C{_writer}: L{FilesystemUploadWriter};
  - C{_storage}: L{FilesystemStorage};
  - C{_selftest_child}: the other process of the self-test.
"""

from imgresume.storage.filesystem._storage import VERIFY_MODES, FilesystemStorage
from imgresume.storage.filesystem._writer import FilesystemUploadWriter

__all__ = ["FilesystemStorage", "FilesystemUploadWriter", "VERIFY_MODES"]
