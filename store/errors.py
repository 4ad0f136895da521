"""What the store raises when the database refuses work."""

from __future__ import annotations


class StorageUnavailable(Exception):
    """The database refused the work for now: its disk full, its file read-only, its lock held by another
    process past the wait, its server unreachable.  Nothing of the refused transaction was stored."""
