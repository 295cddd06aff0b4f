"""
The imgresume wire protocol, sans-IO: frames, an incremental decoder, and the
client and server state machines.  No reactor and no sockets here; the
Twisted adapters live in L{imgresume.server} and L{imgresume.client}.

See C{docs/protocol.md} for the normative description.
"""

from imgresume.protocol._client import (
    StatusReceived,
    Challenged,
    ChunkAcked,
    ClientConnection,
    ClientState,
    ErrorReceived,
    Ponged,
    UploadAccepted,
    UploadCompleted,
    Welcomed,
)
from imgresume.protocol._decoder import FrameDecoder
from imgresume.protocol._frames import (
    HEALTH_CHECK_CLIENT_ID,
    HEALTH_CHECK_CLIENT_IDS,
    MAGIC,
    PROTOCOL_VERSION,
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
    Resume,
    Status,
    Upload,
    UploadStatusFrame,
    Welcome,
    decode_body,
    encode,
)
from imgresume.protocol._server import (
    AuthReceived,
    ChunkReceived,
    ConnectionFailed,
    FinishRequested,
    HelloReceived,
    ResumeRequested,
    ServerConnection,
    ServerLimits,
    ServerState,
    StatusRequested,
    UploadRequested,
)

__all__ = [
    "HEALTH_CHECK_CLIENT_ID", "HEALTH_CHECK_CLIENT_IDS", "MAGIC", "PROTOCOL_VERSION", "FrameType", "FrameDecoder", "encode", "decode_body",
    "Hello", "Welcome", "Upload", "Resume", "Accepted", "Data", "Ack", "Finish", "Completed",
    "Error", "Ping", "Pong", "Challenge", "Auth", "Challenged", "AuthReceived",
    "ClientConnection", "ClientState", "Welcomed", "UploadAccepted", "ChunkAcked",
    "UploadCompleted", "ErrorReceived", "Ponged",
    "ServerConnection", "ServerLimits", "ServerState", "HelloReceived",
    "UploadRequested", "ResumeRequested", "ChunkReceived", "FinishRequested",
    "ConnectionFailed", "Status", "UploadStatusFrame", "StatusRequested", "StatusReceived",
]
