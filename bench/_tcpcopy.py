"""
The plain Python TCP copy baseline: what a minimal program does with the
same bytes, over the same loopback, into files on the same disk.  No
protocol, no checksums, no acknowledgements: the practical limit.

Run as two processes (the harness starts them):

  python -m bench._tcpcopy recv OUTDIR COUNT [--fsync]
      prints {"port": N}, accepts COUNT connections (a thread each), writes
      each stream to OUTDIR/<index> (fsync at the end with --fsync), then
      prints {"done": [monotonic time per index], "cpu": seconds, ...}

  python -m bench._tcpcopy send PORT FILE...
      sends every FILE at once (a thread each), 1 MiB reads and sendall;
      prints {"start": [monotonic time per file], "cpu": seconds}

Times are CLOCK_MONOTONIC, comparable across processes; the CPU seconds are
getrusage(RUSAGE_SELF) over the transfer only (not interpreter start-up).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
import sys
import threading
import time

BUF = 1 << 20
HEADER = struct.Struct(">Q")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise EOFError("connection closed in the header")
        data += more
    return data


def receive(outdir: str, count: int, fsync: bool) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(max(count, 16))
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    done = [0.0] * count
    received = [0] * count
    cpu0 = _cpu()

    def serve(conn: socket.socket) -> None:
        with conn:
            (index,) = HEADER.unpack(_recv_exactly(conn, HEADER.size))
            buf = bytearray(BUF)
            view = memoryview(buf)
            fd = os.open(os.path.join(outdir, str(index)),
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                total = 0
                while True:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    written = 0
                    while written < n:
                        written += os.write(fd, view[written:n])
                    total += n
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            received[index] = total
            done[index] = time.monotonic()

    threads = []
    for _ in range(count):
        conn, _ = listener.accept()
        t = threading.Thread(target=serve, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    print(json.dumps({"done": done, "bytes": received, "cpu": _cpu() - cpu0}), flush=True)


def send(port: int, files: list[str]) -> None:
    start = [0.0] * len(files)
    errors: list[str] = []
    cpu0 = _cpu()

    def one(index: int, path: str) -> None:
        try:
            buf = bytearray(BUF)
            view = memoryview(buf)
            with open(path, "rb", buffering=0) as f, socket.socket() as s:
                start[index] = time.monotonic()
                s.connect(("127.0.0.1", port))
                s.sendall(HEADER.pack(index))
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    s.sendall(view[:n])
                s.shutdown(socket.SHUT_WR)
                s.recv(1)  # the receiver closes once it has everything
        except Exception as e:  # noqa: BLE001 - reported; the harness fails the run
            errors.append(f"{path}: {e}")

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(files)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"start": start, "cpu": _cpu() - cpu0, "errors": errors}), flush=True)
    if errors:
        sys.exit(1)


def main(argv: list[str]) -> None:
    if argv[:1] == ["recv"] and len(argv) in (3, 4):
        receive(argv[1], int(argv[2]), fsync="--fsync" in argv[3:])
    elif argv[:1] == ["send"] and len(argv) >= 3:
        send(int(argv[1]), argv[2:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
