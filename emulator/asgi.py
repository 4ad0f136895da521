"""Kept for deployments that name `emulator.asgi:create_app`: the ASGI host is `llm_provider.asgi`."""

from llm_provider.asgi import create_app as create_app
