# -*- test-case-name: tests.storage.test_whole -*-
"""
Garbage collection of the one-step store's files (C{incoming/<key>.put}
and C{<key>.done}, L{imgresume.storage.filesystem._whole}): judged, and
removed when their time has come, for L{imgresume.storage.filesystem.gc}.
"""

from __future__ import annotations

import os
import stat

from imgresume.storage.filesystem._locks import lock_open
from imgresume.storage.filesystem._whole import OPEN_PUT, identity

#: Actions of L{collect_put} (the garbage collector's report uses them).
EXPIRED_PUT = "expired-put"
EXPIRED_PUT_RECORD = "expired-put-record"
FRESH_PUT = "fresh-put"
RECENT_PUT_RECORD = "recent-put-record"
BUSY_PUT = "busy"


def collect_put(
    incoming: str, entry: str, now: float, older_than: float,
    records_older_than: float, dry_run: bool,
) -> tuple[str, float, int] | None:
    """
    Judge, and remove if its time has come, one C{.put} file of
    C{incoming/}, for L{imgresume.storage.filesystem.gc}: one never
    published (one link: a request cut short) once C{older_than} has
    passed since it was written, one published (two links: the record
    that answers a repeated request) after C{records_older_than}; never
    while someone holds its lock.  The age is judged again under the lock.

    @return: C{(action, age, bytes freed)}, or C{None} if C{entry} is not
        a regular file (not ours) or is gone.
    """
    path = os.path.join(incoming, entry)

    def judge(st: os.stat_result) -> tuple[str, float]:
        age = now - st.st_mtime
        if st.st_nlink > 1:
            return (EXPIRED_PUT_RECORD if age >= records_older_than
                    else RECENT_PUT_RECORD), age
        return (EXPIRED_PUT if age >= older_than else FRESH_PUT), age

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    action, age = judge(st)
    if action in (FRESH_PUT, RECENT_PUT_RECORD):
        return action, age, 0
    try:
        fd = os.open(path, OPEN_PUT)
    except FileNotFoundError:
        return None
    lock = lock_open(fd)
    if lock is None:
        return BUSY_PUT, age, 0
    try:
        held = os.fstat(lock.fd)
        try:
            current = os.lstat(path)
        except FileNotFoundError:
            return None
        if identity(current) != identity(held):
            return None  # replaced meanwhile: judged next time
        action, age = judge(held)
        freed = held.st_size if held.st_nlink == 1 else 0
        if action in (EXPIRED_PUT, EXPIRED_PUT_RECORD) and not dry_run:
            os.unlink(path)
        return action, age, freed
    finally:
        lock.release()
