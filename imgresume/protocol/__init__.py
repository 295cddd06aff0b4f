"""
The imgresume wire protocol, sans-IO: frames, an incremental decoder, and the
client and server state machines.  No reactor and no sockets here; the
Twisted adapters live in L{imgresume.server} and L{imgresume.client}.

See C{docs/protocol.md} for the normative description.

Besides frames and machines, this package lends the server adapter what it
needs of the codec and of the handshake: L{FrameCursor} and
L{control_limit} (to count received frames before they are parsed) and the
HMAC proofs of the challenge-response handshake (L{client_proof},
L{server_proof}, L{proofs_equal}, L{AUTH_METHOD}, L{AUTH_NONCE_RE}).
"""

from imgresume.protocol._client import (
    StatusReceived,
    Challenged,
    ChunkAcked,
    ClientConnection,
    ClientState,
    ErrorReceived,
    Ponged,
    PutAnswered,
    UploadAccepted,
    UploadCompleted,
    Welcomed,
)
from imgresume.protocol._auth import METHOD as AUTH_METHOD
from imgresume.protocol._auth import NONCE_RE as AUTH_NONCE_RE
from imgresume.protocol._auth import client_proof, server_proof
from imgresume.protocol._auth import same as proofs_equal
from imgresume.protocol._decoder import FrameCursor, FrameDecoder, control_limit
from imgresume.protocol._frames import (
    EMPTY_TAIL_SHA256,
    HEALTH_CHECK_CLIENT_ID,
    HEALTH_CHECK_CLIENT_IDS,
    MAGIC,
    PROTOCOL_VERSION,
    put_header,
    SKIPPED_UPLOAD_ID,
    STATUS_FIELDS,
    Accepted,
    Ack,
    Auth,
    Challenge,
    Completed,
    Data,
    Error,
    Finish,
    FrameType,
    Hello,
    Ping,
    Pong,
    Put,
    Resume,
    Status,
    Upload,
    UploadStatusFrame,
    Welcome,
    decode_body,
    encode,
)
from imgresume.protocol._rules import ServerLimits
from imgresume.protocol._server import ServerConnection
from imgresume.protocol._server_events import (
    AuthReceived,
    ChunkReceived,
    ConnectionFailed,
    FinishRequested,
    HelloReceived,
    PutRequested,
    Refusal,
    ResumeRequested,
    ServerState,
    StatusRequested,
    UploadRequested,
)

__all__ = [
    "HEALTH_CHECK_CLIENT_ID", "HEALTH_CHECK_CLIENT_IDS", "MAGIC", "PROTOCOL_VERSION", "FrameType", "FrameDecoder", "encode", "decode_body",
    "EMPTY_TAIL_SHA256", "SKIPPED_UPLOAD_ID", "STATUS_FIELDS", "put_header",
    "FrameCursor", "control_limit",
    "AUTH_METHOD", "AUTH_NONCE_RE", "client_proof", "server_proof", "proofs_equal",
    "Hello", "Welcome", "Upload", "Resume", "Accepted", "Data", "Ack", "Finish", "Completed",
    "Error", "Ping", "Pong", "Put", "Challenge", "Auth", "Challenged", "AuthReceived",
    "ClientConnection", "ClientState", "Welcomed", "UploadAccepted", "ChunkAcked",
    "UploadCompleted", "ErrorReceived", "Ponged", "PutAnswered",
    "ServerConnection", "ServerLimits", "ServerState", "HelloReceived",
    "UploadRequested", "ResumeRequested", "PutRequested", "ChunkReceived", "FinishRequested",
    "ConnectionFailed", "Refusal", "Status", "UploadStatusFrame", "StatusRequested", "StatusReceived",
]
