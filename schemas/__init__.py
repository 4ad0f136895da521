"""Pydantic models of every message llm-provider nodes and clients exchange."""
