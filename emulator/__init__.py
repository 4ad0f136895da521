"""Runs llm-provider nodes: one by hand (`emulator node`) or a whole network on one machine (`emulator up`)."""
