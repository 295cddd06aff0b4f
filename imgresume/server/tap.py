"""
C{twistd imgresume}: run one upload server.  Imported only when the
subcommand runs (the drop-in in C{twisted/plugins/} names this module).
"""

from __future__ import annotations

from twisted.python import usage

from imgresume.protocol import ServerLimits
from imgresume._endpoints import is_local_only, requires_client_certificate
from imgresume._options import BaseOptions
from imgresume.sizes import parse_duration, parse_size


class Options(BaseOptions):
    synopsis = "--listen ENDPOINT --storage DIR [options]"
    longdesc = """Run an imgresume upload server.

Several servers, on one host or many, may share one storage directory (a
shared filesystem such as NFS, CephFS or GlusterFS): any of them can resume
an upload another one started.  Put them behind `twistd imgresume-lb` or
HAProxy.

At start the server tests the storage directory (exclusive create, atomic
rename, hard links, locks seen by another process, fsync; see
`imgresume check-storage --help`) and refuses to start if the filesystem
lacks a guarantee the storage needs.  Every --gc-interval it removes partial
uploads untouched for --expire-after (never one a writer holds, never a
completed file), and records of completed uploads after
--expire-records-after.

Examples:
  twistd -n --pidfile= imgresume --listen tcp:9001:interface=127.0.0.1 \\
      --storage /srv/imgresume --server-id node-a
  twistd -n --pidfile= imgresume --storage /srv/imgresume \\
      --gc-interval 1h --expire-after 3d
"""
    optParameters = [
        ["listen", "l", "tcp:9000:interface=127.0.0.1",
         "Twisted server endpoint to listen on (tcp:PORT, ssl:..., mtls:..., unix:PATH, "
         "haproxy:...)."],
        ["storage", "s", None, "Storage directory, shared by every server of the pool, or "
         "s3://BUCKET/PREFIX for S3-compatible object storage (docs/s3.md) (required)."],
        ["s3-endpoint", None, None, "With --storage s3://...: the S3 endpoint URL "
         "[default: $AWS_ENDPOINT_URL, else AWS].  Credentials come from the usual "
         "AWS_* environment variables or ~/.aws, never from the command line."],
        ["s3-region", None, None, "With --storage s3://...: the region "
         "[default: $AWS_DEFAULT_REGION]."],
        ["s3-part-size", None, "5M", "With --storage s3://...: the smallest part size "
         "(at least 5M); acknowledgements come at part boundaries."],
        ["s3-spool-dir", None, None, "With --storage s3://...: hold each upload's "
         "unfinished part in a temporary file here instead of in memory."],
        ["s3-lease-time", None, "15s", "With --storage s3://...: a writer's lease is "
         "free this long after its last heartbeat (its server died); heartbeats come "
         "every third of it."],
        ["keys", "k", None, "Key file (`imgresume keys add`): every client must authenticate "
         "with its key.  Reloaded when it changes."],
        ["server-id", None, None, "Name of this server in logs and in the handshake "
         "[default: HOST:PID]."],
        ["max-file-size", None, "1T", "Largest file a client may declare (e.g. 500M, 20G)."],
        ["chunk-size", None, "1M", "Payload size the server recommends to clients."],
        ["max-payload", None, "4M", "Largest DATA payload accepted."],
        ["max-put", None, "4M", "Largest file taken whole in one PUT frame, stored in one "
         "step (at most --max-payload); 0: PUT not offered."],
        ["puts-at-once", None, "4", "PUTs of one connection stored at the same time "
         "(answered in order); more wait in the connection's buffer."],
        ["handshake-timeout", None, "30s", "Time a client has to complete the handshake."],
        ["idle-timeout", None, "5m", "Silence after which a connection is closed "
         "(and its upload released for another server)."],
        ["takeover-idle", None, "10s", "A connection silent this long gives its upload up "
         "to a newer connection that asks for it (a client that reconnected elsewhere)."],
        ["threads", None, "8", "Threads for disk work."],
        ["verify", None, "stored", "Where the whole-file digest checked before COMPLETED "
         "comes from: stored (every byte read back from the storage, its cache dropped: "
         "catches a storage that returns other bytes than it was given) or received (the "
         "bytes hashed as they are written: no read; a resumed prefix is still read "
         "back). Filesystem storage only; S3 always reads the object back."],
        ["max-data-memory", None, None, "Received upload data all connections together may "
         "hold in memory (frames arriving, chunks waiting for the disk); past it they stop "
         "reading until writes catch up [default: 32M, or 4 x the batch limit (2 x "
         "--max-payload, at least 8M) if more]."],
        ["max-uploads-per-client", None, "64", "Uploads one client id may have open on this "
         "server at once (0: no limit); more are refused with QUOTA_EXCEEDED."],
        ["max-incomplete-uploads-per-client", None, "100", "Incomplete uploads (started, "
         "neither completed nor expired) one client id may have on the storage, all "
         "servers together (0: no limit); a new upload past it is refused with "
         "QUOTA_EXCEEDED."],
        ["max-incomplete-bytes-per-client", None, None, "The sizes one client id's "
         "incomplete uploads may declare together (0: no limit) [default: twice "
         "--max-file-size]."],
        ["gc-interval", None, "15m", "How often abandoned uploads are looked for and "
         "removed; 0 disables garbage collection on this server."],
        ["expire-after", None, "7d", "A partial upload untouched this long is removed "
         "(unless a writer holds it)."],
        ["expire-records-after", None, "30d", "The record of a completed upload (what a "
         "resume of it answers) is kept this long; the completed file is never removed."],
        ["max-connections-per-address", None, "64", "Connections allowed at once from one "
         "client address (the real one, behind a trusted balancer); 0 = no limit."],
        ["metrics", None, None, "Serve Prometheus metrics over HTTP at /metrics on this "
         "server endpoint (e.g. tcp:9101:interface=127.0.0.1) [default: off]."],
        ["http", None, None, "Also serve tus 1.0.0 (HTTP resumable uploads, docs/http.md) "
         "at /files/ on this server endpoint, over the same storage [default: off]."],
        ["http-cors-origins", None, None, "With --http: the browser origins (comma-"
         "separated, e.g. https://upload.example.org, or *) whose pages may upload "
         "(CORS) [default: none]."],
        ["http-pre-create", None, None, "With --http: a command (split like a shell "
         "command line, run without a shell) or an http(s):// URL asked, with the "
         "request's JSON, to accept (exit 0, 2xx) or refuse (403) each new upload."],
        ["http-pre-create-timeout", None, "10s", "Time the pre-create hook has to answer "
         "(then: 503, retry later)."],
        ["hook-command", None, None, "Run this program (split like a shell command line, "
         "run without a shell) for each upload event, with the event's JSON on stdin."],
        ["hook-url", None, None, "POST each upload event's JSON to this http:// or "
         "https:// URL."],
        ["hook-attempts", None, "5", "Tries per event and hook before it is given up "
         "(logged)."],
        ["hook-backoff", None, "1s", "Wait before the first retry of a failed hook; "
         "doubled at each retry, up to 5m."],
        ["hook-timeout", None, "30s", "Time one hook run or request may take."],
        ["hook-concurrency", None, "4", "Hook runs or requests at once."],
        ["hook-queue", None, "10000", "Hook deliveries held at most; past it the oldest "
         "queued one is dropped (logged)."],
    ]
    optFlags = [
        ["skip-storage-check", None, "Start even if the storage self-test finds a "
         "guarantee missing (unsafe)."],
        ["insecure", None, "Allow listening beyond this host without --keys "
         "(anyone who can connect may upload)."],
        ["cert-identity", None, "With --listen mtls:...: a client's id must be the "
         "subject CN of its verified TLS certificate, and the certificate is its "
         "credential (no key needed, even with --keys)."],
        ["upload-page", None, "With --http: serve a browser upload page (drag and drop, "
         "resumable) at / of the HTTP endpoint (docs/http.md)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["proxy-protocol-from"] = []

    def opt_proxy_protocol_from(self, networks: str) -> None:
        self["proxy-protocol-from"].append(networks)

    # usage.Options shows __doc__ as the help text.
    opt_proxy_protocol_from.__doc__ = (
        "Peers that must start each connection with a PROXY protocol header (v1 or v2) "
        "naming the real client: CIDR networks, addresses and `unix` (UNIX socket "
        "peers), comma-separated; repeatable.  Only balancers you run: never a network "
        "clients connect from."
    )

    def postOptions(self) -> None:
        if not self["storage"]:
            raise usage.UsageError("--storage DIR is required")
        if self["cert-identity"] and not requires_client_certificate(self["listen"]):
            raise usage.UsageError(
                "--cert-identity needs --listen mtls:PORT:...:caCerts=CA.pem (TLS that "
                "requires client certificates; see docs/tls.md)"
            )
        if self["keys"]:
            from imgresume.keys import KeyFileError, load_keys

            try:
                load_keys(self["keys"])
            except KeyFileError as e:
                raise usage.UsageError(str(e))
        elif (not self["insecure"] and not self["cert-identity"]
              and not is_local_only(self["listen"])):
            raise usage.UsageError(
                f"--listen {self['listen']} is reachable from other hosts but no --keys "
                "file is given, so anyone could upload: add --keys FILE (see `imgresume "
                "keys add --help`), or listen on mtls:... with --cert-identity, or on a "
                "loopback interface or a UNIX socket, or say --insecure"
            )
        if self["verify"] not in ("stored", "received"):
            raise usage.UsageError("--verify must be stored or received")
        if self["storage"].startswith("s3://"):
            self._check_s3_options()
            if self["verify"] != "stored":
                raise usage.UsageError(
                    "--verify received applies to filesystem storage: S3 storage reads "
                    "the assembled object back")
        try:
            self["limits"] = ServerLimits(
                max_payload=parse_size(self["max-payload"]),
                chunk_size=parse_size(self["chunk-size"]),
                max_file_size=parse_size(self["max-file-size"]),
                max_put=parse_size(self["max-put"]),
                puts_at_once=int(self["puts-at-once"]),
            )
            if self["limits"].puts_at_once < 1:
                raise ValueError("--puts-at-once must be at least 1")
            for key in ("handshake-timeout", "idle-timeout", "takeover-idle",
                        "gc-interval", "expire-after", "expire-records-after"):
                self[key] = parse_duration(self[key])
            self["threads"] = int(self["threads"])
            if self["max-data-memory"] is not None:
                self["max-data-memory"] = parse_size(self["max-data-memory"])
            self["max-uploads-per-client"] = int(self["max-uploads-per-client"])
            self["max-incomplete-uploads-per-client"] = int(
                self["max-incomplete-uploads-per-client"])
            if self["max-incomplete-bytes-per-client"] is None:
                self["max-incomplete-bytes-per-client"] = 2 * self["limits"].max_file_size
            else:
                self["max-incomplete-bytes-per-client"] = parse_size(
                    self["max-incomplete-bytes-per-client"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        if self["max-incomplete-uploads-per-client"] < 0:
            raise usage.UsageError("--max-incomplete-uploads-per-client must be 0 or more")
        if 0 < self["max-incomplete-bytes-per-client"] < self["limits"].max_file_size:
            raise usage.UsageError(
                "--max-incomplete-bytes-per-client must be at least --max-file-size (or 0: "
                "no limit), or no file of the largest size could be uploaded")
        if self["limits"].chunk_size > self["limits"].max_payload:
            raise usage.UsageError("--chunk-size must not exceed --max-payload")
        if self["max-data-memory"] is not None and self["max-data-memory"] <= 0:
            raise usage.UsageError("--max-data-memory must be more than 0")
        for key in ("expire-after", "expire-records-after"):
            if self[key] <= 0:
                raise usage.UsageError(f"--{key} must be more than 0")
        self._check_proxy_options()
        self._check_hook_options()
        self._check_http_options()

    def _check_http_options(self) -> None:
        """
        The secure-by-default rule for --http: reachable from other hosts,
        it needs --keys (bearer keys), and TLS (ssl: or mtls:) so that the
        keys never cross the network in clear; --insecure overrides both.
        """
        http = self["http"]
        origins = self["http-cors-origins"]
        self["http-cors-origins"] = tuple(o.strip().rstrip("/") for o in (origins or "")
                                          .split(",") if o.strip())
        if origins is not None and http is None:
            raise usage.UsageError("--http-cors-origins needs --http")
        if self["upload-page"] and http is None:
            raise usage.UsageError("--upload-page needs --http")
        self._check_pre_create()
        if http is None or self["insecure"] or is_local_only(http):
            return
        if not self["keys"]:
            raise usage.UsageError(
                f"--http {http} is reachable from other hosts but no --keys file is "
                "given, so anyone could upload: add --keys FILE (clients send "
                "Authorization: Bearer CLIENT_ID:KEY), or listen on a loopback interface "
                "or a UNIX socket, or say --insecure")
        if http.split(":", 1)[0].lower() not in ("ssl", "mtls"):
            raise usage.UsageError(
                f"--http {http} is reachable from other hosts without TLS, so bearer "
                "keys would cross the network in clear: listen on ssl:PORT:privateKey="
                "KEY:certKey=CERT (docs/http.md), or on a loopback interface behind a "
                "balancer that ends TLS, or say --insecure")

    def _check_pre_create(self) -> None:
        from imgresume.server._hooks import parse_command

        hook = self["http-pre-create"]
        try:
            timeout = parse_duration(self["http-pre-create-timeout"])
        except ValueError as e:
            raise usage.UsageError(f"--http-pre-create-timeout: {e}")
        if timeout <= 0:
            raise usage.UsageError("--http-pre-create-timeout must be more than 0")
        if hook is None:
            return
        if self["http"] is None:
            raise usage.UsageError("--http-pre-create needs --http")
        if hook.lower().startswith(("http://", "https://")):
            self["http-pre-create"] = {"url": hook, "timeout": timeout}
            return
        try:
            self["http-pre-create"] = {"command": parse_command(hook), "timeout": timeout}
        except ValueError as e:
            raise usage.UsageError(f"--http-pre-create: {e}")

    def _check_s3_options(self) -> None:
        from imgresume.storage.s3 import MIN_PART_SIZE, parse_url

        try:
            parse_url(self["storage"])
            part_size = parse_size(self["s3-part-size"])
        except ValueError as e:
            raise usage.UsageError(f"--storage / --s3-part-size: {e}")
        if part_size < MIN_PART_SIZE:
            raise usage.UsageError("--s3-part-size must be at least 5M (S3's smallest part)")
        try:
            lease_ttl = parse_duration(self["s3-lease-time"])
        except ValueError as e:
            raise usage.UsageError(f"--s3-lease-time: {e}")
        if lease_ttl <= 0:
            raise usage.UsageError("--s3-lease-time must be more than 0")
        self["s3-options"] = {"endpoint_url": self["s3-endpoint"],
                              "region": self["s3-region"], "part_size": part_size,
                              "spool_dir": self["s3-spool-dir"], "lease_ttl": lease_ttl}

    def _check_hook_options(self) -> None:
        from imgresume.server._hooks import HookConfig, parse_command

        command = None
        if self["hook-command"] is not None:
            try:
                command = parse_command(self["hook-command"])
            except ValueError as e:
                raise usage.UsageError(f"--hook-command: {e}")
        url = self["hook-url"]
        if url is not None and not url.lower().startswith(("http://", "https://")):
            raise usage.UsageError("--hook-url must be an http:// or https:// URL")
        try:
            config = HookConfig(
                command=command, url=url,
                attempts=int(self["hook-attempts"]),
                backoff=parse_duration(self["hook-backoff"]),
                timeout=parse_duration(self["hook-timeout"]),
                concurrency=int(self["hook-concurrency"]),
                max_queue=int(self["hook-queue"]),
            )
        except ValueError as e:
            raise usage.UsageError(f"hook option: {e}")
        if min(config.attempts, config.concurrency, config.max_queue) < 1:
            raise usage.UsageError(
                "--hook-attempts, --hook-concurrency and --hook-queue must be at least 1")
        if config.timeout <= 0:
            raise usage.UsageError("--hook-timeout must be more than 0")
        self["hooks"] = config

    def _check_proxy_options(self) -> None:
        from imgresume.server._proxytrust import TrustedProxies

        try:
            trusted = TrustedProxies.parse(self["proxy-protocol-from"])
        except ValueError as e:
            raise usage.UsageError(f"--proxy-protocol-from: {e}")
        try:
            limit = int(self["max-connections-per-address"])
        except ValueError:
            limit = -1
        if limit < 0:
            raise usage.UsageError(
                "--max-connections-per-address must be a whole number: 0 (no limit) or more")
        self["max-connections-per-address"] = limit
        if trusted and self["listen"].lower().startswith("haproxy:"):
            raise usage.UsageError(
                "--proxy-protocol-from replaces the haproxy: endpoint prefix (which "
                "trusts every peer): use one or the other"
            )


def _check_storage(config: Options) -> None:
    """
    Refuse, with what is wrong and how to fix it, a storage the server
    cannot use: an S3 URL without boto3; a directory it cannot write in
    (even with C{--skip-storage-check}); one that fails the self-test.
    """
    from imgresume.server._storagecheck import (
        StorageCheckFailed,
        StorageUnusable,
        check_storage_root,
        verify_storage,
    )

    storage = config["storage"]
    if storage.startswith("s3://"):
        try:
            import boto3  # noqa: F401 (only whether it can be imported)
        except ImportError as e:
            raise SystemExit(f"imgresume: --storage {storage}: the S3 backend needs "
                             f"`pip install 'imgresume[s3]'` ({e})") from None
        return
    try:
        check_storage_root(storage)
        if not config["skip-storage-check"]:
            verify_storage(storage)
    except (StorageUnusable, StorageCheckFailed) as e:
        raise SystemExit(f"imgresume: {e}") from None


def makeService(config: Options):
    """
    Build the server from parsed L{Options}.  Called once by twistd before
    the reactor runs, which is why the storage is checked here, blocking:
    nothing is listening yet and no event waits for it, and a refusal ends
    twistd with the message on its stderr before it daemonizes.
    """
    from imgresume.server._service import make_server_service

    _check_storage(config)
    service = make_server_service(
        config["listen"],
        config["storage"],
        keys=config["keys"],
        cert_identity=config["cert-identity"],
        server_id=config["server-id"],
        limits=config["limits"],
        handshake_timeout=config["handshake-timeout"],
        idle_timeout=config["idle-timeout"],
        takeover_idle=config["takeover-idle"],
        threads=config["threads"],
        max_uploads_per_client=config["max-uploads-per-client"],
        max_incomplete_uploads_per_client=config["max-incomplete-uploads-per-client"],
        max_incomplete_bytes_per_client=config["max-incomplete-bytes-per-client"],
        gc_interval=config["gc-interval"],
        expire_after=config["expire-after"],
        expire_records_after=config["expire-records-after"],
        proxy_protocol_from=config["proxy-protocol-from"],
        max_connections_per_address=config["max-connections-per-address"],
        metrics_listen=config["metrics"],
        hooks=config["hooks"],
        s3_options=config.get("s3-options"),
        http_listen=config["http"],
        http_cors_origins=config["http-cors-origins"],
        http_pre_create=config["http-pre-create"],
        verify=config["verify"],
        http_upload_page=config["upload-page"],
    )
    if config["max-data-memory"] is not None:
        service.factory.chunk_memory_limit = config["max-data-memory"]
    return service
