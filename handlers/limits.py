"""The defaults of a node's limits, written once: the settings, the command line and the hosts read them here."""

from __future__ import annotations

DEFAULT_JOB_TIMEOUT = 60.0
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # room for images sent inline
DEFAULT_MAX_LLM_EVENT_BYTES = 8 * 1024 * 1024  # one streamed event of the LLM; a chunk is rarely over a few KiB
DEFAULT_DRAIN_GRACE = 10.0  # on SIGTERM, seconds running jobs may take to finish
DEFAULT_RETENTION = 24 * 3600.0  # seconds finished jobs are kept
