"""Inbound webhooks: each one verified with its sender's official library before it may act."""
