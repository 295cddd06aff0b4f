"""
The tus baseline (issue 13, item 6): tus-node-server (C{@tus/server} with
C{@tus/file-store}) receiving from tus-js-client, both in Node, on
127.0.0.1, storing into the work directory (the disk under test).

The bench installs the npm packages itself, pinned (L{PACKAGES}), into a
cache directory (L{cache_dir}; C{npm install --prefix DIR}), once: a later
run finds them there and does not touch the network.  Without C{node} and
C{npm}, with a Node older than the server needs, or when the install fails,
L{TusNode.prepare} returns a note and the groups go on without the tus rows
(as they do without rsync).

The two Node scripts live in C{bench/tus_node/} and are copied next to the
packages (Node resolves an ES module's imports from where the script is):

 - C{server.mjs DIR}: C{new Server({path: '/files', datastore: new
   FileStore({directory: DIR})})} listening on 127.0.0.1, a port the kernel
   picks; nothing else configured.  Neither package fsyncs, and neither
   checks a checksum (the tus C{checksum} extension is not implemented).
 - C{client.mjs SPEC}: C{new tus.Upload(fs.createReadStream(PATH), {endpoint,
   chunkSize, uploadSize, retryDelays: null})} per file, C{parallel} files
   at a time; C{chunkSize} C{Infinity} (tus-js-client's default: the whole
   file in one PATCH) or a finite size (one PATCH per chunk).

Each measurement checks what was stored: the SHA-256 of every stored file
against its source's, so a failed or short upload cannot count as fast.
Both Node processes exit when their stdin closes, and L{TusNode.stop} ends
the server on every path out of a group: no Node process outlives the bench.

CPU: the server from /proc/<pid>/stat before and after; the client from
C{process.cpuUsage()} inside it over the uploads (single stream; as the
imgresume client's getrusage), or wait4 of the whole process (batch; as
the rsync and imgresume commands there).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from bench._common import ROOT, Workdir, log, now, proc_cpu, wait_rusage

MiB = 1 << 20
#: The npm packages and the versions the bench installs (exact pins).
PACKAGES = {"@tus/server": "2.4.5", "@tus/file-store": "2.1.1", "tus-js-client": "4.3.1"}
#: The oldest Node @tus/server 2.4 supports (its package.json "engines").
NODE_MIN = (20, 19, 0)
#: The chunked variant's PATCH size.  tus-js-client's default is Infinity (one
#: PATCH); users set a finite chunkSize when a server or proxy limits request
#: bodies, typically a few MiB to a few tens of MiB.
CHUNK = 16 * MiB
#: Measurement names (rows of the single group; the batch group's method).
ONE_PATCH = "tus-one-patch"
CHUNKED = "tus-chunked-16m"
BATCH = "tus-js-client"
SCRIPTS = os.path.join(ROOT, "bench", "tus_node")
_INSTALL_TIMEOUT = 300.0


def cache_dir(override: str | None = None) -> str:
    """
    Where the packages go: C{override}, else
    C{$XDG_CACHE_HOME/imgresume-bench/tus} (C{~/.cache/...} by default).
    """
    if override:
        return os.path.abspath(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "imgresume-bench", "tus")


def parse_node_version(text: str) -> tuple[int, int, int] | None:
    """C{"v20.19.2\\n"} -> (20, 19, 2); None if it is not a version."""
    m = re.match(r"\s*v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def installed_versions(prefix: str, packages: Mapping[str, str] = PACKAGES) -> dict[str, str]:
    """The version of each of C{packages} installed under C{prefix}/node_modules."""
    found = {}
    for name in packages:
        try:
            with open(os.path.join(prefix, "node_modules", name, "package.json")) as f:
                found[name] = json.load(f)["version"]
        except (OSError, ValueError, KeyError):
            pass
    return found


def upload_id(url: str) -> str:
    """The upload's id, the last part of its URL: C{@tus/file-store}'s file name."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def verify_stored(store: str, results: Sequence[Mapping[str, Any]],
                  digests: Mapping[str, str]) -> dict[str, Any]:
    """
    The client's per-file C{results} checked against the store: each
    upload's file (named by its URL's id) there, with the SHA-256 of its
    source (C{digests}, by source path).  Counts, and the first few problems.
    """
    verified = mismatched = missing = errors = 0
    problems: list[str] = []
    for r in results:
        if r.get("error") or not r.get("url"):
            errors += 1
            problems.append(f"{os.path.basename(r['path'])}: {r.get('error', 'no URL')}")
            continue
        stored = os.path.join(store, upload_id(r["url"]))
        if not os.path.isfile(stored):
            missing += 1
            problems.append(f"{os.path.basename(r['path'])}: not stored")
        elif sha256_file(stored) != digests[r["path"]]:
            mismatched += 1
            problems.append(f"{os.path.basename(r['path'])}: stored bytes differ")
        else:
            verified += 1
    return {"verified": verified, "mismatched": mismatched, "missing": missing,
            "errors": errors, "problems": problems[:5]}


class TusNode:
    """
    tus-node-server and tus-js-client for one group: L{prepare} (install),
    L{start} (the server), L{upload} / L{upload_batch} (one client run,
    measured and verified), L{stop}.  The groups call it beside rsync.
    """

    def __init__(self, work: Workdir, cache: str | None = None) -> None:
        self.work = work
        self.cache = cache_dir(cache)
        self.store = work.sub("dst", "tus")
        self.node = shutil.which("node")
        self.npm = shutil.which("npm")
        self.node_version = ""
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._digests: dict[str, str] = {}

    @property
    def available(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        """What ran, for the JSON and the table's note."""
        return {"node": self.node_version, "packages": dict(PACKAGES), "cache": self.cache,
                "chunk": CHUNK, "fsync": False, "checksum": False}

    # -- install -----------------------------------------------------------

    def prepare(self, enabled: bool = True) -> str | None:
        """
        Make the packages and scripts ready in the cache directory
        (installing them if a pinned version is missing).  Returns None when
        ready, else the note saying why the tus rows are skipped.
        """
        if not enabled:
            return "tus baseline off (--no-tus): no tus rows, no ratio to tus-node-server."
        if not self.node or not self.npm:
            return _missing_note(self.cache, "node and npm are needed (Debian: "
                                 "apt-get install -y nodejs npm)")
        try:
            out = subprocess.run([self.node, "--version"], capture_output=True, text=True,
                                 timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        version = parse_node_version(out)
        self.node_version = out.strip()
        if version is None or version < NODE_MIN:
            return _missing_note(self.cache, f"node {out.strip() or '?'} is older than "
                                 f"@tus/server {PACKAGES['@tus/server']} needs "
                                 f"({'.'.join(map(str, NODE_MIN))})")
        os.makedirs(self.cache, exist_ok=True)
        with open(os.path.join(self.cache, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time per cache
            if installed_versions(self.cache) != PACKAGES:
                note = self._install()
                if note:
                    return note
            for name in ("server.mjs", "client.mjs"):
                shutil.copyfile(os.path.join(SCRIPTS, name), os.path.join(self.cache, name))
        return None

    def _install(self) -> str | None:
        with open(os.path.join(self.cache, "package.json"), "w") as f:
            json.dump({"name": "imgresume-bench-tus", "private": True,
                       "description": "written by python -m bench (bench/tus.py)",
                       "dependencies": PACKAGES}, f, indent=1)
        argv = [self.npm, "install", "--prefix", self.cache, "--no-audit", "--no-fund",
                "--no-update-notifier", "--loglevel=error", "--fetch-timeout=30000",
                "--fetch-retries=1"]
        log(f"tus: installing {', '.join(f'{k}@{v}' for k, v in PACKAGES.items())} "
            f"into {self.cache}")
        try:
            r = subprocess.run(argv, cwd=self.cache, capture_output=True, text=True,
                               timeout=_INSTALL_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            return _missing_note(self.cache, f"npm install did not finish in "
                                 f"{_INSTALL_TIMEOUT:.0f} s")
        got = installed_versions(self.cache)
        if r.returncode != 0 or got != PACKAGES:
            # npm's first lines name the cause (code, request, reason); its last, its log
            tail = " ".join((r.stderr or r.stdout).strip().splitlines()[:4])[:400]
            return _missing_note(self.cache, f"npm install failed (exit {r.returncode}; "
                                 f"installed {got or 'nothing'}): {tail}")
        return None

    # -- the server ----------------------------------------------------------

    def start(self) -> TusNode:
        """The server on 127.0.0.1; returns once it reported its port."""
        os.makedirs(self.store, exist_ok=True)
        with open(self.work.sub("logs", "tus-server.stderr"), "ab") as err:
            self.proc = subprocess.Popen(
                [self.node, os.path.join(self.cache, "server.mjs"), self.store],
                cwd=self.cache, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30.0)
        line = self.proc.stdout.readline() if ready else b""
        try:
            self.port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise RuntimeError(f"tus server did not start (see "
                               f"{self.work.sub('logs', 'tus-server.stderr')})") from None
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/files/"

    # -- the client ----------------------------------------------------------

    def client(self, files: Sequence[str], chunk_size: int | None, parallel: int,
               timeout: float, tag: str, endpoint: str | None = None,
               servers: Mapping[str, int] | None = None) -> dict[str, Any]:
        """
        One client process to its end, uploading to C{endpoint} (this
        server's by default): its result, with C{wall} (seconds from spawn
        to exit), C{process_cpu} (its CPU seconds, wait4), C{server_cpu}
        (this server's over the run) and C{cpus} (each of C{servers}' over
        the run: role -> pid, this server by default) added.  Killed after
        C{timeout} s (and it stops itself then).
        """
        if servers is None:
            assert self.proc is not None
            servers = {"server": self.proc.pid}
        spec_path = self.work.sub("logs", f"{tag}.spec.json")
        with open(spec_path, "w") as f:
            json.dump({"endpoint": endpoint or self.endpoint, "files": list(files),
                       "chunk_size": chunk_size, "parallel": parallel, "timeout": timeout}, f)
        out_path = self.work.sub("logs", f"{tag}.out")
        err_path = self.work.sub("logs", f"{tag}.stderr")
        cpu0 = {role: proc_cpu(pid) for role, pid in servers.items()}
        with open(out_path, "w") as out, open(err_path, "w") as err:
            t0 = now()
            client = subprocess.Popen([self.node, os.path.join(self.cache, "client.mjs"),
                                       spec_path], cwd=self.cache, stdin=subprocess.PIPE,
                                      stdout=out, stderr=err)
            try:
                rc, cpu = wait_rusage(client, timeout=timeout + 10)
            except TimeoutError:
                client.wait()
                raise RuntimeError(f"tus client killed after {timeout + 10:.0f} s") from None
            finally:
                if client.stdin is not None:
                    client.stdin.close()
            wall = now() - t0
        cpus = {role: proc_cpu(pid) - cpu0[role] for role, pid in servers.items()}
        with open(out_path) as f:
            lines = [x for x in f.read().splitlines() if x.startswith("{")]
        if rc != 0 or not lines:
            with open(err_path) as f:
                tail = f.read()[-800:]
            raise RuntimeError(f"tus client failed ({rc}): {tail}")
        res = json.loads(lines[-1])
        res.update(wall=wall, process_cpu=cpu, server_cpu=sum(cpus.values()), cpus=cpus)
        return res

    def digest(self, path: str) -> str:
        """The SHA-256 of a source file (hex), computed once."""
        if path not in self._digests:
            self._digests[path] = sha256_file(path)
        return self._digests[path]

    def upload(self, src: str, chunk_size: int | None, timeout: float | None = None
               ) -> dict[str, Any]:
        """
        One upload of C{src} (C{chunk_size} None: one PATCH), timed inside
        the client from creating the upload to the last PATCH's response;
        the stored file's SHA-256 checked against the source's (raises if
        it differs: a failed upload is no measurement).
        """
        size = os.path.getsize(src)
        timeout = timeout or 120.0 + size / 4e6
        digest = self.digest(src)
        name = ONE_PATCH if chunk_size is None else CHUNKED
        res = self.client([src], chunk_size, 1, timeout, name)
        [f] = res["files"]
        check = verify_stored(self.store, [f], {src: digest})
        if check["verified"] != 1:
            raise RuntimeError(f"tus ({name}): {'; '.join(check['problems'])}")
        return {
            "name": name,
            "bytes": size,
            "seconds": f["end"] - f["start"],
            "cpu": {"client": res["cpu"], "server": res["server_cpu"]},
            "client_process_cpu": res["process_cpu"],
            "patches": f["patches"],
            "chunk_size": chunk_size,
            "verified": True,
        }

    def upload_batch(self, src_dir: str, digests: Mapping[str, str], parallel: int,
                     timeout: float) -> dict[str, Any]:
        """
        Every file of C{src_dir} (C{digests}: relative name -> SHA-256), one
        PATCH each, C{parallel} at a time from one client process.  Seconds
        from spawning the client to its exit (its start-up in it, as for the
        batch group's other commands); every stored file verified.
        """
        names = sorted(digests)
        paths = [os.path.join(src_dir, n) for n in names]
        res = self.client(paths, None, parallel, timeout, "tus-batch")
        check = verify_stored(self.store, res["files"],
                              {p: digests[n] for p, n in zip(paths, names)})
        return {
            "name": BATCH,
            "files": len(paths),
            "bytes": sum(os.path.getsize(p) for p in paths),
            "seconds": res["wall"],
            "in_process_seconds": res["end"] - res["start"],
            "failures": len(paths) - check["verified"],
            "cpu": {"client": res["process_cpu"], "server": res["server_cpu"]},
            "parallel": parallel,
            **check,
        }


def baseline(work: Workdir, enabled: bool, cache: str | None, notes: list[str]) -> TusNode:
    """
    A group's tus baseline, prepared and its server started; if anything
    stands in the way, a note in C{notes} and a L{TusNode} that is not
    L{TusNode.available} (its rows are skipped).
    """
    t = TusNode(work, cache)
    note = t.prepare(enabled)
    if note is None:
        try:
            t.start()
        except RuntimeError as e:
            note = _missing_note(t.cache, str(e))
    if note:
        notes.append(note)
    return t


def failed_note(name: str, round_: int, error: Exception) -> str:
    """The note for a tus run that failed: that row is left out of the run."""
    text = str(error).strip().splitlines()
    note = (f"{name} failed in round {round_} and is left out of this run: "
            f"{text[-1][:300] if text else type(error).__name__}")
    log("!" * 20 + " " + note)
    return note


def _missing_note(cache: str, why: str) -> str:
    note = (f"{why}: the tus-node-server baseline (and every ratio to it) is SKIPPED. "
            f"The bench installs @tus/server, @tus/file-store and tus-js-client itself "
            f"with npm into {cache} (or --tus-cache DIR).")
    log("!" * 20 + " " + note + " " + "!" * 20)
    return note
