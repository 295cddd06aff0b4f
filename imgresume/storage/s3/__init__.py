# -*- test-case-name: tests.storage.test_s3 -*-
"""
The S3 L{IUploadStorage <imgresume.storage.interfaces.IUploadStorage>}:
uploads kept in an S3-compatible object store (AWS S3, Ceph radosgw, MinIO),
shared by every server that points at the same bucket and prefix.  See
C{docs/s3.md} for the design and its limits.

Layout under C{s3://BUCKET/PREFIX/}::

    incoming/<id>/meta.json        what the upload is; its multipart UploadId
    incoming/<id>/object           target of the multipart upload (staging)
    incoming/<id>/parts/<n>.json   size, MD5 and SHA-256 of stored part n
    incoming/<id>/lease/<gen>      writer generations (created with If-None-Match)
    incoming/<id>/takeover/<gen>   a newer connection asks generation <gen> to yield
    incoming/<id>/done.json        completion record (the final path)
    names/<path>                   claim of a final name (If-None-Match: *)
    complete/<path>                finished objects

Nothing about an upload lives in a server's memory or disk except the bytes
of the current, unfinished part (bounded by the part size): any server can
resume any upload from the bucket alone.  Every boto3 call blocks, so all of
them run through the C{run} callable (a thread pool in the server).  boto3
(the C{s3} extra) is imported only when a storage builds its client.

The private modules hold one concern each:

  - C{_bucket}: S3's limits, C{s3://} URLs, the boto3 client, error
    mapping, and the objects under the prefix;
  - C{_leases}: writer generations, heartbeats and takeover requests;
  - C{_publish}: completion (name claim, copy into C{complete/}) and removal;
  - C{_writer}: L{S3UploadWriter}, the parts of one upload;
  - C{_storage}: L{S3Storage}.
"""

from imgresume.storage.s3._bucket import MAX_PARTS, MIN_PART_SIZE, parse_url, part_size_for
from imgresume.storage.s3._storage import S3Storage
from imgresume.storage.s3._writer import S3UploadWriter

__all__ = [
    "MAX_PARTS",
    "MIN_PART_SIZE",
    "S3Storage",
    "S3UploadWriter",
    "parse_url",
    "part_size_for",
]
