"""Stateless event handlers of a node: driver, router and openai.

Each event reads what it needs from the store, decides, writes the store and
sends messages; nothing survives in memory between events but resources.
"""
