# -*- test-case-name: tests.storage.test_selftest -*-
"""
A self-test of the filesystem under a storage root: does it really provide
what L{imgresume.storage.filesystem} relies on (see C{docs/storage.md},
"What the filesystem backend assumes")?

L{check_storage} probes, in a scratch directory C{<root>/.selftest-<random>}
that it always removes:

  - exclusive create: a second C{O_CREAT|O_EXCL} open (and C{mkdir}) of an
    existing name fails, in this process and in another one;
  - atomic rename over an existing file (how C{meta.json} is replaced);
  - hard links, failing with EEXIST instead of replacing a file (how a
    completed file appears without clobbering another);
  - locks: the storage's own lock code, seen by a second open of the file
    (OFD locks) and by a child process, and released when let go;
  - C{fsync}/C{fdatasync} of a file (fatal if they fail) and C{fsync} of a
    directory (a warning if the filesystem answers EINVAL);
  - positional writes, out of order, read back after reopening;
  - free space, and C{incoming/} and C{complete/} on one filesystem.

Blocking: run it before the reactor starts, or on a thread.  The child
process is the same Python running the storage's own C{try_lock}.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import time
from typing import Any, Callable

import attrs

from imgresume.sizes import format_size
from imgresume.storage.filesystem._durable import drop_cache, pread_full, pwrite_all
from imgresume.storage.filesystem._locks import HAVE_OFD, try_lock, unlock
from imgresume.storage.filesystem._selftest_child import Child

#: A warning when less than this is free under the root.
DEFAULT_MIN_FREE = 1 << 30

SCRATCH = "scratch directory"
EXCLUSIVE_CREATE = "exclusive create"
EXCLUSIVE_CREATE_CHILD = "exclusive create (other process)"
ATOMIC_RENAME = "atomic rename"
HARD_LINK = "hard link"
LOCK_OPENS = "lock (two opens)"
LOCK_CHILD = "lock (other process)"
LOCK_RELEASE = "lock release"
FSYNC_FILE = "fsync file"
FSYNC_DIRECTORY = "fsync directory"
POSITIONAL_WRITES = "positional writes"
FREE_SPACE = "free space"
ONE_FILESYSTEM = "one filesystem"
CLEANUP = "cleanup"

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | _CLOEXEC


@attrs.frozen
class Check:
    """
    The result of one probe.

    @ivar ok: C{True} passed; C{False} failed, and the storage cannot keep
        its guarantees here (fatal); C{None} a warning.
    """

    name: str
    ok: bool | None
    detail: str
    #: How to fix a failure, when the check knows ("" otherwise).
    remedy: str = ""

    @property
    def fatal(self) -> bool:
        return self.ok is False

    def to_json(self) -> dict[str, Any]:
        """C{name}, C{ok}, C{detail}, and C{remedy} if there is one."""
        record = attrs.asdict(self)
        if not self.remedy:
            del record["remedy"]
        return record


def fatal(checks: list[Check]) -> list[Check]:
    """The checks that failed fatally."""
    return [c for c in checks if c.ok is False]


def warnings(checks: list[Check]) -> list[Check]:
    """The checks that only warn."""
    return [c for c in checks if c.ok is None]


def check_storage(
    root: str | os.PathLike[str],
    *,
    min_free: int = DEFAULT_MIN_FREE,
    timeout: float = 30.0,
) -> list[Check]:
    """
    Probe the filesystem under C{root}; see the module docstring.

    @param min_free: warn when fewer bytes than this are free.
    @param timeout: longest wait for the child process's answers.
    @return: one L{Check} per probe, in a fixed order.
    """
    root = os.path.abspath(os.fspath(root))
    checks: list[Check] = []
    scratch = os.path.join(root, f".selftest-{secrets.token_hex(6)}")
    try:
        os.mkdir(scratch, 0o700)
    except OSError as e:
        problem = access_problem(root)
        detail = f"cannot create a directory in {root}: {_text(e)}"
        checks.append(Check(SCRATCH, False, f"{detail}: {problem[0]}" if problem else detail,
                            problem[1] if problem else ""))
        checks.append(_free_space(root, min_free))
        return checks
    checks.append(Check(SCRATCH, True, f"{os.path.basename(scratch)} created (and removed)"))
    probe = _Probe(scratch, timeout)
    try:
        probe.run(checks)
    finally:
        probe.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if os.path.lexists(scratch):
            checks.append(Check(CLEANUP, None, f"could not remove {scratch}"))
    checks.append(_free_space(root, min_free))
    checks.append(_one_filesystem(root))
    return checks


def _user(uid: int) -> tuple[str, str]:
    """C{("uid N (name)", "name")}, or with the number for the name if it has none."""
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}", str(uid)
    return f"uid {uid} ({name})", name


def access_problem(root: str | os.PathLike[str]) -> tuple[str, str] | None:
    """
    What keeps this process from creating files in the directory C{root},
    and how to fix it, or None if nothing visible does: it does not exist,
    is not a directory, is on a read-only filesystem, or this user may not
    write in it (or reach it).  Cheap and blocking; asked by C{twistd
    imgresume} before the self-test (whatever C{--skip-storage-check}
    says) and by the self-test when it cannot start.

    @return: C{(what is wrong, how to fix it)}.
    """
    root = os.path.abspath(os.fspath(root))
    me, my_name = _user(os.geteuid())
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return (f"{root} does not exist",
                f"create it (mkdir -p {root}, owned by the server's user) or mount the "
                "shared filesystem there")
    except PermissionError:
        parts = root.split(os.sep)
        blocked = next((os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))
                        if not os.access(os.sep.join(parts[:i]) or os.sep, os.X_OK)), root)
        return (f"permission denied for {me} on {blocked}, on the way to {root}",
                f"give {my_name} search (x) permission on {blocked}")
    except OSError as e:
        return f"{root}: {_text(e)}", "check the mount"
    if not stat.S_ISDIR(st.st_mode):
        return f"{root} is not a directory", "give --storage a directory"
    try:
        read_only = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{root} is on a read-only filesystem", "mount it read-write"
    if not os.access(root, os.W_OK | os.X_OK,
                     effective_ids=os.access in os.supports_effective_ids):
        owner = _user(st.st_uid)[0]
        remedy = (f"give its owner write permission (chmod u+w {root})"
                  if st.st_uid == os.geteuid() else
                  f"make it writable for {my_name} (e.g. chown {my_name} {root}), or run "
                  "the server as the user that owns it")
        return (f"permission denied for {me} on {root} (owned by {owner}, mode "
                f"{stat.S_IMODE(st.st_mode):04o})", remedy)
    return None


def _text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return f"{e.strerror or os.strerror(e.errno)} ({name})"
    return str(e) or repr(e)


class _Probe:
    """The probes that need the scratch directory."""

    def __init__(self, scratch: str, timeout: float) -> None:
        self.scratch = scratch
        self.timeout = timeout
        self.fds: list[int] = []
        self.child: Child | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def open(self, name: str, flags: int = os.O_RDWR | _CLOEXEC) -> int:
        fd = os.open(self.path(name), flags, 0o644)
        self.fds.append(fd)
        return fd

    def create(self, name: str, content: bytes = b"") -> None:
        fd = os.open(self.path(name), _CREATE, 0o644)
        try:
            if content:
                pwrite_all(os.pwrite, fd, content, 0)
        finally:
            os.close(fd)

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def close(self) -> None:
        if self.child is not None:
            self.child.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def run(self, checks: list[Check]) -> None:
        steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [
            (EXCLUSIVE_CREATE, self.exclusive_create),
            (ATOMIC_RENAME, self.atomic_rename),
            (HARD_LINK, self.hard_link),
            (LOCK_OPENS, self.locks),
            (FSYNC_FILE, self.fsync_file),
            (FSYNC_DIRECTORY, self.fsync_directory),
            (POSITIONAL_WRITES, self.positional_writes),
        ]
        for name, step in steps:
            try:
                result = step()
            except Exception as e:
                result = Check(name, False, _text(e))
            checks.extend(result if isinstance(result, list) else [result])

    # -- the probes ---------------------------------------------------------

    def exclusive_create(self) -> list[Check]:
        self.create("excl")
        try:
            fd = os.open(self.path("excl"), _CREATE, 0o644)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            return [Check(EXCLUSIVE_CREATE, False,
                          "a second O_CREAT|O_EXCL open of an existing file succeeded")]
        os.mkdir(self.path("dir"))
        try:
            os.mkdir(self.path("dir"))
        except FileExistsError:
            pass
        else:  # pragma: no cover - no known filesystem does this
            return [Check(EXCLUSIVE_CREATE, False, "mkdir of an existing name succeeded")]
        checks = [Check(EXCLUSIVE_CREATE, True,
                        "O_CREAT|O_EXCL and mkdir refuse an existing name (EEXIST)")]
        try:
            answer = self.ask("excl")
        except Exception as e:
            checks.append(Check(EXCLUSIVE_CREATE_CHILD, False, f"child process: {_text(e)}"))
            return checks
        if answer == "eexist":
            checks.append(Check(EXCLUSIVE_CREATE_CHILD, True,
                                "another process's O_EXCL create got EEXIST"))
        elif answer == "created":
            checks.append(Check(EXCLUSIVE_CREATE_CHILD, False,
                                "another process created a file that already exists"))
        else:
            checks.append(Check(EXCLUSIVE_CREATE_CHILD, False, f"child process: {answer}"))
        return checks

    def atomic_rename(self) -> Check:
        self.create("target", b"old contents")
        self.create(".target.tmp", b"new contents")
        try:
            os.replace(self.path(".target.tmp"), self.path("target"))
        except OSError as e:
            return Check(ATOMIC_RENAME, False, f"rename over an existing file: {_text(e)}")
        if self.read("target") != b"new contents" or os.path.lexists(self.path(".target.tmp")):
            return Check(ATOMIC_RENAME, False,
                         "after rename over an existing file, the target does not "
                         "hold the new contents or the source still exists")
        return Check(ATOMIC_RENAME, True, "rename replaces an existing file")

    def hard_link(self) -> Check:
        self.create("link-source", b"linked")
        self.create("link-other", b"other")
        dir_fd = self.open(".", os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            # The form completion uses: relative to an open directory.
            os.link(self.path("link-source"), "link-target", dst_dir_fd=dir_fd)
        except OSError as e:
            return Check(HARD_LINK, False, f"cannot link a file: {_text(e)}")
        a = os.stat(self.path("link-source"))
        b = os.stat(self.path("link-target"))
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) or self.read("link-target") != b"linked":
            return Check(HARD_LINK, False, "a link is not the same file as its source")
        try:
            os.link(self.path("link-source"), "link-other", dst_dir_fd=dir_fd)
        except FileExistsError:
            pass
        except OSError as e:
            return Check(HARD_LINK, False,
                         f"link onto an existing name failed with {_text(e)}, not EEXIST")
        else:
            return Check(HARD_LINK, False, "link onto an existing name succeeded")
        if self.read("link-other") != b"other":
            return Check(HARD_LINK, False, "link onto an existing name changed that file")
        return Check(HARD_LINK, True, "link works and refuses an existing name (EEXIST)")

    def locks(self) -> list[Check]:
        self.create("lock")
        first = self.open("lock")
        second = self.open("lock")
        try:
            locked = try_lock(first)
        except OSError as e:
            return [Check(LOCK_OPENS, False, f"cannot lock a file: {_text(e)}")]
        if not locked:
            return [Check(LOCK_OPENS, False, "cannot lock a file nobody holds")]
        checks = []
        if HAVE_OFD:
            try:
                again = try_lock(second)
            except OSError as e:
                checks.append(Check(LOCK_OPENS, False, f"second open: {_text(e)}"))
            else:
                if again:
                    checks.append(Check(LOCK_OPENS, False,
                                        "a second open of the file took the held lock "
                                        "(no OFD lock semantics)"))
                else:
                    checks.append(Check(LOCK_OPENS, True,
                                        "a second open of the file finds the OFD lock held"))
        else:  # pragma: no cover - Linux has OFD locks
            checks.append(Check(LOCK_OPENS, None,
                                "no OFD locks here: POSIX locks, which the storage "
                                "guards with a per-process table"))
        try:
            answer = self.ask("lock")
        except Exception as e:
            checks.append(Check(LOCK_CHILD, False, f"child process: {_text(e)}"))
            return checks
        if answer == "busy":
            checks.append(Check(LOCK_CHILD, True, "another process finds the lock held"))
        elif answer == "locked":
            checks.append(Check(LOCK_CHILD, False,
                                "another process took a held lock: locks are not shared"))
            return checks
        else:
            checks.append(Check(LOCK_CHILD, False, f"child process: {answer}"))
            return checks
        unlock(first)
        # A network filesystem may take a moment to pass the release on.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                answer = self.ask("lock")
            except Exception as e:
                checks.append(Check(LOCK_RELEASE, False, f"child process: {_text(e)}"))
                return checks
            if answer != "busy" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if answer == "locked":
            checks.append(Check(LOCK_RELEASE, True,
                                "another process can take the lock once it is let go"))
        elif answer == "busy":
            checks.append(Check(LOCK_RELEASE, False,
                                "the lock still looks held to another process 2 s after "
                                "it was let go"))
        else:
            checks.append(Check(LOCK_RELEASE, False, f"child process: {answer}"))
        return checks

    def fsync_file(self) -> Check:
        fd = self.open("sync", _CREATE)
        pwrite_all(os.pwrite, fd, b"durable", 0)
        try:
            os.fdatasync(fd)
            os.fsync(fd)
        except OSError as e:
            return Check(FSYNC_FILE, False, f"fsync/fdatasync of a file failed: {_text(e)}")
        return Check(FSYNC_FILE, True, "fsync and fdatasync of a file succeed")

    def fsync_directory(self) -> Check:
        fd = self.open(".", os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return Check(FSYNC_DIRECTORY, None,
                             "the filesystem cannot fsync a directory (EINVAL): new "
                             "and renamed names are as durable as it makes them")
            return Check(FSYNC_DIRECTORY, False, f"fsync of a directory failed: {_text(e)}")
        return Check(FSYNC_DIRECTORY, True, "fsync of a directory succeeds")

    def positional_writes(self) -> Check:
        fd = self.open("pwrite", _CREATE)
        # Out of order and overlapping, as a resumed upload may write.
        writes = [(4096, b"B" * 4096), (0, b"A" * 4096), (8192 - 50, b"C" * 100)]
        expected = bytearray(8192 + 50)
        for offset, data in writes:
            pwrite_all(os.pwrite, fd, data, offset)
            expected[offset : offset + len(data)] = data
        os.fdatasync(fd)
        other = self.open("pwrite", os.O_RDONLY | _CLOEXEC)
        drop_cache(other)
        got = pread_full(other, len(expected) + 10, 0)
        if got != bytes(expected):
            return Check(POSITIONAL_WRITES, False,
                         "bytes written at offsets read back differently")
        return Check(POSITIONAL_WRITES, True,
                     "out-of-order writes at offsets read back as written")

    # -- the child process --------------------------------------------------

    def ask(self, command: str) -> str:
        if self.child is None:
            self.child = Child(self.scratch, self.timeout)
        return self.child.ask(command)


# -- checks on the root itself -------------------------------------------------


def _free_space(root: str, min_free: int) -> Check:
    try:
        st = os.statvfs(root)
    except OSError as e:
        return Check(FREE_SPACE, None, f"cannot tell: {_text(e)}")
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    text = f"{format_size(free)} free of {format_size(total)}"
    if free < min_free:
        return Check(FREE_SPACE, None, f"only {text}")
    return Check(FREE_SPACE, True, text)


def _one_filesystem(root: str) -> Check:
    devices = {}
    for name in ("incoming", "complete"):
        try:
            devices[name] = os.stat(os.path.join(root, name)).st_dev
        except FileNotFoundError:
            continue
        except OSError as e:
            return Check(ONE_FILESYSTEM, False, f"cannot stat {name}/: {_text(e)}")
    if len(set(devices.values())) > 1:
        return Check(ONE_FILESYSTEM, False,
                     "incoming/ and complete/ are on different filesystems: "
                     "completed files are hard links and cannot cross them")
    if len(devices) < 2:
        return Check(ONE_FILESYSTEM, True, "incoming/ and complete/ not both created yet")
    return Check(ONE_FILESYSTEM, True, "incoming/ and complete/ are on one filesystem")
