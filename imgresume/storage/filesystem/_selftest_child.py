# -*- test-case-name: tests.storage.test_selftest.CheckStorageTests -*-
"""
The other process of the self-test (L{imgresume.storage.filesystem.selftest}):
a child Python, started by L{Child}, that answers one probe per line read on
its stdin, using the storage's own lock code, so the self-test can see what
another process (another server) sees of its creates and locks.

Commands, and their answers:

  - C{excl}: an C{O_CREAT|O_EXCL} create of C{<scratch>/excl}; C{eexist}
    or C{created};
  - C{lock}: L{try_lock} on C{<scratch>/lock}, let go at once; C{locked}
    or C{busy}.

Any other command is answered C{unknown command}, an C{OSError} with
C{error: <text>}.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import imgresume
from imgresume.storage.filesystem._locks import try_lock


def main(scratch: str) -> None:
    """Answer the commands read on stdin about files in C{scratch} (the child)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

    def answer(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        command = line.strip()
        try:
            if command == "excl":
                try:
                    os.close(os.open(os.path.join(scratch, "excl"), flags, 0o644))
                except FileExistsError:
                    answer("eexist")
                else:
                    answer("created")
            elif command == "lock":
                fd = os.open(os.path.join(scratch, "lock"), os.O_RDWR)
                try:
                    answer("locked" if try_lock(fd) else "busy")
                finally:
                    os.close(fd)
            else:
                answer("unknown command")
        except OSError as e:
            answer(f"error: {e.strerror or e}")


class Child:
    """
    The self-test's child Python (running L{main}), with a deadline on
    every answer.  Made by the self-test's probes on their first question.
    """

    def __init__(self, scratch: str, timeout: float) -> None:
        self.timeout = timeout
        env = dict(os.environ)
        top = os.path.dirname(os.path.dirname(os.path.abspath(imgresume.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [top, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgresume.storage.filesystem._selftest_child", scratch],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, close_fds=True,
        )
        self.buffer = b""

    def ask(self, command: str) -> str:
        """Send C{command}; return the answer line, or raise if none comes in time."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(command.encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(self.died()) from None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer in {self.timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(self.died())
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def died(self) -> str:
        """Why the child went away: its exit status and last line of stderr."""
        self.close()
        err = b""
        if self.proc.stderr is not None:
            err = self.proc.stderr.read()
        last = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        return f"exited with {self.proc.returncode}: {last[0]}"

    def close(self) -> None:
        """End the child (closing its stdin, killing it if it lingers)."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=self.timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass


if __name__ == "__main__":
    main(sys.argv[1])
