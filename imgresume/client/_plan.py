# -*- test-case-name: tests.client.test_collect -*-
"""
What a batch would do, without a connection: for each file, whether the
journal knows it as stored by an earlier run, as an unfinished upload to
resume, or not at all (it would be sent).  Used by
L{imgresume.client.Uploader.plan} and, through it, C{imgresume upload
--dry-run}.
"""

from __future__ import annotations

import os
from typing import Sequence

import attrs

from imgresume.client._batch import BatchItem
from imgresume.client._journal import journal_key
from imgresume.client._journal_queue import JournalQueue
from imgresume.client._source import Fingerprint, Runner


@attrs.frozen
class PlannedUpload:
    """
    What an upload of one file would do, as far as the local file and the
    journal tell (the server is not asked):

      - C{"send"}: no journal entry; the file would be sent whole;
      - C{"resume"}: an unfinished upload (C{upload_id}) would be resumed
        from the offset the server proves;
      - C{"stored"}: an earlier run stored and verified it (C{upload_id});
        a run would confirm that with the server and send nothing;
      - C{"unreadable"}: the file cannot be read (C{reason}).

    Made by L{imgresume.client.Uploader.plan}.
    """

    item: BatchItem
    action: str
    size: int | None = None
    upload_id: str | None = None
    reason: str | None = None

    @property
    def name(self) -> str:
        """The remote name asked for."""
        return self.item.name or os.path.basename(self.item.path)


async def plan_uploads(
    items: Sequence[BatchItem],
    journal: JournalQueue | None,
    endpoint: str,
    run: Runner,
    *,
    restart: bool = False,
) -> list[PlannedUpload]:
    """The L{PlannedUpload} of each of C{items}; see L{imgresume.client.Uploader.plan}."""
    planned = []
    for item in items:
        name = item.name or os.path.basename(item.path)
        try:
            st = await run(os.stat, item.path)
        except OSError as e:
            planned.append(PlannedUpload(item, "unreadable", reason=e.strerror or str(e)))
            continue
        entry = None
        if journal is not None and not restart:
            key = journal_key(Fingerprint.of(item.path, st), endpoint, name)
            entry = await journal.lookup(key)
        if entry is None:
            planned.append(PlannedUpload(item, "send", st.st_size))
        else:
            action = "stored" if entry.get("complete") else "resume"
            planned.append(PlannedUpload(item, action, st.st_size, entry["upload_id"]))
    return planned
