# -*- test-case-name: tests.storage.test_s3.S3PartTests -*-
"""
Writer generations of the uploads in an S3 storage.

Each writer of an upload holds a generation: C{incoming/<id>/lease/<gen>},
created with If-None-Match so two servers never take the same one, and
refreshed (its heartbeat) while the writer lives.  A lease is fresh while
its heartbeat is younger than the TTL; a newer connection finding a fresh
lease asks its writer to yield with C{incoming/<id>/takeover/<gen>}.  A
writer checks that no newer generation exists before it stores each part
(the fence).
"""

from __future__ import annotations

from typing import Any, Callable

from imgresume.errors import UploadBusy
from imgresume.storage.s3._bucket import Bucket


class Leases:
    """
    The leases of the uploads in one L{Bucket}.  Made by the S3 storage;
    used by it (create, resume, status, expiry) and by its writers (fence,
    heartbeat, release, takeover requests).

    @ivar now: the clock (seconds since the epoch).
    """

    def __init__(self, bucket: Bucket, owner: str, ttl: float,
                 busy_retry_after: float, now: Callable[[], float]) -> None:
        """
        @param owner: this server's id, recorded in every lease it takes.
        @param ttl: seconds after its last heartbeat that a writer's lease
            is considered abandoned (its server died).
        """
        self._bucket = bucket
        self._owner = owner
        self._ttl = ttl
        self._busy_retry_after = busy_retry_after
        self.now = now

    def _key(self, upload_id: str, what: str, generation: int) -> str:
        return self._bucket.upload_key(upload_id, f"{what}/{generation:010d}")

    def current(self, upload_id: str) -> tuple[int, dict[str, Any] | None]:
        """The newest generation of an upload (0 if none) and its lease."""
        keys = self._bucket.keys(self._bucket.upload_key(upload_id, "lease/"))
        if not keys:
            return 0, None
        last = max(keys)
        return int(last.rsplit("/", 1)[1]), self._bucket.get_json(last)

    def fresh(self, lease: dict[str, Any] | None) -> bool:
        """Whether a lease is held by a writer that is alive."""
        return (lease is not None and lease.get("state") == "held"
                and self.now() - float(lease.get("heartbeat", 0)) < self._ttl)

    def take(self, upload_id: str, current: int) -> int:
        """
        Take the generation after C{current}.

        @raise UploadBusy: another server took it first.
        """
        generation = current + 1
        record = {"owner": self._owner, "state": "held", "heartbeat": self.now()}
        if not self._bucket.put_json(self._key(upload_id, "lease", generation),
                                     record, exclusive=True):
            raise self.busy(upload_id)
        return generation

    def busy(self, upload_id: str) -> UploadBusy:
        """The error for an upload another connection is writing."""
        return UploadBusy(f"upload {upload_id} is being written by another connection",
                          retry_after=self._busy_retry_after)

    def release(self, upload_id: str, generation: int) -> None:
        """Mark a writer's lease released: the next resume need not wait for it."""
        self._bucket.put_json(self._key(upload_id, "lease", generation),
                              {"owner": self._owner, "state": "released",
                               "heartbeat": self.now()})

    def renew(self, upload_id: str, generation: int, heartbeat: float) -> float:
        """
        Refresh a lease's heartbeat if a third of its lifetime has passed
        since the last, C{heartbeat}; return the time of the newest one.
        """
        if self.now() - heartbeat > self._ttl / 3:
            heartbeat = self.now()
            self._bucket.put_json(self._key(upload_id, "lease", generation),
                                  {"owner": self._owner, "state": "held",
                                   "heartbeat": heartbeat})
        return heartbeat

    def newer_exists(self, upload_id: str, generation: int) -> bool:
        """Whether a newer generation than C{generation} was taken."""
        return bool(self._bucket.keys(
            self._bucket.upload_key(upload_id, "lease/"),
            start_after=self._key(upload_id, "lease", generation), limit=1))

    def request_takeover(self, upload_id: str, generation: int) -> None:
        """Ask the writer of C{generation} to yield."""
        self._bucket.put_json(self._key(upload_id, "takeover", generation), {})

    def takeover_requested(self, upload_id: str, generation: int) -> bool:
        """Whether a newer connection asked the writer of C{generation} to yield."""
        return self._bucket.exists(self._key(upload_id, "takeover", generation))
