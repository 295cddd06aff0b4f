# -*- test-case-name: tests.storage.test_memory -*-
"""
Tests for L{imgresume.storage.memory}: L{MemoryStorage} passes the storage
conformance suite.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from imgresume.storage.memory import MemoryStorage
from tests.support.storage_conformance import StorageConformanceMixin


class MemoryStorageTests(StorageConformanceMixin, TestCase):
    """L{MemoryStorage} passes the conformance suite."""

    def makeStorage(self):
        return MemoryStorage()

    def makeSibling(self, storage):
        return storage

    def readCompleted(self, storage, path):
        return storage.read_completed(path)

    def storeDamaged(self, writer, offset):
        real = writer._write

        def damaging(at, data):
            result = real(at, data)
            if at <= offset < at + len(data):
                writer._upload.data[offset] ^= 0xFF
                writer._write = real
            return result

        writer._write = damaging

    def moveCompleted(self, storage, path):
        self.consumed = getattr(self, "consumed", [])
        self.consumed.append(storage.files.pop(path))
