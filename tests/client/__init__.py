"""Tests of imgresume.client: the uploader, sessions and batches, the journal, the blocking wrapper."""
