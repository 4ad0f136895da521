"""Kept for deployments that name `emulator.gunicorn:create_app`: the gunicorn host is `llm_provider.gunicorn`."""

from llm_provider.gunicorn import create_app as create_app
