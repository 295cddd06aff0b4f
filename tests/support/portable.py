# -*- test-case-name: tests.client.test_portable -*-
"""
The client as Windows and macOS would run it, approximated on Linux: the
POSIX-only modules (C{fcntl}, C{pwd}, C{termios}, ...) cannot be imported
by imgresume's client-side modules, and the C{os} and C{signal} modules
they import lack the functions and constants Windows or macOS lack
(C{os.pread}, C{os.posix_fadvise}, C{os.fdatasync}, C{os.O_CLOEXEC},
C{signal.SIGHUP}, ...).

L{hide_posix} does it by replacing C{builtins.__import__}: an import
statement in a client-side module (L{client_side}) gets a stand-in for
C{os} and C{signal} without those names, and an C{ImportError} for a
POSIX-only module; every other module (Twisted, the standard library, the
server side in the same process) is untouched.  Twisted's own portability
(its Windows reactor, its C{fcntl}-free paths) is Twisted's to test and is
not exercised here.

Used by C{tests.client.test_portable} (a real upload by a child process
under it), and for a whole test run with C{IMGRESUME_TEST_HIDE_POSIX=1}
(C{tests/conftest.py}; C{.ci/run} runs the client's tests so).
"""

from __future__ import annotations

import builtins
import os
import signal
import sys
import types
from typing import Any, Callable

#: Modules a client-side module may not import: Windows has none of them.
HIDDEN_MODULES = frozenset({
    "fcntl", "pwd", "grp", "termios", "tty", "pty", "resource", "posix", "syslog",
    "crypt", "spwd", "nis", "readline", "_posixsubprocess",
})

#: C{os} names missing on Windows or on macOS (or both).
HIDDEN_OS = frozenset({
    "pread", "pwrite", "preadv", "pwritev", "posix_fadvise", "posix_fallocate",
    "fdatasync", "sync", "O_CLOEXEC", "O_DIRECTORY", "O_NOFOLLOW", "O_NOATIME",
    "O_DIRECT", "O_DSYNC", "O_SYNC", "O_NONBLOCK", "O_NOCTTY", "O_ASYNC", "O_PATH",
    "O_TMPFILE", "fchmod", "fchown", "lchown", "chown", "fchdir", "getuid", "geteuid",
    "getgid", "getegid", "getgroups", "uname", "fork", "forkpty", "statvfs", "fstatvfs",
    "getloadavg", "sched_getaffinity", "sched_setaffinity", "pipe2", "killpg",
    "getpgrp", "setsid", "mkfifo", "mknod", "splice", "memfd_create", "sendfile",
    "getxattr", "setxattr", "listxattr", "removexattr", "copy_file_range", "wait3",
    "wait4", "waitid", "WNOHANG", "nice", "openpty", "ttyname", "ctermid",
    "setuid", "setgid", "getpriority", "setpriority", "posix_spawn",
})

#: The C{signal} names Windows has; a client-side module sees no others.
WINDOWS_SIGNAL = frozenset({
    "signal", "getsignal", "default_int_handler", "SIG_DFL", "SIG_IGN", "Signals",
    "Handlers", "NSIG", "set_wakeup_fd", "raise_signal", "strsignal", "valid_signals",
    "SIGINT", "SIGTERM", "SIGABRT", "SIGFPE", "SIGILL", "SIGSEGV",
})

#: The modules that run on a scanning station: the client, the protocol,
#: the upload, status and config commands, and what they share.
CLIENT_SIDE = (
    "imgresume.client", "imgresume.protocol", "imgresume.cli", "imgresume._options",
    "imgresume._endpoints", "imgresume.addresses", "imgresume.sizes", "imgresume.names",
    "imgresume.errors", "imgresume.keys", "imgresume.tls",
)
#: Operator commands that work on a storage directory: server side.
SERVER_COMMANDS = ("imgresume.cli._keys", "imgresume.cli._storage")


def client_side(module: str) -> bool:
    """Whether C{module} is one that must run on Windows and macOS."""
    if module == "imgresume" or module == "imgresume.__main__":
        return True
    if any(module == m or module.startswith(m + ".") for m in SERVER_COMMANDS):
        return False
    return any(module == m or module.startswith(m + ".") for m in CLIENT_SIDE)


class _Without(types.ModuleType):
    """A module seen without some of its names."""

    def __init__(self, real: types.ModuleType, visible: Callable[[str], bool]) -> None:
        super().__init__(real.__name__, real.__doc__)
        self.__dict__["_real"] = real
        self.__dict__["_visible"] = visible

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or self._visible(name):
            return getattr(self._real, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} "
                             "(hidden by tests.support.portable: not on Windows/macOS)")

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._real, name, value)

    def __dir__(self) -> list[str]:
        return [n for n in dir(self._real) if n.startswith("__") or self._visible(n)]


PORTABLE_OS = _Without(os, lambda name: name not in HIDDEN_OS)
PORTABLE_SIGNAL = _Without(signal, lambda name: name in WINDOWS_SIGNAL)
_STAND_INS = {"os": PORTABLE_OS, "signal": PORTABLE_SIGNAL}

#: Every import refused, as (importer, module): a test can assert on it.
refused: list[tuple[str, str]] = []
#: Whether L{hide_posix} is in force in this process.
active = False


def hide_posix() -> Callable[[], None]:
    """
    From now on, client-side modules import without POSIX; already
    imported ones get the stand-ins for C{os} and C{signal} too.  Returns
    a function that undoes it.
    """
    global active
    real_import = builtins.__import__
    active = True

    def portable_import(name: str, globals: Any = None, locals: Any = None,
                        fromlist: Any = (), level: int = 0) -> Any:
        importer = (globals or {}).get("__name__") or ""
        if level == 0 and client_side(importer):
            top = name.partition(".")[0]
            if top in HIDDEN_MODULES:
                refused.append((importer, name))
                raise ModuleNotFoundError(
                    f"No module named {name!r} (hidden by tests.support.portable: "
                    "not on Windows)", name=name)
            if top in _STAND_INS:
                module = real_import(name, globals, locals, fromlist, level)
                if name == top:
                    stand_in = _STAND_INS[top]
                    for attribute in fromlist or ():  # from os import pread: refused
                        if not hasattr(stand_in, attribute):
                            refused.append((importer, f"{name}.{attribute}"))
                            raise ImportError(f"cannot import name {attribute!r} from "
                                              f"{name!r} (hidden by tests.support.portable)",
                                              name=name)
                    return stand_in
                return module
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = portable_import
    patched = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not client_side(module_name):
            continue
        for name, stand_in in _STAND_INS.items():
            if module.__dict__.get(name) is stand_in._real:
                module.__dict__[name] = stand_in
                patched.append((module, name))

    def undo() -> None:
        global active
        active = False
        builtins.__import__ = real_import
        for module, name in patched:
            module.__dict__[name] = _STAND_INS[name]._real

    return undo


#: Run a module as C{python -m tests.support.portable MODULE ARGS...}
#: (or C{-c CODE}) with the POSIX parts hidden from the client.
if __name__ == "__main__":
    import runpy

    hide_posix()
    if sys.argv[1] == "-c":
        code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    else:
        target, sys.argv = sys.argv[1], sys.argv[1:]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
