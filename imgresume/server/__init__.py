"""
The imgresume server: the Twisted adapter around the sans-IO protocol
machine, and the service that runs it with a storage backend.
"""

from imgresume.server._factory import UploadServerFactory
from imgresume.server._protocol import UploadServerProtocol
from imgresume.server._service import default_server_id, make_server_service

__all__ = [
    "UploadServerFactory", "UploadServerProtocol", "make_server_service", "default_server_id",
]
