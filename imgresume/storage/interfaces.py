# -*- test-case-name: tests.storage.test_memory,tests.storage.test_filesystem -*-
"""
The storage API every imgresume backend implements.

The server calls an L{IUploadStorage} to create or resume an upload and gets
back an L{IUploadWriter} that holds the upload's write ownership until it is
completed, aborted or released.  Every method that touches storage returns a
Deferred: a backend on a real disk runs its work on a thread pool so the
reactor never blocks on disk.

Implementations: L{imgresume.storage.filesystem.FilesystemStorage} (shared
filesystem, the main one) and L{imgresume.storage.memory.MemoryStorage} (fast
tests).  Both pass the conformance mixin in C{tests/support/storage_conformance.py}.
"""

from __future__ import annotations

from typing import Mapping

import attrs
from zope.interface import Attribute, Interface

from imgresume.errors import StorageError

#: Guarantees a backend may declare in L{IUploadStorage.guarantees}.
DURABLE_ACK = "durable-ack"  # a write's Deferred fires only once bytes are durable
SHARED = "shared"  # several server processes (hosts) may use it at once
EXCLUSIVE_WRITER = "exclusive-writer"  # one writer per upload across all users
PROVEN_OFFSET = "proven-offset"  # resume offsets come from checksummed records
ATOMIC_COMPLETE = "atomic-complete"  # completed files appear whole or not at all


@attrs.frozen
class NewUpload:
    """What a client asks for when it starts an upload (the UPLOAD frame)."""

    name: str
    size: int
    #: None when the client sends the SHA-256 at the end (to complete()).
    sha256: bytes | None
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    client_id: str = ""
    #: The algorithm of C{sha256} (a name of L{imgresume.integrity.DIGESTS};
    #: the field keeps its historical name), fixed for the upload's life.
    digest: str = "sha256"
    #: The per-packet checksum the client's connection uses: a backend that
    #: records checksums records this one, so the client's are reused.
    checksum: str = "crc32"
    #: The size is declared later (L{IDeclaresSize}); C{size} is its bound.
    size_deferred: bool = False


@attrs.frozen
class WholeUpload:
    """
    A whole small file sent in one request (the PUT frame): created,
    written, verified and published by L{IUploadStorage.store_whole} in one
    step.  Built by the server adapter from a PUT.
    """

    #: 32 lowercase hex digits chosen by the client.  With C{client_id} it
    #: names this one file's upload, so a repeated request (its answer lost
    #: with a broken connection) is recognised and nothing is stored twice.
    upload_id: str
    name: str
    data: bytes
    #: The client's digest of C{data} in the algorithm C{digest} (the
    #: field keeps its historical name); checked on the stored bytes before
    #: anything is published.
    sha256: bytes
    metadata: Mapping[str, str] = attrs.field(factory=dict)
    client_id: str = ""
    #: The algorithm of C{sha256} (L{imgresume.integrity}).
    digest: str = "sha256"


@attrs.frozen
class Chunk:
    """
    Bytes of an upload to store: they start at C{offset} and end at
    L{end}.  Handed to L{IUploadWriter.write_batch} by the server adapter,
    one per DATA packet.
    """

    offset: int
    data: bytes
    #: The checksum of C{data}, already checked against it (the protocol
    #: did): a backend may record it instead of computing it.  None: not
    #: known.  (Named for CRC-32; C{checksum} names its algorithm, a name
    #: of L{imgresume.integrity.CHECKSUMS}.)
    crc32: int | None = None
    checksum: str = "crc32"

    @property
    def end(self) -> int:
        """Where the chunk ends: C{offset + len(data)}."""
        return self.offset + len(self.data)


@attrs.frozen
class UploadInfo:
    """What storage knows of an upload, fixed at creation."""

    upload_id: str  # 32 lowercase hex digits (128 random bits)
    name: str
    size: int
    sha256: bytes | None  # None: the client gives it to complete()
    metadata: Mapping[str, str]
    client_id: str
    created: float  # seconds since the epoch
    #: The algorithm of C{sha256} and of the tail's digest, fixed at creation.
    digest: str = "sha256"
    #: The size is not declared yet (L{IDeclaresSize}): C{size} is its bound.
    size_deferred: bool = False


@attrs.frozen
class TailCheck:
    """
    The last committed range of a partial upload and the SHA-256 of the bytes
    actually stored there, so a resuming client can check that the residual
    belongs to its file.  Empty (C{length == 0}) when nothing is stored.
    """

    start: int
    length: int
    sha256: bytes


@attrs.frozen
class CompletedUpload:
    """A finished upload: where it lies and the SHA-256 verified on its bytes."""

    upload_id: str
    name: str
    size: int
    sha256: bytes
    path: str  # relative to the storage root, "/"-separated
    #: The algorithm of C{sha256} (a name of L{imgresume.integrity.DIGESTS}).
    digest: str = "sha256"


@attrs.frozen
class StoredFile:
    """
    A completed file found under a name (L{IUploadStorage.find_completed}).
    C{size} is None when what lies there is not a regular file (a
    directory); C{sha256} is read from the stored bytes, in the digest asked
    for, and only when the size is the one asked about (None otherwise).
    """

    path: str  # relative to the storage root, "/"-separated
    size: int | None
    sha256: bytes | None


@attrs.frozen
class UploadStatus:
    """
    What is known of an upload without owning it: for C{imgresume status}
    and C{imgresume ls}.  C{offset} is proven from stored records, like a
    resume's, but read without the lock, so it may already be behind.
    """

    upload_id: str
    name: str
    size: int
    state: str  # "partial" | "complete"
    offset: int
    busy: bool  # a writer owns it right now
    owner: str  # the server id in the lease ("" if unknown)
    created: float
    updated: float  # last change to its data or journal (seconds since the epoch)
    path: str = ""  # where the completed file lies
    #: The algorithm of the upload's digest (docs/protocol.md, section 2b).
    digest: str = "sha256"
    #: The size is not declared yet: C{size} is only the most it may be.
    size_deferred: bool = False


class CompletedFileMoved(StorageError):
    """
    A resumed upload was completed, but its file is no longer where its
    completion put it: a consumer moved or removed it (which
    C{docs/operations.md} allows), and the name may since hold another
    upload's file.  Raised by C{IUploadStorage.resume} instead of
    L{UploadAlreadyComplete <imgresume.errors.UploadAlreadyComplete>}, so a
    client is never told its file lies at a path that holds other bytes.
    A C{STORAGE_ERROR} on the wire.

    @ivar completed: the L{CompletedUpload} as it was recorded.
    """

    def __init__(self, completed: CompletedUpload, what: str) -> None:
        """
        @param what: how the path differs now ("is missing", "now holds
            another file").
        """
        super().__init__(
            f"upload {completed.upload_id} was completed ({completed.digest} "
            f"{completed.sha256.hex()}, verified) at {completed.path}, but that "
            f"path {what}: the file has since been moved away"
        )
        self.completed = completed


class NewerRecordFormat(StorageError):
    """
    An upload's stored record is in a format newer than this server
    understands: a newer imgresume wrote it (during a rolling upgrade).
    Retryable (C{STORAGE_ERROR} on the wire): an upgraded server reads it.
    Raised by C{IUploadStorage.resume} and C{status}.
    """

    def __init__(self, upload_id: str, found: int, understood: int) -> None:
        super().__init__(
            f"upload {upload_id} was written by a newer imgresume (format "
            f"{found}); this server understands format {understood} and older: "
            "resume it through an upgraded server"
        )
        self.found = found
        self.understood = understood


@attrs.frozen
class IncompleteUploads:
    """
    A client's incomplete uploads in a storage (created, neither completed
    nor removed, whether or not a writer holds them): how many, and the
    sizes they declare together.  From L{IUploadStorage.incomplete_for}.
    """

    count: int
    declared_bytes: int


class IUploadStorage(Interface):
    """
    A place where partial and completed uploads live, shared by every server
    that points at it.  Called by the server protocol adapter.
    """

    guarantees = Attribute(
        "frozenset of the guarantee names above that this backend provides."
    )

    def create(request: NewUpload):
        """
        Start a new upload at offset 0 and take write ownership of it.

        @raise imgresume.errors.InvalidName: the name is not acceptable.
        @raise imgresume.errors.StorageFull: no space to start it.
        @return: Deferred firing with an L{IUploadWriter}.
        """

    def resume(upload_id: str, client_id: str | None = None):
        """
        Take write ownership of an existing partial upload and establish the
        offset of its proven residual bytes (truncating anything past it).

        @param client_id: the authenticated client asking; an upload created
            by another client is reported as unknown (None: no check).

        @raise imgresume.errors.UnknownUpload: no such upload.
        @raise imgresume.errors.UploadBusy: another writer owns it.  The
            owner is asked to give it up (see
            L{IUploadWriter.takeover_requested}); retrying after
            C{retry_after} succeeds once it has.
        @raise imgresume.errors.UploadAlreadyComplete: it is finished; the
            exception carries the L{CompletedUpload}.
        @raise CompletedFileMoved: it is finished, but its file is no longer
            the one its completion published.
        @raise NewerRecordFormat: a newer imgresume wrote its record.
        @return: Deferred firing with an L{IUploadWriter}.
        """

    def incomplete_for(client_id: str, verify: bool = False):
        """
        Count C{client_id}'s incomplete uploads, as every server sharing
        the storage sees them (the server's per-client limits on abandoned
        uploads).  Cheap enough to ask before every new upload: a backend
        keeps a per-client index rather than scanning its uploads.

        The count may be a little off after a crash (an index entry lost or
        left behind); with C{verify} a backend first checks its entries
        against the uploads themselves and drops the stale ones, at a cost
        proportional to the count (a backend may do so at most once a
        minute per client).  Ask with C{verify} before refusing.

        @return: Deferred firing with an L{IncompleteUploads}.
        """

    def status(upload_id: str, client_id: str | None = None):
        """
        Report on an upload without taking it over (and without asking its
        owner to yield).

        @raise imgresume.errors.UnknownUpload: no such upload, or it
            belongs to another client.
        @return: Deferred firing with an L{UploadStatus}.
        """

    def find_completed(name: str, size: int, digest: str = "sha256"):
        """
        Look up what lies at C{complete/<name>} (the name itself, NFC
        normalised; not the alternate names of a renamed upload), for an
        UPLOAD whose C{if-exists} policy is C{skip} or C{fail}.  When it is
        a file of C{size} bytes, its C{digest} (a name of
        L{imgresume.integrity.DIGESTS}: the UPLOAD's) is computed from the
        stored bytes (a read of the whole file); otherwise it is not read.

        @raise imgresume.errors.InvalidName: the name is not acceptable.
        @return: Deferred firing with a L{StoredFile}, or None when nothing
            has that name.
        """

    def store_whole(request: WholeUpload):
        """
        Store a whole small file in one step: its bytes written and made
        durable, verified against C{request.sha256} from the stored bytes,
        and published under its name atomically (never replacing a file),
        following the C{if-exists} policy of its metadata as L{complete}
        does, C{skip} included (a file already at the name with the same
        size and SHA-256: nothing is stored, and the L{CompletedUpload}
        names that file with upload id 32 zeros; this comparison comes
        first, so a repeat of a C{skip} request is answered as skipped).

        Idempotent per C{(client_id, upload_id)}: a request repeated after
        its file was published publishes nothing new and returns the same
        L{CompletedUpload}, or raises L{CompletedFileMoved} if a consumer
        has taken that file away since (never publishing it again).  A crash at any point leaves either the
        published file or nothing that the backend's clean-up would not
        remove.

        @raise imgresume.errors.InvalidName: the name is not acceptable.
        @raise imgresume.errors.StorageFull: no space for it.
        @raise imgresume.errors.NameTaken: C{if-exists} is C{fail} and a
            file has the name.
        @raise imgresume.errors.DigestMismatch: the stored bytes do not
            hash to C{request.sha256} (nothing is published).
        @return: Deferred firing with a L{CompletedUpload}.
        """


class IUploadWriter(Interface):
    """
    Write ownership of one partial upload.  Obtained from L{IUploadStorage};
    used by one connection at a time, one call at a time (each call's Deferred
    must fire before the next call).
    """

    info = Attribute("The L{UploadInfo}.")
    offset = Attribute(
        "int: where the next write starts (the end of what the writer took).  "
        "For a backend that commits every write (the filesystem) also what is "
        "durable, and proven."
    )
    tail = Attribute("L{TailCheck} of the last committed range at resume time.")

    def write(offset: int, data: bytes):
        """
        Store C{data} at C{offset}, which must equal L{offset}.  The Deferred
        fires with C{durable}, the offset up to which bytes are durable, once
        they are: the end of C{data} for a backend that commits every write,
        possibly less for one that commits in larger units (it then holds
        the rest in bounded memory or a spool until a unit is complete).

        @raise imgresume.errors.UploadTakenOver: a newer writer owns the
            upload (this writer's lease generation is stale); nothing is
            written.

        @raise imgresume.errors.OffsetMismatch: C{offset != self.offset}.
        @raise imgresume.errors.SizeExceeded: past the declared size.
        @raise imgresume.errors.StorageFull: out of space (nothing committed;
            the upload stays resumable at the old offset).
        @raise imgresume.errors.StorageError: any other failure.  After a
            failed flush the writer is poisoned: every later call fails and the
            next owner re-proves the offset from storage.
        """

    def write_batch(chunks):
        """
        Store a sequence of contiguous L{Chunk}s (each starts at the end of
        the one before), the first at L{offset}, as if by L{write} for each,
        but durable together (a backend may flush once for all of them).
        The Deferred fires with C{durable}, as L{write}'s does, once every
        chunk is stored; on failure none of them is acknowledged.  Same
        errors as L{write}.
        """

    def complete(sha256=None):
        """
        Verify the stored bytes hash to the declared SHA-256, then make the
        file visible at its final path atomically and release ownership.

        @param sha256: the whole file's SHA-256, for an upload created
            without one (C{NewUpload.sha256} None); must be None otherwise.
            See L{expected_digest}.

        @raise imgresume.errors.Incomplete: C{offset < size}.
        @raise imgresume.errors.DigestMismatch: the stored bytes hash to
            something else (the upload is removed).
        @raise imgresume.errors.NameTaken: the upload's metadata asks for
            C{if-exists} C{fail} and a file already has its name (the
            upload is kept, whole: completing it again succeeds once the
            name is free).
        @return: Deferred firing with a L{CompletedUpload}.
        """

    def abort():
        """Remove the partial upload and release ownership."""

    def release():
        """Give up ownership, keeping every stored byte for a later resume."""

    def takeover_requested():
        """
        Whether another connection has asked to resume this upload since
        this writer took it.  The server polls it for connections that have
        gone silent and yields such uploads, so a client that reconnected
        elsewhere (its old connection a zombie) gets its upload back.

        @return: Deferred firing with a bool.
        """


class IDeferredSizeStorage(IUploadStorage):
    """
    A storage whose C{create()} honours C{NewUpload.size_deferred} (the
    size is then a bound) and whose writers provide L{IDeclaresSize}.
    Asked by the HTTP front door before it accepts C{Upload-Defer-Length}.
    """


class IDeclaresSize(Interface):
    """
    The writer of an upload created with C{size_deferred}: declares its
    size once known.  Called by the HTTP front door (a PATCH's
    C{Upload-Length}), one call at a time as for L{IUploadWriter}.
    """

    def declare_size(size: int):
        """
        Fix the upload's size at C{size}, durably, once; from then on the
        upload is one created with that size (writes, completion, the
        per-client declared bytes), and L{IUploadWriter.info} says so.

        @raise ValueError: already declared, or C{size} outside the bound.
        @raise imgresume.errors.SizeExceeded: more bytes are already written.
        @raise imgresume.errors.UploadTakenOver: a newer writer owns it.
        @return: Deferred firing with None once the size is recorded.
        """
