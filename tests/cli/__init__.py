"""Tests of imgresume.cli: the imgresume command."""
